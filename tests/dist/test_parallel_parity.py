"""Every parallel layout reproduces the single-process run (gloo, CPU), and checkpoints reshard.

One tiny hybrid MoE (a lightning and a softmax layer, 2 heads over 1 KV head, so TP=2 replicates
the KV head; 4 experts, top-2), global batch 4 rows of 32 tokens, ``train.micro_batch: null`` (each
layout splits the global batch over its DP ranks, so the micro-batches differ from the single
process's), a non-trivial aux coefficient (0.05: the global-batch aux loss must not change with
the layout), a constant schedule (so a 5-step run is the prefix of the 7-step reference). Layouts
go through the CLI under torchrun; the references run in this process. Tolerance: 1e-5 relative
on the losses and the logged aux values, 1e-5 on AdamW moments after 5 steps, and on parameters
the same plus an allowance for AdamW's per-element normalisation (``PARAM_ATOL``, below).

Three references: dropless (the expert-parallel layouts of the acceptance list); capacity factor
1 with global routing (the drops of every layout then equal the single process's: capacity is
judged over the whole batch); and, for gradient accumulation across layouts, dropless with the aux
coefficient 0 (under accumulation the aux gradient uses running counts, which depend on how the
micro-batches are grouped: ``mmtrain.model.moe``).
"""

import shutil
import subprocess
import sys

import pytest
import torch

from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import build_model, train
from mmtrain.train.optim import build_optimizer
from tests.conftest import free_port, metrics_records, subprocess_env

BASE = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
        "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
        "data.seq_len=32", "data.corpus_max_bytes=60000", "train.global_batch=4",
        "train.micro_batch=null", "train.aux_loss_coef=0.05", "train.warmup_steps=2",
        "train.schedule=constant", "run.progress=false", "parallel.timeout_s=60"]
DROPLESS = BASE
CAPACITY = BASE + ["model.capacity_factor=1.0", "model.global_routing=true"]
ACCUM = BASE + ["train.aux_loss_coef=0.0"]
REF_STEPS, STEPS = 7, 5
RTOL = 1e-5
# AdamW divides each element's first moment by the root of its second, so an element whose
# gradient sits near the fp32 rounding noise of its tensor takes a step of up to lr whatever the
# gradient's size: two runs whose gradients agree to 1e-6 of the tensor's scale (different
# reduction orders) can move such an element apart by a small fraction of lr. The AdamW moments,
# which carry the gradients themselves, are held to RTOL of their tensor's largest value; a
# parameter is allowed that plus 1e-3 of the total step length, lr × steps (1.5e-5 here). A wrong
# update (a shard not stepped, a gradient scaled twice) moves parameters by about lr (3e-3) and
# the moments by their own size. Measured: the largest parameter excess over RTOL alone was
# 2.0e-6 (tp2_ep4, one element of a v row of qkv_proj), the moments stay under 0.31 of RTOL.
PARAM_ATOL = 1e-3 * load_config(BASE).train.lr * STEPS


def _torchrun(nproc, ovr, args, run_dir, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "mmtrain.train", *ovr, *args,
           f"run.dir={run_dir}"]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _checkpoint_tensors(path, ovr):
    """Model and optimizer tensors of a checkpoint, as one process sees them."""
    cfg = load_config(ovr)
    model = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.train)
    ckpt.load(path, model, opt)
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({f"optim.{k}": v.clone() for k, v in ckpt.optimizer_tensors(model, opt).items()})
    return out


def _assert_close(got, want, what="loss"):
    assert len(got) == len(want), (got, want)
    for x, y in zip(got, want):
        assert abs(x - y) <= RTOL * abs(y), (what, got, want)


def _assert_same_records(run, ref, n=STEPS):
    recs = metrics_records(run)
    _assert_close([r["loss"] for r in recs], [r["loss"] for r in ref][:n])
    _assert_close([r["aux_loss"] for r in recs], [r["aux_loss"] for r in ref][:n], "aux")
    _assert_close([r["drop_rate"] for r in recs], [r["drop_rate"] for r in ref][:n], "drop")


