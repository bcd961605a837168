"""SIGTERM / SIGUSR1 (Slurm time limit, preemption) or Ctrl-C: finish the step, checkpoint, exit
cleanly; the same command resumes exactly where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import train
from tests.conftest import free_port, subprocess_env
from tests.e2e.test_train_resume import SMALL as _SMALL

# constant lr: the schedule must not depend on train.max_steps, which the resumed run changes
SMALL = _SMALL + ["train.schedule=constant"]


def _logged_steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


def _signal_after(proc, run, sig, min_steps=2, timeout=240):
    deadline = time.time() + timeout
    while len(_logged_steps(run)) < min_steps:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training never got going"
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_checkpoints_and_resumes(tmp_path, sig):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmtrain.train", *SMALL, "train.max_steps=100000",
           f"run.dir={run}"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rc, out, err = _signal_after(proc, run, sig)
    assert rc == 0, err[-3000:]
    steps = _logged_steps(run)
    latest = ckpt.latest(run)
    assert latest is not None and ckpt.read_meta(latest)["step"] == steps[-1]
    assert "run the same command again to resume" in out
    how = "stopped on request" if sig == signal.SIGINT else "preempted"
    assert f"{how} at step {steps[-1]}: all ranks saved checkpoint {latest}" in out
    # resuming continues at the next step and matches an uninterrupted run of the same length,
    # bitwise: single-threaded like the subprocess that wrote the checkpoint (CPU kernels may
    # round differently with another thread count)
    n = steps[-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(load_config(SMALL + [f"train.max_steps={n + 2}", f"run.dir={run}"]))
        assert [s for s, _ in resumed.losses] == [n + 1, n + 2]
        full = train(load_config(SMALL + [f"train.max_steps={n + 2}",
                                          f"run.dir={tmp_path / 'full'}"]))
    finally:
        torch.set_num_threads(threads)
    assert full.losses[-2:] == resumed.losses


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Only one worker of a 2-process torchrun job is signalled; the stop flag travels in the
    per-step all-reduce, so both ranks checkpoint the same step and exit cleanly."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "mmtrain.train", *SMALL,
           "train.max_steps=100000", "parallel.timeout_s=60", f"run.dir={run}"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_logged_steps(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, "training never got going"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = _logged_steps(run)
    latest = ckpt.latest(run)
    assert latest is not None and ckpt.read_meta(latest)["step"] == steps[-1]
    assert ckpt.read_meta(latest)["world_size"] == 2
    assert (latest / "rank_00000.json").is_file() and (latest / "rank_00001.json").is_file()
    assert f"preempted at step {steps[-1]}" in out
    beats = [json.loads((run / "heartbeat" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    assert [(b["step"], b["exited"]) for b in beats] == [(steps[-1], "preempted")] * 2
