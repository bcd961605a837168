"""bf16 parameters under data parallelism (gloo, CPU, ``train.dtype=bf16``): DP=2 with and
without ZeRO-1 reproduce one process with other micro-batch splits, a sharded bf16 checkpoint
resumes bit-identically in its own layout, and checkpoints reshard DP2+ZeRO-1 -> one process and
one process -> DP2+ZeRO-1 (the fp32 masters travel exactly). The gradient buckets' overlap (async
launch in the last micro-batch's backward) is checked with main gradients on two processes.

The model is the parity tests' (``tests/dist/test_parallel_parity.py``) with the aux coefficient
0: under gradient accumulation the aux gradient uses running counts that depend on the grouping
of the micro-batches (``mmtrain.model.moe``). Tolerance: 2e-4 relative on the losses. Runs that
split the rows alike differ by the order of fp32 sums only; other splits round bf16 GEMMs over
other row groups (measured: ~2e-5); the fp32 run is ~1e-3 away, and a step that misses a
reduction is further still.
"""

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from mmtrain.parallel.apply import check_layout
from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.distributed import build_optimizer, build_parallel, load_checkpoint
from mmtrain.train.loop import train
from tests.conftest import metrics_records, spawn_ranks
from tests.dist.test_parallel_parity import BASE, _torchrun

OVR = BASE + ["train.aux_loss_coef=0.0", "train.dtype=bf16", "train.ckpt_every=2",
              "train.keep_last=3"]
STEPS = 5
RTOL = 2e-4


def _losses(run):
    return [r["loss"] for r in metrics_records(run)]


def _close(got, want):
    assert len(got) == len(want), (got, want)
    for x, y in zip(got, want):
        assert abs(x - y) <= RTOL * abs(y), (got, want)


