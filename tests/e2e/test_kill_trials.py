"""Kill trials in CI (a few; ``scripts/kill_trials.py`` runs the full set, figures in
docs/reliability.md), and torchrun ``--max-restarts`` resuming after a rank crashes.

Each trial SIGKILLs the trainer at a checkpoint phase through the test-only fault hook, checks that
every checkpoint that looks complete is complete and loads, resumes, and requires the losses of an
uninterrupted run bit for bit.
"""

import subprocess
import sys

import pytest

from scripts.kill_trials import Trial, command, losses, reference, run_trial
from tests.conftest import free_port, subprocess_env


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    work = tmp_path_factory.mktemp("kill_refs")
    return {1: reference(1, work), 2: reference(2, work)}


@pytest.mark.parametrize("trial", [
    Trial(world=1, how="rename", step=4),       # renamed into place, not synced nor pruned
    Trial(world=2, how="data_state", step=3, rank=1),  # half of rank 1's loader/RNG JSON written
], ids=lambda t: f"w{t.world}-{t.how}")
def test_kill_trial(tmp_path, refs, trial):
    run_trial(trial, tmp_path, refs[trial.world])
    assert trial.killed, trial
    assert trial.checkpoints_ok and not trial.error, trial.error
    # the newest complete checkpoint: the step before the killed save (after it for "rename")
    expect = trial.step if trial.how == "rename" else trial.step - 1
    assert trial.resumed_from == expect, trial
    assert trial.identical


def test_torchrun_max_restarts_resumes_from_last_checkpoint(tmp_path, refs):
    """Rank 1 crashes in step 4 (first attempt only); torchrun restarts both workers, which
    resume from the step-3 checkpoint and finish with the uninterrupted run's losses."""
    run = tmp_path / "run"
    cmd = command(2, run)
    i = cmd.index("--nproc-per-node")
    cmd[i:i] = ["--max-restarts", "1"]
    out = subprocess.run(cmd, env=subprocess_env(MMTRAIN_FAULT="crash@4:rank=1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1 crashes in step 4" in out.stderr
    assert "resumed from" in out.stdout and "at step 3" in out.stdout, out.stdout[-2000:]
    assert losses(run) == refs[2]
