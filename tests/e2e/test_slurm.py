"""Slurm batch submission: launch/slurm.sbatch on a real two-node Slurm (two slurmd on loopback).

The test starts munge, slurmctld and two slurmd itself (tests/slurm_cluster.py: Debian's slurm
22.05 packages, installed by .ci/run; free ports and a temporary directory of its own), submits
the template with ``sbatch -N 2``, and checks that the 2-node data-parallel run logs the losses of
the single-process run.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, subprocess_env
from tests.slurm_cluster import slurm_cluster as _cluster
from tests.slurm_cluster import wait_for as _wait

OVR = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
       "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1", "data.seq_len=32",
       "data.corpus_max_bytes=60000", "train.global_batch=4", "train.micro_batch=null",
       "train.max_steps=3", "train.warmup_steps=2", "run.progress=false", "parallel.timeout_s=60"]


@pytest.fixture
def slurm_cluster():
    with _cluster() as c:
        yield c


def test_sbatch_two_nodes_matches_one_process(slurm_cluster, tmp_path):
    env, run = slurm_cluster
    job_env = subprocess_env(SLURM_CONF=env["SLURM_CONF"], MMTRAIN_PYTHON=sys.executable,
                             MMTRAIN_HEAD_ADDR="127.0.0.1", MASTER_PORT=free_port(), NPROC=1,
                             PYTHONPATH=str(REPO))
    out_file = tmp_path / "job.out"
    sub = subprocess.run(["sbatch", "--parsable", "-N", "2", f"--output={out_file}",
                          f"--chdir={REPO}", str(REPO / "launch" / "slurm.sbatch"), *OVR,
                          f"run.dir={tmp_path / 'slurm_run'}"],
                         env=job_env, capture_output=True, text=True, check=True)
    job = sub.stdout.strip().split(";")[0]

    def finished():
        q = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        return q.stdout.strip() == ""

    _wait(finished, 240, f"job {job}")
    log = out_file.read_text() if out_file.exists() else "(no output)"
    metrics = tmp_path / "slurm_run" / "metrics.jsonl"
    assert metrics.exists(), log[-3000:]
    two = [json.loads(l)["loss"] for l in open(metrics)]

    one = subprocess.run([sys.executable, "-m", "mmtrain.train", *OVR,
                          f"run.dir={tmp_path / 'one'}"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    ref = [json.loads(l)["loss"] for l in open(tmp_path / "one" / "metrics.jsonl")]
    assert len(two) == len(ref) == 3
    for x, y in zip(ref, two):
        assert abs(x - y) <= 1e-5 * abs(x), (ref, two)
