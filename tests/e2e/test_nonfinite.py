"""Non-finite steps are skipped without touching the weights or the optimizer; K in a row stop
the run with one line; all ranks agree; the optional spike log flags a spiking loss.

Faults are injected with the trainer's test-only hook, ``MMTRAIN_FAULT`` (mmtrain/train/faults.py).
"""

import json
import subprocess
import sys
import time

import pytest
import torch

from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import build_model, train
from mmtrain.train.optim import build_optimizer
from tests.conftest import free_port, subprocess_env
from tests.e2e.test_train_resume import SMALL


def _records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpt_tensors(path, overrides):
    cfg = load_config(SMALL + overrides)
    model = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.train)
    ckpt.load(path, model, opt)
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({f"optim.{k}": v.clone() for k, v in ckpt.optimizer_tensors(model, opt).items()})
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("fault,null_field", [("nan_loss@3", "loss"), ("nan_grad@3", "grad_norm")])
def test_nonfinite_step_is_skipped_and_leaves_state_untouched(tmp_path, monkeypatch, fault,
                                                              null_field):
    clean = train(load_config(SMALL + ["train.max_steps=2", f"run.dir={tmp_path / 'clean'}"]))
    monkeypatch.setenv("MMTRAIN_FAULT", fault)
    run = tmp_path / "faulty"
    res = train(load_config(SMALL + ["train.max_steps=3", "train.ckpt_every=1", "train.keep_last=4",
                                     f"run.dir={run}"]))
    assert res.skipped == [3] and res.final_step == 3
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2, 3]  # the skipped step is counted and logged
    assert [r["skipped"] for r in recs] == [False, False, True]
    assert recs[2][null_field] is None and all(r[null_field] is not None for r in recs[:2])
    assert "spike" not in json.dumps(recs)  # the spike log is off by default
    # steps 1-2 are the clean run's; step 3 changed nothing: weights and optimizer state of the
    # step-3 checkpoint equal the step-2 ones bitwise (and the clean run's)
    assert [l for _, l in res.losses[:2]] == [l for _, l in clean.losses]
    s2 = _ckpt_tensors(run / "checkpoints" / "step_00000002", [])
    s3 = _ckpt_tensors(run / "checkpoints" / "step_00000003", [])
    ref = _ckpt_tensors(tmp_path / "clean" / "checkpoints" / "step_00000002", [])
    assert s2.keys() == s3.keys() == ref.keys() and any(k.startswith("optim.") for k in s2)
    for k in s2:
        assert torch.equal(s2[k], s3[k]), k
        assert torch.equal(s2[k], ref[k]), k
    # the step counted: the loader moved on (step 3's rows are not replayed) ...
    assert json.loads((run / "checkpoints" / "step_00000003" / "rank_00000.json").read_text())[
        "loader"]["consumed_rows"] == 3 * 4
    # ... and the next step updates again
    monkeypatch.delenv("MMTRAIN_FAULT")
    more = train(load_config(SMALL + ["train.max_steps=4", f"run.dir={run}"]))
    assert more.skipped == [] and [s for s, _ in more.losses] == [4]
    s4 = _ckpt_tensors(run / "checkpoints" / "step_00000004", [])
    assert not torch.equal(s4["model.embed.weight"], s3["model.embed.weight"])


def test_k_consecutive_bad_steps_stop_with_one_line(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "mmtrain.train", *SMALL, "train.max_steps=20",
                          "train.ckpt_every=2", "train.max_bad_steps=3", f"run.dir={run}"],
                         env=subprocess_env(MMTRAIN_FAULT="nan_loss@4+"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("error: train.max_bad_steps: 3 consecutive steps (4..6)"), line
    assert "stopped at step 6" in line
    assert f"last good checkpoint is {run / 'checkpoints' / 'step_00000002'}" in line
    assert "learning rate" in line and "bad data" in line  # the likely causes
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in recs] == [False] * 3 + [True] * 3
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000002"]  # nothing saved


def test_isolated_bad_steps_do_not_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTRAIN_FAULT", "inf_loss@2,nan_loss@3,nan_grad@5")
    res = train(load_config(SMALL + ["train.max_steps=6", "train.max_bad_steps=3",
                                     f"run.dir={tmp_path}"]))
    assert res.skipped == [2, 3, 5] and res.final_step == 6


def test_a_bad_step_on_one_rank_is_skipped_by_all_ranks(tmp_path):
    """NaN only on rank 1: the per-step all-reduce carries it to rank 0, so both skip the same
    steps and stop together (a disagreement would leave one rank waiting in a collective)."""
    run = tmp_path / "run"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mmtrain.train", *SMALL,
                          "train.max_steps=20", "train.ckpt_every=1", "train.max_bad_steps=2",
                          "parallel.timeout_s=30", f"run.dir={run}"],
                         env=subprocess_env(MMTRAIN_FAULT="nan_loss@3+:rank=1"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert time.time() - t0 < 120
    assert "error: train.max_bad_steps: 2 consecutive steps (3..4)" in out.stderr, out.stderr[-3000:]
    assert "stuck" not in out.stderr and "collective" not in out.stderr
    recs = _records(run)
    assert [r["skipped"] for r in recs] == [False, False, True, True]
    beats = {p.name: json.loads(p.read_text()) for p in (run / "heartbeat").glob("rank_*.json")}
    assert sorted(beats) == ["rank_00000.json", "rank_00001.json"]
    assert all(b["step"] == 4 and b["exited"] == "error" for b in beats.values()), beats
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000001", "step_00000002"]


def test_spike_detector_logs_a_spike(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMTRAIN_FAULT", "spike_loss@13")
    res = train(load_config(SMALL + ["train.max_steps=13", "train.spike_factor=2",
                                     "train.schedule=constant", f"run.dir={tmp_path}"]))
    recs = _records(tmp_path)
    assert [r["step"] for r in recs if r.get("spike")] == [13]
    assert res.skipped == []
    assert "loss spike at step 13" in capsys.readouterr().out
