"""Heartbeats and a watchdog, so a dead or stalled rank ends the job with a line, not a hang.

The loop tells :class:`Watchdog` where it is (``phase(name, step)``: data, forward, each
collective, optimizer, checkpoint). A daemon thread

* writes ``<run dir>/heartbeat/rank_RRRRR.json`` (rank, step, phase, seconds in the phase) about
  once a second when it changed, and a final record (``"exited": reason``) when the run ends;
* when one phase has lasted ``parallel.timeout_s``, prints
  ``rank R stuck in step N (last phase: P, T s); heartbeats: ...`` (every rank's last record) to
  stderr and exits the process with status 3.

A collective that fails (gloo raises when a peer closes its connection or after the process
group timeout, which is also ``parallel.timeout_s``) is turned by :meth:`Watchdog.failure` into a
one-line :class:`TrainingAborted` naming this rank, the collective, the step, and the ranks whose
heartbeat shows them elsewhere (the likely culprits: dead or stalled).

Active only when the world has more than one rank; in a single process every call is a no-op
apart from phase bookkeeping.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from mmtrain.train import faults
from mmtrain.train.health import TrainingAborted

STUCK_EXIT = 3


class Watchdog:
    def __init__(self, run_dir, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout = rank, world, float(timeout_s)
        self.enabled = world > 1
        self.dir = Path(run_dir) / "heartbeat"
        self.step, self.phase_name, self.since = 0, "startup", time.time()
        self._written = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        self.interval = max(0.2, min(0.5, self.timeout / 10))

    # ------------------------------------------------------------------ main thread
    def start(self) -> "Watchdog":
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write()
            self._thread = threading.Thread(target=self._run, name="mmtrain-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def phase(self, name: str, step: int) -> None:
        """Enter phase ``name`` of logged step ``step``; runs the fault hook of that phase."""
        with self._lock:
            self.step, self.phase_name, self.since = step, name, time.time()
        faults.point(name.split(" ", 1)[0], step)

    def stop(self, reason: str) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._write(exited=reason)

    def failure(self, exc: BaseException) -> TrainingAborted:
        """The one-line error for a collective that raised ``exc`` in the current phase."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first if len(first) < 300 else first[:300] + "..."
        took = time.time() - self.since
        return TrainingAborted(
            f"rank {self.rank}: collective {self.phase_name} in step {self.step} failed after "
            f"{took:.1f} s ({type(exc).__name__}: {first}); {self._culprits()}",
            exit_code=STUCK_EXIT, every_rank=True)

    # ------------------------------------------------------------------ heartbeats
    def _record(self, exited: str | None = None) -> dict:
        with self._lock:
            rec = {"rank": self.rank, "step": self.step, "phase": self.phase_name,
                   "in_phase_s": round(time.time() - self.since, 2), "time": time.time(),
                   "pid": os.getpid()}
        if exited:
            rec["exited"] = exited
        return rec

    def _write(self, exited: str | None = None) -> None:
        rec = self._record(exited)
        key = (rec["step"], rec["phase"], exited)
        if key == self._written:
            return
        path = self.dir / f"rank_{self.rank:05d}.json"
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, path)
            self._written = key
        except OSError:
            pass  # a heartbeat must never kill the run

    def heartbeats(self) -> dict[int, dict]:
        out = {}
        for r in range(self.world):
            try:
                out[r] = json.loads((self.dir / f"rank_{r:05d}.json").read_text())
            except (OSError, ValueError):
                pass
        return out

    def _culprits(self) -> str:
        beats = self.heartbeats()
        now = time.time()
        me = (self.step, self.phase_name)
        others = []
        for r in range(self.world):
            if r == self.rank:
                continue
            b = beats.get(r)
            if b is None:
                others.append(f"rank {r} (no heartbeat)")
            elif (b["step"], b["phase"]) != me or b.get("exited"):
                others.append(f"rank {r} (last heartbeat {now - b['time']:.1f} s ago: step "
                              f"{b['step']}, phase {b['phase']}"
                              + (f", exited: {b['exited']}" if b.get("exited") else "") + ")")
        if not others:
            return "every rank's heartbeat shows the same phase (a network or peer failure)"
        return "likely culprit: " + "; ".join(others) + " — it died or stalls"

    def summary(self) -> str:
        beats = self.heartbeats()
        now = time.time()
        return "; ".join(f"rank {r}: step {b['step']} {b['phase']} "
                         f"({now - b['time']:.1f} s ago)" for r, b in sorted(beats.items()))

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            with self._lock:
                stuck = time.time() - self.since
                step, name = self.step, self.phase_name
            if stuck >= self.timeout:
                self._write(exited=f"stuck in {name}")
                print(f"rank {self.rank} stuck in step {step} (last phase: {name}, {stuck:.1f} s "
                      f">= parallel.timeout_s={self.timeout:g}); heartbeats: {self.summary()}",
                      file=sys.stderr, flush=True)
                os._exit(STUCK_EXIT)
