"""A rank that dies or stalls ends a 2-rank job within parallel.timeout_s, with lines naming the
rank, the step and the collective (faults injected with the test-only MMTRAIN_FAULT hook)."""

import json
import re
import subprocess
import sys
import time

from tests.conftest import free_port, subprocess_env
from tests.e2e.test_train_resume import SMALL

TIMEOUT_S = 10


def _torchrun(run, fault, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "mmtrain.train", *SMALL,
           "train.max_steps=8", f"parallel.timeout_s={TIMEOUT_S}", f"run.dir={run}", *extra]
    t0 = time.time()
    out = subprocess.run(cmd, env=subprocess_env(MMTRAIN_FAULT=fault), capture_output=True,
                         text=True, timeout=300)
    return out, time.time() - t0


def _started(run):
    """Seconds from the first logged step's heartbeat to the end are what the timeout bounds."""
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_stalled_rank_is_named_and_the_job_ends(tmp_path):
    run = tmp_path / "run"
    out, took = _torchrun(run, "hang@3:rank=1")
    assert out.returncode != 0
    err = out.stderr
    # the stalled rank's watchdog says where it is and exits
    assert re.search(r"^rank 1 stuck in step 3 \(last phase: forward, [\d.]+ s >= "
                     r"parallel.timeout_s=10\); heartbeats: rank 0: step 3 ", err, re.M), err[-3000:]
    # rank 0, waiting in a collective, names it and the culprit
    line = next((l for l in err.splitlines()
                 if l.startswith(("error: rank 0: collective", "rank 0 stuck"))), None)
    assert line is not None, err[-3000:]
    assert "all_reduce" in line and "rank 1" in line and "step 3" in line, line
    assert _started(run) == [1, 2]
    assert took < 2 * TIMEOUT_S + 60  # startup + the timeout, not forever
    beats = json.loads((run / "heartbeat" / "rank_00001.json").read_text())
    assert beats["step"] == 3 and beats["phase"] == "forward" and "stuck" in beats["exited"]


def test_dead_rank_is_named_and_the_job_ends(tmp_path):
    run = tmp_path / "run"
    out, took = _torchrun(run, "crash@3:rank=1")
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.startswith("error: rank 0: collective")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert re.match(r"error: rank 0: collective all_reduce\(dp\) loss stats in step 3 failed "
                    r"after [\d.]+ s \(.*\); likely culprit: rank 1 \(last heartbeat", lines[0]), \
        lines[0]
    assert took < TIMEOUT_S + 60