def _assert_same_state(a, b):
    """Model parameters (``model.*``) and AdamW moments (``optim.*``) after STEPS steps: the
    moments to RTOL of their tensor's largest value, the parameters to that plus PARAM_ATOL."""
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        scale = max(float(b[k].abs().max()), 1e-12)
        err = float((a[k] - b[k]).abs().max())
        atol = PARAM_ATOL if k.startswith("model.") else 0.0
        assert err <= RTOL * scale + atol, (k, err, scale, atol)


def _reference(tmp_path_factory, ovr, name):
    run = tmp_path_factory.mktemp(name) / "run"
    train(load_config(ovr + [f"train.max_steps={REF_STEPS}", "train.ckpt_every=5",
                             "train.keep_last=3", f"run.dir={run}"]))
    return {"records": metrics_records(run), "dir": run, "ovr": ovr,
            "state5": _checkpoint_tensors(run / "checkpoints" / "step_00000005", ovr)}


@pytest.fixture(scope="module")
def dropless(tmp_path_factory):
    return _reference(tmp_path_factory, DROPLESS, "dropless")


@pytest.fixture(scope="module")
def capacity(tmp_path_factory):
    ref = _reference(tmp_path_factory, CAPACITY, "capacity")
    assert max(r["drop_rate"] for r in ref["records"]) > 0  # capacity dropping is exercised
    return ref


def _run_and_compare(ref, tmp_path, nproc, args):
    run = tmp_path / "run"
    out = _torchrun(nproc, ref["ovr"], args + [f"train.max_steps={STEPS}"], run)
    _assert_same_records(run, ref["records"])
    final = ckpt.latest(run)
    assert final.name == f"step_{STEPS:08d}"
    _assert_same_state(_checkpoint_tensors(final, ref["ovr"]), ref["state5"])
    return run, out


@pytest.mark.parametrize("nproc,args", [
    (4, ["parallel.ep=4", "parallel.zero1=true"]),                      # EP over the world
    (4, ["parallel.ep=2"]),                                             # EP=2 × EDP=2, DP=4
    (4, ["parallel.tp=2", "parallel.ep=4"]),                            # folding: EP spans TP×DP
], ids=["ep4_zero1", "ep2_dp4", "tp2_ep4"])
def test_expert_layout_matches_single_process(dropless, tmp_path, nproc, args):
    _run_and_compare(dropless, tmp_path, nproc, args)


@pytest.mark.parametrize("nproc,args", [
    (2, ["parallel.tp=2"]),                                             # TP=2 with SP
    (2, ["parallel.zero1=true"]),                                       # DP=2, ZeRO-1
    (4, ["parallel.dp=4", "parallel.bucket_mb=0.002"]),                 # DP=4, several buckets
    (4, ["parallel.ep=2", "parallel.etp=2", "parallel.moe_overlap_groups=3"]),  # drops over EP
], ids=["tp2_sp", "dp2_zero1", "dp4", "ep2_etp2_overlap3"])
def test_layout_with_capacity_matches_single_process(capacity, tmp_path, nproc, args):
    _run_and_compare(capacity, tmp_path, nproc, args)


# Activation recomputation re-runs the TP region hooks, the EP all-to-all and the MoE under a
# group balance in the backward; the single-process references run without it.
@pytest.mark.parametrize("ref,nproc,args", [
    ("capacity", 2, ["parallel.tp=2", "train.recompute=full"]),
    ("capacity", 2, ["parallel.tp=2", "train.recompute=selective", "train.fused_ce_chunk=24"]),
    ("dropless", 2, ["parallel.ep=2", "train.recompute=full"]),
    ("dropless", 2, ["parallel.ep=2", "train.recompute=selective", "train.fused_ce=false"]),
], ids=["tp2_full", "tp2_selective", "ep2_full", "ep2_selective"])
def test_recompute_layout_matches_single_process(request, tmp_path, ref, nproc, args):
    _run_and_compare(request.getfixturevalue(ref), tmp_path, nproc, args)


