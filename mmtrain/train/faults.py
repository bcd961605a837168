"""Test-only fault injection: ``MMTRAIN_FAULT`` makes the trainer misbehave on purpose.

Read in this one place; unset (the normal case) every hook is a no-op. Never set it in a real run.

    MMTRAIN_FAULT="<fault>[,<fault>...]"      fault = kind@steps[:key=value...]

``steps``: ``N`` (1-based step number as logged), ``N-M`` (inclusive) or ``N+`` (N and after).
Keys: ``rank=R`` (only on global rank R; default every rank), ``phase=P`` (where it fires, see
below), ``secs=S`` (for ``slow``), ``always=1`` (``crash``: also after a torchrun restart).

Kinds that change numbers (checked by the loop with :func:`active`):
  ``nan_loss``   the step's loss (and hence every gradient) is multiplied by NaN
  ``inf_loss``   ... by +inf
  ``nan_grad``   one gradient element becomes NaN after the backward (the loss stays finite)
  ``spike_loss`` the step's loss (and gradients) are multiplied by 10

Kinds that act at a phase (:func:`point`, called by the loop and by ``checkpoint.save``):
  ``crash``  ``os._exit(13)``; only in the first attempt of a torchrun job
             (``TORCHELASTIC_RESTART_COUNT`` unset or 0) unless ``always=1``; default phase forward
  ``hang``   sleep forever (a stalled rank); default phase forward
  ``slow``   sleep ``secs`` (default 0.2); default phase step
  ``kill``   SIGKILL this process (what the kill trials use); default phase step

Phases: ``step`` (start of a step), ``forward`` (after the first micro-batch's backward),
``ckpt_start`` (checkpoint temp dir made, nothing written), ``ckpt_write`` (tensors written, no
rank state yet), ``data_state`` (half of this rank's loader/RNG JSON written), ``commit``
(meta.json written, not yet renamed into place), ``rename`` (renamed, directory not yet synced,
older checkpoints not yet pruned), ``prune`` (one old checkpoint moved aside, not yet deleted).
For checkpoint phases ``steps`` is the step being saved.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass

ENV = "MMTRAIN_FAULT"
DEFAULT_PHASE = {"crash": "forward", "hang": "forward", "slow": "step", "kill": "step"}
NUMERIC = ("nan_loss", "inf_loss", "nan_grad", "spike_loss")
KINDS = NUMERIC + tuple(DEFAULT_PHASE)


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: float  # inclusive; inf for "N+"
    rank: int | None = None
    phase: str | None = None
    secs: float = 0.2
    always: bool = False

    def hits(self, step: int, rank: int) -> bool:
        return self.first <= step <= self.last and self.rank in (None, rank)


@functools.lru_cache(maxsize=8)
def parse(spec: str) -> tuple[Fault, ...]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, *opts = item.split(":")
        kind, _, steps = head.partition("@")
        if kind not in KINDS or not steps:
            raise ValueError(f"{ENV}: bad fault '{item}'; use kind@steps with kind one of {KINDS}")
        if steps.endswith("+"):
            first, last = int(steps[:-1]), float("inf")
        elif "-" in steps:
            a, b = steps.split("-", 1)
            first, last = int(a), float(b)
        else:
            first = int(steps)
            last = float(first)
        kw = dict(o.split("=", 1) for o in opts)
        out.append(Fault(kind, first, last,
                         rank=int(kw["rank"]) if "rank" in kw else None,
                         phase=kw.get("phase", DEFAULT_PHASE.get(kind)),
                         secs=float(kw.get("secs", 0.2)),
                         always=kw.get("always", "0") not in ("0", "")))
    return tuple(out)


def faults() -> tuple[Fault, ...]:
    spec = os.environ.get(ENV, "")
    return parse(spec) if spec else ()


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def active(kind: str, step: int) -> bool:
    """Whether a numeric fault of ``kind`` applies to logged step ``step`` on this rank."""
    if not os.environ.get(ENV):
        return False
    rank = _rank()
    return any(f.kind == kind and f.hits(step, rank) for f in faults())


def loss_factor(step: int) -> float:
    """What the loss of logged step ``step`` is multiplied by on this rank (1.0 normally)."""
    if not os.environ.get(ENV):
        return 1.0
    factor = 1.0
    for kind, value in (("nan_loss", float("nan")), ("inf_loss", float("inf")),
                        ("spike_loss", 10.0)):
        if active(kind, step):
            factor *= value
    return factor


def point(phase: str, step: int) -> None:
    """Run the phase faults that apply here (no-op unless ``MMTRAIN_FAULT`` is set)."""
    if not os.environ.get(ENV):
        return
    rank = _rank()
    for f in faults():
        if f.phase != phase or f.kind in NUMERIC or not f.hits(step, rank):
            continue
        if f.kind == "slow":
            time.sleep(f.secs)
        elif f.kind == "hang":
            while True:
                time.sleep(3600)
        elif f.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.kind == "crash":
            if f.always or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                import sys

                print(f"{ENV}: rank {rank} crashes in step {step} ({phase})", file=sys.stderr,
                      flush=True)
                os._exit(13)
