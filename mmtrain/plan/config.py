"""The planner's inputs: the cluster (``recipes/cluster/``), the planner's options (``plan.*``), a
layout (the parallel sizes one candidate uses) and a stage (sequence length and global batch).

Plain data with their validation and nothing of the model: ``mmtrain plan`` builds the first two
from overrides (a ConfigError names the field and the fix), the search enumerates layouts, and the
tests build all four by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mmtrain.config import _fail

GIB = float(2 ** 30)
RECOMPUTE = ("none", "selective", "full")
#: mmtrain's order of the rank grids (parallel/topology.py); the time model's group strides
#: (timing.py) and the search's Topology check follow it.
ORDER = "tp-cp-ep-dp-pp"


# ----------------------------------------------------------------------------------- configs
@dataclass
class ClusterConfig:
    """A cluster (``recipes/cluster/<gpu>.yaml``; ``cluster.gpu=NAME`` picks the file)."""

    gpu: str = "h800"
    gpus: int = 8
    gpus_per_node: int = 8
    memory_gib: float = 79.6
    bf16_tflops: float = 989.0
    hbm_tbs: float = 3.35
    nvlink_gbs: float = 400.0  # per GPU, both directions together (datasheet)
    ib_gbs: float = 50.0  # per GPU, one direction
    bus_efficiency: float = 0.8
    a2a_efficiency: float = 0.6

    def validate(self, path: str = "cluster") -> None:
        for name in ("gpus", "gpus_per_node"):
            if getattr(self, name) < 1:
                _fail(f"{path}.{name}", f"must be a positive integer, got {getattr(self, name)}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            _fail(f"{path}.gpus", f"{self.gpus} GPUs are not whole nodes of "
                  f"{self.gpus_per_node}; use a multiple of cluster.gpus_per_node")
        for name in ("memory_gib", "bf16_tflops", "hbm_tbs", "nvlink_gbs", "ib_gbs"):
            if not getattr(self, name) > 0:
                _fail(f"{path}.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("bus_efficiency", "a2a_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                _fail(f"{path}.{name}", f"must be in (0, 1], got {getattr(self, name)}")

    # effective one-way bandwidths, bytes/s
    def nvlink_bw(self) -> float:
        return self.nvlink_gbs / 2 * 1e9

    def ib_bw(self) -> float:
        return self.ib_gbs * 1e9


@dataclass
class PlanConfig:
    """Planner options (``plan.*`` overrides)."""

    recompute: str = "auto"  # none | selective | full | auto (search all three)
    # fp32 (train.param_dtype=fp32; the path docs/plan.md's validation measured) | bf16 (bf16
    # parameters with fp32 masters: the trainer's default on GPUs, train.param_dtype=auto)
    param_dtype: str = "fp32"
    efficiency: float = 0.4  # achieved fraction of the bf16 peak by the model's FLOPs
    headroom: float = 0.1  # fraction of GPU memory kept free (allocator, CUDA context, NCCL)
    global_batch_tokens: Optional[int] = None  # null: train.global_batch rows × data.seq_len
    search: bool = True  # false: evaluate the recipe's layout only
    top: int = 5
    max_tp: Optional[int] = None  # null: cluster.gpus_per_node
    max_etp: Optional[int] = None  # null: cluster.gpus_per_node
    # null: as the recipe trains (parallel.cp_balance != contiguous; train.fused_ce)
    cp_balanced: Optional[bool] = None  # false: contiguous CP chunks, causal work imbalanced
    fused_ce: Optional[bool] = None  # true: the chunked linear cross-entropy (train.fused_ce)

    def validate(self, path: str = "plan") -> None:
        if self.recompute not in RECOMPUTE + ("auto",):
            _fail(f"{path}.recompute", f"unknown '{self.recompute}'; use none, selective, full "
                  f"or auto")
        if self.param_dtype not in ("fp32", "bf16"):
            _fail(f"{path}.param_dtype", f"unknown '{self.param_dtype}'; use fp32 or bf16")
        if not 0 < self.efficiency <= 1:
            _fail(f"{path}.efficiency", f"must be in (0, 1], got {self.efficiency}")
        if not 0 <= self.headroom < 1:
            _fail(f"{path}.headroom", f"must be in [0, 1), got {self.headroom}")
        if self.global_batch_tokens is not None and self.global_batch_tokens < 1:
            _fail(f"{path}.global_batch_tokens", f"must be >= 1 or null, got "
                  f"{self.global_batch_tokens}")
        if self.top < 1:
            _fail(f"{path}.top", f"must be >= 1, got {self.top}")
        for name in ("max_tp", "max_etp"):
            v = getattr(self, name)
            if v is not None and v < 1:
                _fail(f"{path}.{name}", f"must be >= 1 or null, got {v}")


@dataclass(frozen=True)
class Layout:
    """One candidate: the dense grid (tp, cp, pp, dp), the expert grid (ep, etp, edp; as in
    ``Topology``, ``edp = world / (pp·ep·etp)``), the micro-batch, recomputation and ZeRO-1.
    Frozen: a candidate is a value that the memory and time models only read."""

    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int
    micro_batch: int  # rows per forward/backward on one DP rank
    recompute: str
    zero1: bool

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def name(self) -> str:
        return (f"tp{self.tp} cp{self.cp} pp{self.pp} dp{self.dp} | ep{self.ep} etp{self.etp} "
                f"edp{self.edp} | mb{self.micro_batch} {self.recompute}"
                + ("" if self.zero1 else " no-zero1"))


@dataclass
class Stage:
    """The sequence length and the global batch in rows (``plan.global_batch_tokens`` is turned
    into whole rows by the CLI)."""

    seq_len: int
    global_rows: int

    @property
    def global_tokens(self) -> int:
        return self.seq_len * self.global_rows

