"""The stateful, deterministic loader: which rows each data-parallel rank sees at each step.

Legend: R rows in the dataset, G ``global_batch`` rows per optimizer step, m ``micro_batch`` rows
per forward/backward, d ``dp_size`` ranks, k = G / (m·d) micro-batches per rank per step.

The order is one flat sequence of *global positions* p = 0, 1, 2, ...:

* position p lies in epoch ``e = p // R`` and maps to row ``perm_e[p % R]``, where ``perm_e`` is
  ``torch.randperm(R)`` drawn from a ``torch.Generator`` seeded with ``seed + e``;
* optimizer step s consumes positions ``[s·G, (s+1)·G)`` (a step may straddle two epochs);
* rank r takes the contiguous slice ``[r·G/d, (r+1)·G/d)`` of them and splits it, in order, into
  k micro-batches of m rows.

Hence one process (d = 1) produces exactly the micro-batches that d ranks produce together, in
rank-major order, and the state is a single integer, ``consumed_rows`` (positions consumed by all
ranks). ``state_dict()`` is JSON-serialisable; ``load_state_dict`` resumes at exactly the next
sample, also under another dp size or global batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mmtrain.config import ConfigError
from mmtrain.data.batch import Batch
from mmtrain.data.packing import collate

STATE_VERSION = 1


class DataLoader:
    """This rank's micro-batches, one optimizer step at a time (see the module docstring)."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in 0..dp_size-1 with dp_size={dp_size} >= 1")
        if global_batch < 1 or micro_batch < 1:
            raise ConfigError(f"train.global_batch: global_batch={global_batch} and micro_batch="
                              f"{micro_batch} must both be >= 1")
        per_step = micro_batch * dp_size
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch: {global_batch} is not divisible by train.micro_batch × dp = "
                f"{micro_batch} × {dp_size} = {per_step}; set train.global_batch to a multiple of "
                f"{per_step} (e.g. {max(per_step, global_batch // per_step * per_step)}) or change "
                f"train.micro_batch")
        n = len(dataset)
        if n < global_batch:
            seq_len = getattr(dataset, "seq_len", "?")
            raise ConfigError(
                f"data.corpus: gives {n} rows of data.seq_len={seq_len} tokens, fewer than one "
                f"global batch (train.global_batch={global_batch}); the corpus is too small for "
                f"train.global_batch × data.seq_len: use a larger corpus (or data.corpus_max_bytes), "
                f"a smaller data.seq_len or a smaller train.global_batch")
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.consumed_rows = 0
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation (at most two kept)

    # ---------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows / self.global_batch

    @property
    def epoch(self) -> int:
        """The epoch of the next position to be consumed."""
        return self.consumed_rows // self.num_rows

    def permutation(self, epoch: int) -> np.ndarray:
        """[R] int64 row order of ``epoch`` (``torch.randperm`` seeded with ``seed + epoch``)."""
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_rows, generator=g).numpy()
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def rows_at(self, start: int, stop: int) -> np.ndarray:
        """Dataset row indices of global positions ``[start, stop)``."""
        pos = np.arange(start, stop, dtype=np.int64)
        epochs = pos // self.num_rows
        out = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.permutation(e)[pos[sel] % self.num_rows]
        return out

    def step_rows(self, step: int) -> list[np.ndarray]:
        """This rank's row indices for optimizer step ``step``, one array per micro-batch."""
        G, d, m = self.global_batch, self.dp_size, self.micro_batch
        start = step * G + self.dp_rank * (G // d)
        rows = self.rows_at(start, start + G // d)
        return [rows[i:i + m] for i in range(0, len(rows), m)]

    # ---------------------------------------------------------------------------------------------
    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances the state by one step."""
        if self.consumed_rows % self.global_batch:
            raise RuntimeError(f"consumed_rows={self.consumed_rows} is not a multiple of global_batch="
                               f"{self.global_batch}; resume with the global batch that saved it")
        step = self.consumed_rows // self.global_batch
        batches = [collate([self.dataset.row(int(i)) for i in idx]) for idx in self.step_rows(step)]
        self.consumed_rows += self.global_batch
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state (ints only). Identical on every rank."""
        return {"version": STATE_VERSION, "consumed_rows": self.consumed_rows, "seed": self.seed,
                "global_batch": self.global_batch, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue at exactly the next sample after the one ``state`` was saved at.

        With ``strict`` (default) a different seed or dataset size is an error, since the order
        of rows would differ from the run that saved the state. A different ``global_batch`` is
        allowed when the consumed rows are a multiple of the new one.
        """
        if state.get("kind", "packed") != "packed":
            raise ConfigError("data.blend: the checkpoint's data loader state is a blend "
                              "sampler's (saved with data.blend, data.mixture or "
                              "train.batch_schedule); resume with the recipe that saved it")
        if strict:
            if int(state["seed"]) != self.seed:
                raise ConfigError(f"data.seed: the saved loader state used seed {state['seed']}, this "
                                  f"run {self.seed}; set data.seed={state['seed']} to resume the "
                                  f"same order")
            if int(state.get("num_rows", self.num_rows)) != self.num_rows:
                raise ConfigError(f"data.corpus: the saved loader state saw {state['num_rows']} rows, "
                                  f"this dataset has {self.num_rows}; resume with the same corpus, "
                                  f"tokenizer, corpus_max_bytes and seq_len")
        consumed = int(state["consumed_rows"])
        if consumed < 0 or consumed % self.global_batch:
            raise ConfigError(f"train.global_batch: the saved loader consumed {consumed} rows, not a "
                              f"multiple of train.global_batch={self.global_batch}; resume with "
                              f"global_batch={state.get('global_batch')}")
        self.consumed_rows = consumed

    def __repr__(self) -> str:
        return (f"DataLoader(rows={self.num_rows}, global_batch={self.global_batch}, "
                f"micro_batch={self.micro_batch}, dp_rank={self.dp_rank}/{self.dp_size}, "
                f"seed={self.seed}, consumed_rows={self.consumed_rows})")
