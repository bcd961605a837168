"""A real Slurm cluster for the preemption test (munge, slurmctld and two slurmd on loopback; shared/SLURM.md). tests/slurm_cluster.py is the curriculum tests' variant; both isolate their run dir, ports and cluster name.

Every cluster lives in its own temporary directory (state, spool, logs, pid files, slurm.conf)
with its own free ports and cluster name, and is reached only through ``SLURM_CONF``, so several
tests (or several checkouts) can run clusters on one machine at the same time.

    with SlurmCluster() as cluster:            # or the ``slurm`` fixture below
        job = cluster.sbatch([...], env=...)
        cluster.wait_done(job, 240)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

NEEDED = ("slurmctld", "slurmd", "sbatch", "munged")

CONF = """ClusterName={name}
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
JobRequeue=1
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={p1} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={p2} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> list[str]:
    return [b for b in NEEDED if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def wait(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def _kill_pidfile(path: Path) -> None:
    if path.exists():
        try:
            os.kill(int(path.read_text().strip()), 15)
        except (ProcessLookupError, ValueError):
            pass


def _start_munge() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return  # one munged serves the machine
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "munge:munge", "/run/munge"], check=True)
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["/usr/sbin/mungekey", "--create"], check=True)
        subprocess.run(["chown", "munge:munge", "/etc/munge/munge.key"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 20,
         "munged")


class SlurmCluster:
    NODES = ("node1", "node2")

    def __enter__(self) -> "SlurmCluster":
        # The daemons run as "slurm", which cannot enter pytest's private tmp_path.
        self.run = Path(tempfile.mkdtemp(prefix="mmtrain-slurm-"))
        self.run.chmod(0o755)
        for d in ("state", "spool", "log"):
            (self.run / d).mkdir(parents=True)
        subprocess.run(["chown", "-R", "slurm:slurm", str(self.run / "state"),
                        str(self.run / "log")], check=True)
        conf = self.run / "slurm.conf"
        conf.write_text(CONF.format(run=self.run, name=f"mmt{os.getpid() % 100000}",
                                    ctld_port=free_port(), p1=free_port(), p2=free_port()))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        try:
            _start_munge()
            subprocess.run(["/usr/sbin/slurmctld"], env=self.env, check=True)
            wait(lambda: "UP" in self.cmd("scontrol", "ping"), 20, "slurmctld")
            for node in self.NODES:
                subprocess.run(["/usr/sbin/slurmd", "-N", node], env=self.env, check=True)
            wait(lambda: all((self.run / f"slurmd-{n}.pid").exists() for n in self.NODES), 20,
                 "slurmd")
            wait(lambda: self.cmd("sinfo", "-h", "-o", "%T %D").strip() == "idle 2", 30,
                 "two idle nodes")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for n in self.NODES:
            _kill_pidfile(self.run / f"slurmd-{n}.pid")
        _kill_pidfile(self.run / "slurmctld.pid")
        time.sleep(0.5)
        shutil.rmtree(self.run, ignore_errors=True)

    # ------------------------------------------------------------------ clients
    def cmd(self, *args: str, check: bool = False) -> str:
        out = subprocess.run(list(args), env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, args: list[str], env: dict) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env=dict(env, **{
            "SLURM_CONF": self.env["SLURM_CONF"]}), capture_output=True, text=True, check=True)
        return out.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, FAILED, ...), from scontrol."""
        out = self.cmd("scontrol", "-o", "show", "job", job)
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait_done(self, job: str, timeout: float) -> str:
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                 "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "UNKNOWN")
        wait(lambda: self.state(job) in ended, timeout, f"job {job} to end")
        return self.state(job)


@pytest.fixture
def slurm():
    gone = missing()
    if gone and not os.environ.get("CI"):
        pytest.skip(f"Slurm is not installed ({gone}); `make test` installs it as root")
    if gone:
        pytest.fail(f"Slurm is not installed ({gone}); .ci/run installs it: "
                    f"apt-get install slurmctld slurmd slurm-client munge")
    with SlurmCluster() as cluster:
        yield cluster
