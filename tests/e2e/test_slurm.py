"""Slurm batch submission: launch/slurm.sbatch on a real two-node Slurm (two slurmd on loopback).

The test starts munge, slurmctld and two slurmd itself (Debian's slurm 22.05 packages, installed
by .ci/run), submits the template with ``sbatch -N 2``, and checks that the 2-node data-parallel
run logs the losses of the single-process run.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, subprocess_env

OVR = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
       "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1", "data.seq_len=32",
       "data.corpus_max_bytes=60000", "train.global_batch=4", "train.micro_batch=2",
       "train.max_steps=3", "train.warmup_steps=2", "run.progress=false", "parallel.timeout_s=60"]

CONF = """ClusterName=mmtrain-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
StateSaveLocation={run}/state
SlurmdSpoolDir={run}/spool/%n
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd-%n.pid
SlurmctldLogFile={run}/log/slurmctld.log
SlurmdLogFile={run}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={p1} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={p2} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""

NEEDED = ("slurmctld", "slurmd", "sbatch", "munged")


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _kill_pidfile(path: Path):
    if path.exists():
        try:
            os.kill(int(path.read_text().strip()), 15)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def slurm_cluster(tmp_path):
    missing = [b for b in NEEDED if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"Slurm is not installed ({missing}); `make test` installs it as root")
    if missing:
        pytest.fail(f"Slurm is not installed ({missing}); .ci/run installs it: "
                    f"apt-get install slurmctld slurmd slurm-client munge")
    # Slurm's daemons run as the "slurm" user, which cannot enter pytest's private tmp_path.
    run = Path(tempfile.mkdtemp(prefix="mmtrain-slurm-"))
    run.chmod(0o755)
    for d in ("state", "spool", "log"):
        (run / d).mkdir(parents=True)
    subprocess.run(["chown", "-R", "slurm:slurm", str(run / "state"), str(run / "log")],
                   check=True)
    conf = run / "slurm.conf"
    conf.write_text(CONF.format(run=run, ctld_port=free_port(), p1=free_port(), p2=free_port()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    # munge: one daemon for the machine; start it if none answers
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "munge:munge", "/run/munge"], check=True)
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["/usr/sbin/mungekey", "--create"], check=True)
            subprocess.run(["chown", "munge:munge", "/etc/munge/munge.key"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 20,
              "munged")
    subprocess.run(["/usr/sbin/slurmctld"], env=env, check=True)
    _wait(lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                 text=True).stdout.count("UP") > 0, 20, "slurmctld")
    for node in ("node1", "node2"):
        subprocess.run(["/usr/sbin/slurmd", "-N", node], env=env, check=True)
    _wait(lambda: all((run / f"slurmd-{n}.pid").exists() for n in ("node1", "node2")), 20,
          "slurmd")

    def idle():
        out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True,
                             text=True).stdout
        return out.strip() == "idle 2"

    try:
        _wait(idle, 30, "two idle nodes")
        yield env, run
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for n in ("node1", "node2"):
            _kill_pidfile(run / f"slurmd-{n}.pid")
        _kill_pidfile(run / "slurmctld.pid")
        time.sleep(0.5)
        shutil.rmtree(run, ignore_errors=True)


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
