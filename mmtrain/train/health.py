"""Step health: non-finite steps are skipped, too many in a row stop the run; optional spike log.

A step whose loss or global gradient norm is NaN/Inf does not touch the weights or the optimizer
state (``optimizer.step()`` is not called, the gradients are dropped). The step still counts: the
learning-rate schedule and the data loader move on, and ``metrics.jsonl`` records it with
``"skipped": true`` (its ``loss`` / ``grad_norm`` written as ``null`` when non-finite). Both values
are global (the loss comes out of the per-step all-reduce, the norm out of the clipping
reduction), so every rank takes the same decision without another collective.

``train.max_bad_steps`` consecutive skipped steps stop the run with :class:`TrainingAborted`: one
line naming the steps, the last good checkpoint and the likely causes (no checkpoint is written:
the newest one on disk is the last good state).

``train.spike_factor`` > 0 turns on a loss-spike log: a finite loss above ``spike_factor`` times
the running mean of the previous steps (an exponential mean, 0.9 decay, after 10 steps) is
flagged ``"spike": true`` in its record and announced in one line. It only logs; it changes
nothing, and its running mean starts afresh on resume.
"""

from __future__ import annotations

import math


class TrainingAborted(RuntimeError):
    """Training cannot go on; the message is one line. ``exit_code`` for the CLI, and whether
    every rank should print it (its own view) or only rank 0 (all ranks agree)."""

    def __init__(self, message: str, exit_code: int = 3, every_rank: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.every_rank = every_rank


def finite_or_none(x: float):
    return x if math.isfinite(x) else None


class StepHealth:
    def __init__(self, max_bad_steps: int, spike_factor: float = 0.0):
        self.max_bad = max_bad_steps
        self.spike_factor = spike_factor
        self.bad_run: list[int] = []  # consecutive skipped steps (logged numbers)
        self.skipped_total = 0
        self._mean = None
        self._seen = 0

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when step ``step`` (logged number) must be skipped."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if bad:
            self.bad_run.append(step)
            self.skipped_total += 1
        else:
            self.bad_run = []
        return bad

    def what(self, loss: float, grad_norm: float) -> str:
        parts = []
        if not math.isfinite(loss):
            parts.append(f"loss {loss}")
        if not math.isfinite(grad_norm):
            parts.append(f"grad norm {grad_norm}")
        return " and ".join(parts)

    def must_stop(self) -> bool:
        return len(self.bad_run) >= self.max_bad

    def abort(self, last_good_checkpoint) -> TrainingAborted:
        first, last = self.bad_run[0], self.bad_run[-1]
        where = (f"the last good checkpoint is {last_good_checkpoint} (resume from it)"
                 if last_good_checkpoint is not None else "there is no checkpoint yet")
        return TrainingAborted(
            f"train.max_bad_steps: {len(self.bad_run)} consecutive steps ({first}..{last}) had a "
            f"non-finite loss or gradient norm; stopped at step {last}, nothing saved; {where}; "
            f"likely causes: learning rate too high (lower train.lr, raise train.warmup_steps, "
            f"set train.grad_clip), bf16 overflow, or bad data in those steps")

    def spike(self, loss: float) -> float | None:
        """The running mean when ``loss`` is a spike, else None (updates the mean)."""
        if self.spike_factor <= 0 or not math.isfinite(loss):
            return None
        mean, hit = self._mean, None
        if mean is not None and self._seen >= 10 and loss > self.spike_factor * mean:
            hit = mean
        self._mean = loss if mean is None else 0.9 * mean + 0.1 * loss
        self._seen += 1
        return hit