def _resume_copy(src, dst, step):
    """``src`` as it was after ``step``: later checkpoints and log lines removed."""
    shutil.copytree(src, dst)
    for p in ckpt.complete_checkpoints(dst):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    lines = open(src / "metrics.jsonl").readlines()[:step]
    (dst / "metrics.jsonl").write_text("".join(lines))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One process, one micro-batch of all 4 rows."""
    run = tmp_path_factory.mktemp("bf16ref") / "run"
    res = train(load_config(OVR + [f"train.max_steps={STEPS}", f"run.dir={run}"]))
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    return run


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    """DP=2, ZeRO-1, two micro-batches of one row per rank."""
    run = tmp_path_factory.mktemp("bf16zero") / "run"
    out = _torchrun(2, OVR, ["parallel.zero1=true", "train.micro_batch=1",
                             f"train.max_steps={STEPS}"], run)
    assert "bf16 params, fp32 masters" in out.stdout + out.stderr
    return run


def test_dp2_zero1_matches_one_process(ref, zero):
    _close(_losses(zero), _losses(ref))


def test_dp2_matches_one_process(ref, tmp_path):
    run = tmp_path / "run"  # DP=2 without ZeRO-1: whole fp32 masters on every rank
    _torchrun(2, OVR, [f"train.max_steps={STEPS}"], run)
    _close(_losses(run), _losses(ref))


def test_dp2_zero1_resumes_bit_identically(zero, tmp_path):
    run = tmp_path / "run"
    _resume_copy(zero, run, 4)
    _torchrun(2, OVR, ["parallel.zero1=true", "train.micro_batch=1",
                       f"train.max_steps={STEPS}"], run)
    assert _losses(run) == _losses(zero)  # bitwise-equal floats (JSON round-trips them)


def _masters_after_load(ovr, path):
    """One process, bf16: load ``path``; (masters, params, saved fp32 weights) by name."""
    cfg = load_config(ovr)
    torch.manual_seed(99)  # other initial values: everything must come from the checkpoint
    model, par = build_parallel(cfg, check_layout(cfg, 1), torch.device("cpu"))
    opt = build_optimizer(par, cfg.train)
    load_checkpoint(par, path, opt)
    masters = {i.name: v.clone() for b in par.sync.buckets
               for i, v in b.views(opt.state_of(b)["master"])}
    params = {i.name: i.param.detach().clone() for i in par.infos}
    saved = {k: torch.empty(v.shape) for k, v in masters.items()}
    ckpt.dcp_load({f"model.{k}": v for k, v in saved.items()}, path)
    return masters, params, saved


def test_dp2_zero1_checkpoint_resumes_in_one_process(zero, tmp_path):
    path = ckpt.checkpoint_root(zero) / "step_00000002"
    masters, params, saved = _masters_after_load(OVR + [f"run.dir={tmp_path / 'x'}"], path)
    for k in saved:  # the masters the two ranks wrote, exactly; the weights their rounding
        assert torch.equal(masters[k], saved[k]), k
        assert torch.equal(params[k], saved[k].to(torch.bfloat16)), k
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in saved.values())
    run = tmp_path / "one"
    _resume_copy(zero, run, 2)  # rows split as under DP2 (one a micro-batch): fp32 sums differ
    res = train(load_config(OVR + ["train.micro_batch=1", f"train.max_steps={STEPS}",
                                   f"run.dir={run}"]))
    assert [s for s, _ in res.losses] == [3, 4, 5]
    _close(_losses(run), _losses(zero))


def test_one_process_checkpoint_resumes_under_dp2_zero1(ref, tmp_path):
    run = tmp_path / "run"
    _resume_copy(ref, run, 2)
    _torchrun(2, OVR, ["parallel.zero1=true", f"train.max_steps={STEPS}"], run)
    _close(_losses(run), _losses(ref))


# ------------------------------------------------------------------- overlap with main grads
def _overlap_worker(rank, world, port, out):
    import datetime

    from mmtrain.parallel.data import GradSync, ParamInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    for zero1 in (False, True):
        got = {}
        for overlap in (False, True):
            torch.manual_seed(0)  # the same bf16 weights on both ranks and in both runs
            net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(torch.bfloat16)
            infos = [ParamInfo(n, p, "dp", tuple(p.shape), decay=p.dim() >= 2)
                     for n, p in net.named_parameters()]
            sync = GradSync(infos, {"dp": dist.group.WORLD}, 0.0005, zero1, overlap,
                            torch.device("cpu"), main_grads=True)
            g = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
            manual = {n: torch.zeros(p.shape) for n, p in net.named_parameters()}
            for i in range(3):
                x = torch.randn(4, 16, generator=g).to(torch.bfloat16)
                sync.prepare_backward(last_micro_batch=i == 2)
                # the bf16 gradients this micro-batch gives, recomputed apart, summed in fp32
                ref = torch.autograd.grad(net(x).float().pow(2).sum(), list(net.parameters()))
                for (n, _), r in zip(net.named_parameters(), ref):
                    manual[n] += r.float()
                net(x).float().pow(2).sum().backward()
            launched = sync.launched_in_backward
            sync.finish()
            flat = torch.cat([manual[i.name].reshape(-1) for b in sync.buckets for i in b.infos])
            dist.all_reduce(flat)
            want = {}
            pos = 0
            for b in sync.buckets:
                for i in b.infos:
                    want[i.name] = flat[pos:pos + i.param.numel()]
                    pos += i.param.numel()
            if zero1:
                red = {}
                for b in sync.buckets:
                    full = torch.zeros(b.padded)
                    full[b.owned] = b.shard_grad
                    for i, v in b.views(full):
                        red[i.name] = v.reshape(-1)
            else:
                red = {i.name: v.reshape(-1).clone() for b in sync.buckets
                       for i, v in b.views(b.grad)}
            own = {}
            for b in sync.buckets:
                mask = torch.zeros(b.padded, dtype=torch.bool)
                mask[b.owned if zero1 else slice(0, b.padded)] = True
                for i, v in b.views(mask):
                    own[i.name] = v.reshape(-1)
            diff = torch.cat([(red[k] - want[k])[own[k]] for k in want])
            assert diff.numel() > 0
            err = float(diff.abs().max())
            got[overlap] = (red, len(sync.buckets), launched, err)
        (r0, n0, l0, e0), (r1, n1, l1, e1) = got[False], got[True]
        res[zero1] = {"buckets": n0, "launched": (l0, l1), "err": (e0, e1),
                      "same": all(torch.equal(r0[k], r1[k]) for k in r0)}
    out[rank] = res
    dist.destroy_process_group()


def test_overlapped_bucket_launch_with_fp32_main_grads():
    out = spawn_ranks(_overlap_worker, 2)
    for rank in range(2):
        for zero1, r in out[rank].items():
            assert r["buckets"] >= 2, r
            # overlap: every bucket launched inside the last micro-batch's backward
            assert r["launched"] == (0, r["buckets"]), (zero1, r)
            assert r["err"] == (0.0, 0.0), (zero1, r)  # the fp32 sum of the bf16 grads
            assert r["same"], (zero1, r)
