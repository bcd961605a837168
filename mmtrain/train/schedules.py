"""Schedules by tokens: the global-batch warm-up and the learning rate.

Both are pure functions of the optimizer step (and the recipe), so a resumed run continues them
exactly mid-schedule with nothing stored but the step.

**Batch schedule** (``train.batch_schedule``, SPEC §7's 16M -> 32M at 69B -> 64M at 790B -> 128M at
4.7T tokens): a list of ``[at_tokens, batch_tokens]``; a step that *starts* with ``t`` tokens
already consumed uses the batch of the last entry with ``at_tokens <= t``, i.e.
``batch_tokens / data.seq_len`` rows. Without a schedule every step has ``train.global_batch``
rows. ``tokens_before(s)`` (closed form per segment) and ``rows(s)`` follow.

**Token budget** (``train.max_tokens > 0``): ``max_steps`` becomes the number of steps needed to
consume it (the last step may overshoot by less than one batch).

**Learning rate**: linear warm-up over ``warmup_steps`` steps, then ``constant``; ``cosine`` to
min_lr; ``exp_decay`` (constant, then geometric decay to min_lr) or ``wsd`` (warm-up, stable,
linear decay to min_lr). The decay starts at ``decay_start_tokens`` when a token budget is set
(else at step ``decay_start``) and reaches min_lr at the last step; with a token budget progress
is measured in tokens, so a growing batch does not distort it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmtrain.config import ConfigError, TrainConfig

MI = 1 << 20  # the paper's "16M tokens" batches are 16·2^20 (2048 rows of 8192)


def validate_train_schedules(cfg: TrainConfig, path: str = "train") -> None:
    if cfg.max_tokens < 0:
        raise ConfigError(f"{path}.max_tokens: must be >= 0 (0 = use max_steps), got {cfg.max_tokens}")
    if cfg.decay_start_tokens < 0:
        raise ConfigError(f"{path}.decay_start_tokens: must be >= 0, got {cfg.decay_start_tokens}")
    if cfg.decay_start_tokens and cfg.max_tokens and cfg.decay_start_tokens >= cfg.max_tokens:
        raise ConfigError(f"{path}.decay_start_tokens: {cfg.decay_start_tokens} is not below "
                          f"train.max_tokens={cfg.max_tokens}; start the decay earlier")
    bs = cfg.batch_schedule
    if bs is None:
        return
    fix = "write it as [[0, batch_tokens], [at_tokens, batch_tokens], ...] with at_tokens rising"
    if not isinstance(bs, list) or not bs:
        raise ConfigError(f"{path}.batch_schedule: expected a non-empty list of pairs; {fix}")
    prev = -1
    for i, pair in enumerate(bs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair):
            raise ConfigError(f"{path}.batch_schedule: entry {i} ({pair!r}) is not a pair of "
                              f"numbers; {fix}")
        at, b = pair
        if (i == 0 and at != 0) or at <= prev or b <= 0 or at != int(at) or b != int(b):
            raise ConfigError(f"{path}.batch_schedule: entry {i} ({pair!r}) is out of order or not "
                              f"a positive integer; {fix}")
        prev = at


@dataclass
class BatchSchedule:
    """Rows per step as a function of the step (see the module docstring)."""

    seq_len: int
    global_batch: int  # rows, used when there is no schedule
    points: tuple = ()  # ((at_tokens, rows), ...)

    @classmethod
    def from_config(cls, tcfg: TrainConfig, seq_len: int) -> "BatchSchedule":
        if not tcfg.batch_schedule:
            return cls(seq_len, tcfg.global_batch)
        pts = []
        for at, b in tcfg.batch_schedule:
            at, b = int(at), int(b)
            if b % seq_len:
                raise ConfigError(f"train.batch_schedule: batch of {b} tokens is not a multiple of "
                                  f"data.seq_len={seq_len}; use multiples of {seq_len}")
            pts.append((at, b // seq_len))
        return cls(seq_len, pts[0][1], tuple(pts))

    @property
    def row_sizes(self) -> list[int]:
        return [r for _, r in self.points] if self.points else [self.global_batch]

    def _segments(self):
        """(first_step, tokens_at_first_step, rows) of each segment, in order."""
        if not self.points:
            yield 0, 0, self.global_batch
            return
        step, tok = 0, 0
        T = self.seq_len
        for i, (at, rows) in enumerate(self.points):
            if i + 1 < len(self.points) and self.points[i + 1][0] <= tok:
                continue  # skipped over entirely (an earlier batch overshot it)
            yield step, tok, rows
            if i + 1 < len(self.points):
                nxt = self.points[i + 1][0]
                n = max(0, math.ceil((nxt - tok) / (rows * T)))
                step += n
                tok += n * rows * T

    def _segment(self, step: int):
        seg = None
        for s in self._segments():
            if s[0] > step:
                break
            seg = s
        return seg

    def rows(self, step: int) -> int:
        """Global batch rows of optimizer step ``step`` (0-based)."""
        return self._segment(step)[2]

    def rows_before(self, step: int) -> int:
        first, tok, rows = self._segment(step)
        return tok // self.seq_len + (step - first) * rows

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps ``0..step-1``."""
        return self.rows_before(step) * self.seq_len

    def steps_for(self, tokens: int) -> int:
        """The fewest steps that consume at least ``tokens`` tokens."""
        best = None
        for first, tok, rows in self._segments():
            if tok >= tokens:
                break
            best = first + math.ceil((tokens - tok) / (rows * self.seq_len))
        return max(best or 0, 1)


def resolve_max_steps(tcfg: TrainConfig, seq_len: int) -> int:
    """``train.max_steps``, or the steps of the token budget when ``train.max_tokens > 0``."""
    if tcfg.max_tokens > 0:
        return BatchSchedule.from_config(tcfg, seq_len).steps_for(tcfg.max_tokens)
    return tcfg.max_steps


def lr_at(step: int, tcfg: TrainConfig, sched: BatchSchedule | None = None) -> float:
    """Learning rate of optimizer step ``step`` (see the module docstring)."""
    if tcfg.warmup_steps and step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    if tcfg.schedule == "constant":
        return tcfg.lr
    by_tokens = tcfg.max_tokens > 0 and sched is not None
    if by_tokens:
        now = sched.tokens_before(step)
        end = sched.tokens_before(max(tcfg.max_steps - 1, 0))
        warm = sched.tokens_before(tcfg.warmup_steps)
        start = tcfg.decay_start_tokens or sched.tokens_before(tcfg.decay_start)
    else:
        now, end, warm, start = step, max(tcfg.max_steps - 1, 0), tcfg.warmup_steps, tcfg.decay_start
    if tcfg.schedule == "cosine":
        if not by_tokens:  # the step form as before: span max_steps - warmup_steps
            end = tcfg.max_steps
        frac = min(max(now - warm, 0) / max(end - warm, 1), 1.0)
        return tcfg.min_lr + 0.5 * (tcfg.lr - tcfg.min_lr) * (1.0 + math.cos(math.pi * frac))
    start = max(start, warm)
    if now < start:
        return tcfg.lr
    frac = min((now - start) / max(end - start, 1), 1.0)
    if tcfg.schedule == "wsd":
        return tcfg.lr + (tcfg.min_lr - tcfg.lr) * frac
    floor = tcfg.min_lr if tcfg.min_lr > 0 else tcfg.lr * 1e-3
    return tcfg.lr * (floor / tcfg.lr) ** frac
