"""Preemption through a real Slurm: ``scancel --signal=USR1`` reaches every process of the job;
both ranks checkpoint the same step and exit 0 with "preempted at step N"; the requeued job
resumes there and finishes with the losses of an uninterrupted run.

launch/slurm.sbatch is submitted unchanged; ``--requeue`` and ``--open-mode`` are given on the
sbatch command line. torchrun's agent must hand SIGUSR1 to its workers instead of dying of it:
``TORCHELASTIC_SIGNALS_TO_HANDLE`` (exported into the job here) adds SIGUSR1 to the signals it
forwards.
"""

import json
import sys

from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import train
from tests.conftest import REPO, free_port, subprocess_env
from tests.slurm_preempt_cluster import slurm, wait  # noqa: F401 - the fixture

OVR = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
       "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1", "data.seq_len=32",
       "data.corpus_max_bytes=60000", "train.global_batch=4", "train.micro_batch=null",
       "train.warmup_steps=2", "run.progress=false", "parallel.timeout_s=60"]
STEPS = 12


def _steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


def test_slurm_usr1_preempts_all_ranks_and_the_requeued_job_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    out_file = tmp_path / "job.out"
    env = subprocess_env(MMTRAIN_PYTHON=sys.executable, MMTRAIN_HEAD_ADDR="127.0.0.1",
                         MASTER_PORT=free_port(), NPROC=1, PYTHONPATH=str(REPO),
                         TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                         MMTRAIN_FAULT="slow@1+:secs=0.4")  # steps slow enough to signal mid-run
    job = slurm.sbatch(["-N", "2", "--requeue", "--open-mode=append", f"--output={out_file}",
                        f"--chdir={REPO}", str(REPO / "launch" / "slurm.sbatch"), *OVR,
                        f"train.max_steps={STEPS}", f"run.dir={run}"], env)
    wait(lambda: len(_steps(run)) >= 3 or slurm.state(job) not in ("PENDING", "RUNNING"), 240,
         "three training steps")
    assert slurm.state(job) == "RUNNING", out_file.read_text()[-3000:]
    slurm.cmd("scancel", "--signal=USR1", job, check=True)
    slurm.wait_done(job, 180)
    log = out_file.read_text()
    n = _steps(run)[-1]
    assert 3 <= n < STEPS, log[-3000:]
    assert f"preempted at step {n}: all ranks saved checkpoint" in log, log[-3000:]
    latest = ckpt.latest(run)
    assert latest is not None and ckpt.read_meta(latest)["step"] == n
    assert ckpt.read_meta(latest)["world_size"] == 2 and not ckpt.missing_files(latest)
    # both ranks left the loop cleanly after the same step (their last heartbeat records)
    beats = [json.loads((run / "heartbeat" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    assert [(b["step"], b["exited"]) for b in beats] == [(n, "preempted")] * 2, beats

    # requeue: the same job runs again and continues from step n
    slurm.cmd("scontrol", "requeue", job, check=True)
    wait(lambda: slurm.state(job) in ("PENDING", "RUNNING"), 30, "the requeue")
    slurm.cmd("scontrol", "release", job)  # requeued jobs may be held; release is harmless
    # no forced StartTime=now: a requeued job must wait out its old credential (cred_expire=10
    # in the test cluster), and forcing the start races slurmd's "credential revoked" check
    assert slurm.wait_done(job, 300) == "COMPLETED", out_file.read_text()[-3000:]
    log = out_file.read_text()
    assert f"resumed from {run / 'checkpoints' / f'step_{n:08d}'} at step {n}" in log, log[-3000:]
    assert f"done: step {STEPS}" in log
    assert _steps(run) == list(range(1, STEPS + 1))
    got = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    ref = train(load_config(OVR + [f"train.max_steps={STEPS}", f"run.dir={tmp_path / 'ref'}"]))
    for (_, x), y in zip(ref.losses, got, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (ref.losses, got)
