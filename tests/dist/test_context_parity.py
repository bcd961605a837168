"""Context-parallel layouts reproduce the single-process run through the CLI under torchrun
(gloo, CPU), and checkpoints reshard between cp=2 and one process (both under the default zigzag
partition).

The corpus is a .jsonl whose document lengths are chosen so that, in rows of 32 tokens split
over cp=2 (contiguous: 16 per rank; zigzag: pieces of 8) and cp=4 (contiguous: 8 per rank;
zigzag: pieces of 4), documents cross piece edges, a 2-token document straddles the middle edge
16 (a length-1 piece on each side), a document starts exactly on a piece edge (24), a row is one
document (the state and K/V chain through every piece), and a row starts with a length-1 piece.
Zigzag runs cp=2, cp=4, cp=2 × tp=2 and cp=2 × dp=2 (LASP+; the last with two zigzag rounds:
8 pieces of 4); the contiguous partition runs cp=4 with LASP (its only partition). The 8 rows are all seen in the 4 steps (2 epochs). Model: a lightning and a
softmax layer, 4 heads over 2 KV heads (TP=2 splits the KV heads), dropless MoE. No gradient
accumulation (``train.micro_batch=null``: 4 rows per micro-batch, 2 per DP rank at dp=2; the
global-batch aux loss is exact only without accumulation), so every CP rank's piece list holds
several rows. Tolerance: 1e-5 relative on losses and on the parameters and AdamW moments after
the last step.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import build_model, train
from mmtrain.train.optim import build_optimizer
from tests.conftest import free_port, subprocess_env

# Stream positions where documents start (each document is text + EOS, byte tokens).
STARTS = [0, 5, 15, 17, 24, 70, 72, 90, 97, 110, 200, 203, 230, 250]
END = 260
SEQ = 32
REF_STEPS, STEPS = 5, 3
RTOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp_corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for d, (a, b) in enumerate(zip(STARTS, STARTS[1:] + [END])):
            text = "".join(chr(97 + (i * 7 + 3 * d) % 26) for i in range(b - a - 1))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _ovr(corpus):
    return ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
            "model.softmax_every=2", "model.num_heads=4", "model.head_dim=8",
            "model.num_kv_heads=2", "model.capacity_factor=null", "model.lightning_block_size=4",
            f"data.corpus={corpus}", "data.corpus_max_bytes=0", f"data.seq_len={SEQ}",
            "train.global_batch=4", "train.micro_batch=null", "train.warmup_steps=2",
            "train.schedule=constant", "run.progress=false", "parallel.timeout_s=60"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(run_dir / "metrics.jsonl")]


def _torchrun(nproc, args, run_dir, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "mmtrain.train", *args, f"run.dir={run_dir}"]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _checkpoint_tensors(ovr, path):
    cfg = load_config(ovr)
    model = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.train)
    ckpt.load(path, model, opt)
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({f"optim.{k}": v.clone() for k, v in ckpt.optimizer_tensors(model, opt).items()})
    return out


def _assert_close_losses(got, want):
    assert len(got) == len(want), (got, want)
    for x, y in zip(got, want):
        assert abs(x - y) <= RTOL * abs(y), (got, want)


def _assert_same_state(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        scale = max(float(b[k].abs().max()), 1e-12)
        err = float((a[k] - b[k]).abs().max())
        assert err <= RTOL * scale, (k, err, scale)


def test_corpus_rows_exercise_the_edge_cases(corpus):
    """The rows hold what the module docstring promises (so the parity runs test it)."""
    from mmtrain.data import build_dataset, build_tokenizer

    cfg = load_config(_ovr(corpus))
    ds = build_dataset(cfg.data, build_tokenizer(cfg.data))
    assert len(ds) == 8
    rows = [ds.row(i).seqlens for i in range(8)]
    assert rows[1] == [SEQ]  # a row that is one document
    assert rows[3][0] == 1  # a length-1 piece at a row start
    edges0 = [sum(rows[0][:i]) for i in range(len(rows[0]) + 1)]
    assert 15 in edges0 and 17 in edges0 and 16 not in edges0  # straddles the cp=2 edge
    assert 24 in edges0  # a document starts on a cp=4 edge


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("cp_ref") / "run"
    ovr = _ovr(corpus)
    res = train(load_config(ovr + [f"train.max_steps={REF_STEPS}", f"train.ckpt_every={STEPS}",
                                   "train.keep_last=3", f"run.dir={run}"]))
    return {"losses": [l for _, l in res.losses], "dir": run, "ovr": ovr,
            "state": _checkpoint_tensors(ovr, run / "checkpoints" / f"step_{STEPS:08d}")}


@pytest.fixture(scope="module")
def cp2_run(reference, tmp_path_factory):
    """parallel.cp=2 (LASP+, zigzag: the defaults) for STEPS steps; its start-up output and run
    directory."""
    run = tmp_path_factory.mktemp("cp2") / "run"
    out = _torchrun(2, reference["ovr"] + ["parallel.cp=2", f"train.max_steps={STEPS}"], run)
    return out, run


def _assert_matches_reference(reference, run, out, cp, balance="zigzag"):
    assert f"cp{cp}" in out.stdout and f"context parallel ({balance} partition" in out.stdout
    _assert_close_losses(_losses(run), reference["losses"][:STEPS])
    final = ckpt.latest(run)
    assert final.name == f"step_{STEPS:08d}"
    _assert_same_state(_checkpoint_tensors(reference["ovr"], final), reference["state"])


def test_cp2_matches_single_process(reference, cp2_run):
    out, run = cp2_run
    _assert_matches_reference(reference, run, out, 2)


# Zigzag (the default) with LASP+ in three layouts, and the contiguous partition with LASP (the
# op tests run both partitions, and both lightning modes under contiguous, at cp=2 and cp=4).
@pytest.mark.parametrize("nproc,args", [
    (4, ["parallel.cp=4"]),
    (4, ["parallel.cp=2", "parallel.tp=2"]),
    (4, ["parallel.cp=2", "parallel.dp=2", "parallel.zero1=true", "parallel.cp_zigzag_rounds=2"]),
    (4, ["parallel.cp=4", "parallel.cp_lightning=lasp", "parallel.cp_balance=contiguous"]),
], ids=["cp4", "cp2_tp2", "cp2_dp2_zero1_rounds2", "cp4_contiguous_lasp"])
def test_cp_layout_matches_single_process(reference, tmp_path, nproc, args):
    run = tmp_path / "run"
    out = _torchrun(nproc, reference["ovr"] + args + [f"train.max_steps={STEPS}"], run)
    cp = int(next(a for a in args if a.startswith("parallel.cp=")).split("=")[1])
    balance = "contiguous" if "parallel.cp_balance=contiguous" in args else "zigzag"
    _assert_matches_reference(reference, run, out, cp, balance)


@pytest.mark.parametrize("args", [["parallel.cp=2", "train.recompute=full"],
                                  ["parallel.cp=2", "train.recompute=selective",
                                   "train.fused_ce_chunk=10"]], ids=["full", "selective"])
def test_cp2_with_recompute_matches_single_process(reference, tmp_path, args):
    """LASP+ and ring attention run again in the backward (every CP rank recomputes the same
    layers in the same order); the reference runs without recomputation."""
    run = tmp_path / "run"
    out = _torchrun(2, reference["ovr"] + args + [f"train.max_steps={STEPS}"], run)
    _assert_matches_reference(reference, run, out, 2)


def test_checkpoint_reshards_between_cp2_and_one_process(reference, cp2_run, tmp_path):
    """The cp=2 checkpoint resumes in one process, and a one-process checkpoint under cp=2; the
    next steps' losses are the uninterrupted run's."""
    ovr = reference["ovr"]
    one = tmp_path / "one"
    shutil.copytree(cp2_run[1], one)
    res = train(load_config(ovr + [f"train.max_steps={REF_STEPS}", f"run.dir={one}"]))
    assert [s for s, _ in res.losses] == list(range(STEPS + 1, REF_STEPS + 1))
    _assert_close_losses([l for _, l in res.losses], reference["losses"][STEPS:])

    back = tmp_path / "back"
    shutil.copytree(reference["dir"], back)
    shutil.rmtree(back / "checkpoints" / f"step_{REF_STEPS:08d}")
    _torchrun(2, ovr + ["parallel.cp=2", f"train.max_steps={REF_STEPS}"], back)
    _assert_close_losses(_losses(back)[-(REF_STEPS - STEPS):], reference["losses"][STEPS:])
