"""Graceful stop: SIGTERM or SIGUSR1 (Slurm's time limit or preemption, ``sbatch --signal``,
``scancel --signal``, torchrun's shutdown) or Ctrl-C lets the current step finish, writes a
checkpoint and returns, so a run loses nothing. A second Ctrl-C stops at once.

Every rank reports its flags in the per-step statistics all-reduce, so all ranks stop after the
same step even when only one of them was signalled. SIGTERM and SIGUSR1 count as a preemption
(the run says ``preempted at step N``); Ctrl-C as a stop on request.
"""

from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, announce: bool = True):
        self.requested = False
        self.preempted = False  # SIGTERM / SIGUSR1 (not Ctrl-C)
        self.announce = announce
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.preempted = self.preempted or signum != signal.SIGINT
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a "
                  f"checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
