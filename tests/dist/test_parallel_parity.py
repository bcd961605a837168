"""Every TP × DP layout reproduces the single-process run (gloo, CPU), and checkpoints reshard.

One tiny hybrid MoE (a lightning and a softmax layer, 2 heads over 1 KV head, so TP=2 replicates
the KV head; capacity_factor=1 so tokens are dropped and the TP capacity rule is exercised),
global batch 4 rows of 32 tokens, micro-batch 1 (gradient accumulation in every layout), a
constant schedule (so a 5-step run is the prefix of the 7-step reference). Layouts go through the
CLI under torchrun; the reference runs in this process. Tolerance: 1e-5 relative on the losses
(the acceptance bar), 1e-5 on parameters and AdamW moments after 5 steps.
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

OVR = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
       "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
       "model.capacity_factor=1.0", "data.seq_len=32", "data.corpus_max_bytes=60000",
       "train.global_batch=4", "train.micro_batch=1", "train.warmup_steps=2",
       "train.schedule=constant", "run.progress=false", "parallel.timeout_s=60"]
REF_STEPS, STEPS = 7, 5
RTOL = 1e-5


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(run_dir / "metrics.jsonl")]


def _torchrun(nproc, args, run_dir, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "mmtrain.train", *OVR, *args,
           f"run.dir={run_dir}"]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _checkpoint_tensors(path):
    """Model and optimizer tensors of a checkpoint, as one process sees them."""
    cfg = load_config(OVR)
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run: 7 steps, checkpoints at 5 and 7."""
    run = tmp_path_factory.mktemp("ref") / "run"
    res = train(load_config(OVR + [f"train.max_steps={REF_STEPS}", "train.ckpt_every=5",
                                   "train.keep_last=3", f"run.dir={run}"]))
    drops = [json.loads(l)["drop_rate"] for l in open(run / "metrics.jsonl")]
    assert max(drops) > 0  # capacity dropping is exercised
    return {"losses": [l for _, l in res.losses], "dir": run,
            "state5": _checkpoint_tensors(run / "checkpoints" / "step_00000005")}


@pytest.mark.parametrize("nproc,args", [
    (2, ["parallel.tp=2"]),                                             # TP=2 with SP
    (2, ["parallel.zero1=true"]),                                       # DP=2, ZeRO-1
    (4, ["parallel.dp=4", "parallel.bucket_mb=0.002"]),                 # DP=4, several buckets
], ids=["tp2_sp", "dp2_zero1", "dp4"])
def test_layout_matches_single_process(reference, tmp_path, nproc, args):
    run = tmp_path / "run"
    _torchrun(nproc, args + [f"train.max_steps={STEPS}"], run)
    _assert_close_losses(_losses(run), reference["losses"][:STEPS])
    final = ckpt.latest(run)
    assert final.name == f"step_{STEPS:08d}"
    _assert_same_state(_checkpoint_tensors(final), reference["state5"])


def test_cli_tp2_dp2_then_reshard_to_dp4_and_one_process(reference, tmp_path):
    """The acceptance command (TP=2 × DP=2, ZeRO-1) logs the single-process losses; its
    checkpoint resumes under DP=4 (ZeRO-1 over 4) and under one process, and the next steps'
    losses are the uninterrupted run's (so parameters and optimizer state were resharded)."""
    run = tmp_path / "tp2dp2"
    out = _torchrun(4, ["parallel.tp=2", "parallel.dp=2", "parallel.zero1=true",
                        f"train.max_steps={STEPS}"], run)
    assert "4 process(es)" in out.stdout
    _assert_close_losses(_losses(run), reference["losses"][:STEPS])
    _assert_same_state(_checkpoint_tensors(ckpt.latest(run)), reference["state5"])

    dp4 = tmp_path / "dp4"
    shutil.copytree(run, dp4)
    _torchrun(4, ["parallel.dp=4", "parallel.zero1=true", f"train.max_steps={REF_STEPS}"], dp4)
    _assert_close_losses(_losses(dp4), reference["losses"])

    one = tmp_path / "one"
    shutil.copytree(run, one)
    res = train(load_config(OVR + [f"train.max_steps={REF_STEPS}", f"run.dir={one}"]))
    assert [s for s, _ in res.losses] == list(range(STEPS + 1, REF_STEPS + 1))
    _assert_close_losses([l for _, l in res.losses], reference["losses"][STEPS:])
