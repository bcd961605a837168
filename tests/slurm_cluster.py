"""A real two-node Slurm cluster on this machine, for tests (see shared/SLURM.md).

``slurm_cluster()`` is a context manager: munge (one daemon for the machine, started if none
answers), then slurmctld and two slurmd (node1, node2 on loopback) with every port chosen free and
every file in a fresh temporary directory, so several clusters (several tests, several sessions)
never collide. Job credentials expire after 10 s instead of 120 s, which is also how long Slurm holds
a requeued job back before it may start again (a requeue test waits seconds, not minutes). It yields ``(env, run)``: ``env`` has ``SLURM_CONF`` set for clients, ``run`` is
the cluster's directory. Everything it started is stopped by pid file at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

CONF = """ClusterName=mmtrain-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
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


def wait_for(predicate, timeout, what):
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


def require_slurm():
    missing = [b for b in NEEDED if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"Slurm is not installed ({missing}); `make test` installs it as root")
    if missing:
        pytest.fail(f"Slurm is not installed ({missing}); .ci/run installs it: "
                    f"apt-get install slurmctld slurmd slurm-client munge")


@contextlib.contextmanager
def slurm_cluster():
    require_slurm()
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
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "munge:munge", "/run/munge"], check=True)
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["/usr/sbin/mungekey", "--create"], check=True)
            subprocess.run(["chown", "munge:munge", "/etc/munge/munge.key"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        wait_for(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 20,
                 "munged")
    try:
        subprocess.run(["/usr/sbin/slurmctld"], env=env, check=True)
        wait_for(lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                        text=True).stdout.count("UP") > 0, 20, "slurmctld")
        for node in ("node1", "node2"):
            subprocess.run(["/usr/sbin/slurmd", "-N", node], env=env, check=True)
        wait_for(lambda: all((run / f"slurmd-{n}.pid").exists() for n in ("node1", "node2")), 20,
                 "slurmd")

        def idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True,
                                 text=True).stdout
            return out.strip() == "idle 2"

        wait_for(idle, 30, "two idle nodes")
        yield env, run
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for n in ("node1", "node2"):
            _kill_pidfile(run / f"slurmd-{n}.pid")
        _kill_pidfile(run / "slurmctld.pid")
        time.sleep(0.5)
        shutil.rmtree(run, ignore_errors=True)


def job_state(env, job: str) -> str:
    """The job's state (PENDING, RUNNING, ...), or "" once it has left the queue."""
    q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                       text=True)
    return q.stdout.strip()