def test_gradient_accumulation_matches_single_process(tmp_path_factory, tmp_path):
    """DP=2 with 2 micro-batches a rank against one process with one micro-batch of 4 rows."""
    ref = _reference(tmp_path_factory, ACCUM, "accum")
    run = tmp_path / "run"
    _torchrun(2, ACCUM, ["train.micro_batch=1", f"train.max_steps={STEPS}"], run)
    _assert_close([r["loss"] for r in metrics_records(run)],
                  [r["loss"] for r in ref["records"]][:STEPS])
    # the logged aux value is the exact global-batch one whatever the accumulation
    _assert_close([r["aux_loss"] for r in metrics_records(run)],
                  [r["aux_loss"] for r in ref["records"]][:STEPS], "aux")
    _assert_same_state(_checkpoint_tensors(ckpt.latest(run), ACCUM), ref["state5"])


def _resume(nproc, ovr, args, src, dst):
    shutil.copytree(src, dst)
    if nproc == 1:
        res = train(load_config(ovr + args + [f"train.max_steps={REF_STEPS}", f"run.dir={dst}"]))
        assert [s for s, _ in res.losses] == list(range(STEPS + 1, REF_STEPS + 1))
    else:
        _torchrun(nproc, ovr, args + [f"train.max_steps={REF_STEPS}"], dst)
    return [r["loss"] for r in metrics_records(dst)]


def test_ep2_etp2_reshards_to_ep4_and_one_process(dropless, tmp_path):
    """ep=2 × etp=2 (ZeRO-1, overlap 2) → ep=4 and → one process; the next steps' losses are the
    uninterrupted run's (expert weights and AdamW moments were gathered and re-sliced)."""
    ref = [r["loss"] for r in dropless["records"]]
    run, _ = _run_and_compare(dropless, tmp_path, 4, ["parallel.ep=2", "parallel.etp=2",
                                                      "parallel.zero1=true",
                                                      "parallel.moe_overlap_groups=2"])
    _assert_close(_resume(4, DROPLESS, ["parallel.ep=4"], run, tmp_path / "ep4"), ref)
    _assert_close(_resume(1, DROPLESS, [], run, tmp_path / "one"), ref)


def test_one_process_reshards_to_ep4_and_ep2_to_one_process(dropless, tmp_path):
    ref = [r["loss"] for r in dropless["records"]]
    src = tmp_path / "src"
    shutil.copytree(dropless["dir"], src)
    shutil.rmtree(src / "checkpoints" / f"step_{REF_STEPS:08d}")
    with open(src / "metrics.jsonl") as f:
        keep = f.readlines()[:STEPS]
    (src / "metrics.jsonl").write_text("".join(keep))
    _assert_close(_resume(4, DROPLESS, ["parallel.ep=4", "parallel.zero1=true"], src,
                          tmp_path / "ep4"), ref)
    ep2 = tmp_path / "ep2"
    _torchrun(2, DROPLESS, ["parallel.ep=2", f"train.max_steps={STEPS}"], ep2)
    _assert_close(_resume(1, DROPLESS, [], ep2, tmp_path / "ep2_one"), ref)


def test_cli_tp2_dp2_then_reshard_to_dp4_and_one_process(capacity, tmp_path):
    """The TP=2 × DP=2 (ZeRO-1) layout logs the single-process losses; its checkpoint resumes
    under DP=4 (ZeRO-1 over 4) and under one process, and the next steps' losses are the
    uninterrupted run's (so parameters and optimizer state were resharded)."""
    run = tmp_path / "tp2dp2"
    out = _torchrun(4, CAPACITY, ["parallel.tp=2", "parallel.dp=2", "parallel.zero1=true",
                                  f"train.max_steps={STEPS}"], run)
    assert "4 process(es)" in out.stdout
    _assert_same_records(run, capacity["records"])
    _assert_same_state(_checkpoint_tensors(ckpt.latest(run), CAPACITY), capacity["state5"])
    ref = [r["loss"] for r in capacity["records"]]
    _assert_close(_resume(4, CAPACITY, ["parallel.dp=4", "parallel.zero1=true"], run,
                          tmp_path / "dp4"), ref)
    _assert_close(_resume(1, CAPACITY, [], run, tmp_path / "one"), ref)
