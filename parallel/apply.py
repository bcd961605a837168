"""``parallelize(model, topology, groups, ...)``: turn the plain single-device model into this
rank's piece of a TP × DP layout (the shard plan, :func:`shard_model`), and hand back a
:class:`Parallel` that the training loop uses for everything distributed (data sharding, loss,
gradient sync, clipping, where each local shard sits in the full tensors).

The model code stays plain; this file swaps modules from outside (a plan per module kind), in
place, keeping every parameter's FQN. With tp = T, rank t of a TP group, H heads, G KV heads,
K head dim, Hl = H/T and h0 = t·Hl:

==========================  ====================================================================
module                      under TP (always with sequence parallelism)
==========================  ====================================================================
embed                       :class:`VocabParallelEmbedding`, rows [t·V/T, (t+1)·V/T), partial
                            lookups reduce-scattered along T
lightning attention         one TP region (input all-gathered, output reduce-scattered by hooks):
                            qkv_proj rows [h0·3K, (h0+Hl)·3K) (per-head layout: contiguous), gate
                            rows [h0·K, (h0+Hl)·K), out_proj columns likewise, slopes[h0:h0+Hl],
                            the output norm a :class:`TPRMSNorm` (full-width variance)
softmax attention           one TP region: q rows of the local heads; k/v rows of the local KV
                            heads when T divides G, else (G divides T) the full k/v weights kept
                            replicated and sliced to the one KV head of the rank's query heads
MoE                         router replicated, each TP rank routes its own sequence shard;
                            capacity and aux loss over groups of ranks
                            (:class:`~mmtrain.parallel.moe.GroupBalance`); with ep·etp > 1 the
                            experts are sharded and the all-to-all dispatcher installed
                            (:func:`~mmtrain.parallel.moe.shard_experts`)
norms                       replicated, run on the rank's sequence shard
lm_head                     :class:`ColumnParallelLinear` (vocab rows), input all-gathered;
                            logits stay vocab-sharded for the vocab-parallel cross-entropy
==========================  ====================================================================

Everything here works on a model built on the meta device (:func:`shard_model` swaps modules and
touches no value; :class:`Parallel` then allocates only the local shards), and records where each
local tensor sits in its full tensor (``Parallel.shards``: ``{fqn: (full shape, pieces)}``, the
geometry of :mod:`mmtrain.model.init`). Initialisation and sharded checkpoints build on those
pieces in :mod:`mmtrain.train.distributed`; this package imports nothing from ``mmtrain.train``.

Context parallelism (cp = C, :mod:`mmtrain.parallel.context`): every rank keeps all of its TP
shard's weights (replicated over CP); :meth:`Parallel.shard_batch` gives the rank its pieces of
every row (``parallel.cp_balance``: zigzag pieces r and 2C-1-r of 2C, or the contiguous r-th of
C); the lightning cores become LASP+ (or LASP, ``parallel.cp_lightning``, contiguous only), the
softmax cores Varlen Ring Attention (:mod:`mmtrain.parallel.ring`), the MoE routes the rank's
tokens with local capacity judged over the TP×CP group (slots ranked by TP×CP rank, then local
token: the global token order only for one-row micro-batches under the contiguous partition)
and its aux loss over every rank (TP×DP×CP). Gradients then reduce over DP×CP (``dp_cp`` for
TP-split weights, ``tp_dp_cp`` for replicated ones); experts over EDP, which spans DP×CP×TP
when ep = etp = 1.

Unsupported layouts fail in :func:`check_layout` (before any process group exists) with a
ConfigError naming the field: pp > 1 arrives in a later issue; TP needs sequence
parallelism.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.config import Config, ConfigError, ParallelConfig
from mmtrain.model.init import Piece, whole
from mmtrain.parallel.context import auto_rounds
from mmtrain.parallel.data import GradSync, ParamInfo, clip_grad_norm
from mmtrain.parallel.moe import GroupBalance, shard_experts
from mmtrain.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, SlicedLinear,
                                     TPRMSNorm, VocabParallelEmbedding,
                                     gather_from_sp, reduce_scatter_to_sp,
                                     vocab_parallel_cross_entropy,
                                     vocab_parallel_linear_cross_entropy)
from mmtrain.parallel.topology import Topology

__all__ = ["check_layout", "check_context", "shard_model", "ShardPlan", "parallelize", "Parallel",
           "GROUPS_USED"]

#: Process groups the trainer needs.
GROUPS_USED = ("tp", "cp", "dp", "dp_cp", "tp_cp", "tp_dp", "tp_dp_cp", "ep", "etp", "edp")

_LATER = {
    "pp": "pipeline parallelism is not implemented yet",
}


def check_context(cfg: Config) -> None:
    """The sizes context parallelism needs (pure; also used by ``mmtrain info``)."""
    c = cfg.parallel.cp
    k = cfg.parallel.cp_zigzag_rounds or auto_rounds(c, cfg.parallel.cp_balance, cfg.data.seq_len)
    if c > 1 and cfg.parallel.cp_balance == "zigzag" and cfg.data.seq_len % (2 * c * k):
        rounds = f" × parallel.cp_zigzag_rounds={k}" if k > 1 else ""
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} tokens per row do not split into "
                          f"2·cp{rounds} = {2 * c * k} pieces (parallel.cp_balance=zigzag: CP "
                          f"rank r holds pieces r and {2 * c - 1}-r of every {2 * c}); make it a "
                          f"multiple of {2 * c * k}"
                          + (", or lower parallel.cp_zigzag_rounds" if k > 1 else "")
                          + ", or set parallel.cp_balance=contiguous")
    if cfg.data.seq_len % c:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} tokens per row do not split over "
                          f"parallel.cp={c} (each CP rank holds a contiguous piece of every row); "
                          f"make it a multiple of {c}")


def check_layout(cfg: Config, world: int) -> Topology:
    """Validate the parallel layout against the world size and the model; the Topology of it.

    Pure (no process group is touched), so a bad recipe fails before any collective."""
    p = cfg.parallel
    for name, why in _LATER.items():
        if getattr(p, name) != 1:
            raise ConfigError(f"parallel.{name}: {getattr(p, name)} is not supported yet ({why}); "
                              f"set parallel.{name}=1")
    if p.tp > 1 and p.sequence_parallel is False:
        raise ConfigError("parallel.sequence_parallel: tensor parallelism runs with sequence "
                          "parallelism only (each TP rank routes its own sequence shard through "
                          "the MoE, as Megatron requires); set parallel.sequence_parallel=true "
                          "(or null)")
    topo = Topology.from_config(p, world)
    if cfg.train.micro_batch is None:  # null: the global batch split over DP, no accumulation
        if cfg.train.global_batch % topo.dp:
            raise ConfigError(f"train.global_batch: {cfg.train.global_batch} rows do not split over "
                              f"dp={topo.dp} ranks; make it a multiple of {topo.dp}")
        cfg.train.micro_batch = cfg.train.global_batch // topo.dp
    m, t, c = cfg.model, p.tp, p.cp
    check_context(cfg)
    if m.num_heads % t:
        raise ConfigError(f"model.num_heads: {m.num_heads} is not divisible by parallel.tp={t}; "
                          f"choose a parallel.tp that divides it")
    if m.num_kv_heads % t and t % m.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads: {m.num_kv_heads} and parallel.tp={t} must divide "
                          f"one another (KV heads are split, or replicated when tp exceeds them)")
    if m.vocab_size % t:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is not divisible by parallel.tp={t} "
                          f"(the vocab-parallel embedding and LM head split it evenly); round "
                          f"model.vocab_size up to a multiple of {t}")
    if (cfg.train.micro_batch * cfg.data.seq_len // c) % t:
        per = "micro_batch × seq_len" + (" / cp" if c > 1 else "")
        raise ConfigError(f"data.seq_len: {per} = {cfg.train.micro_batch} × "
                          f"{cfg.data.seq_len}{f' / {c}' if c > 1 else ''} tokens do not split "
                          f"over parallel.tp={t} (sequence parallelism); make seq_len a multiple "
                          f"of {t * c}")
    # experts split over EP, each expert's width over ETP
    topo.check_model(num_experts=m.num_experts, ffn_hidden_size=m.ffn_hidden_size)
    dp = topo.dp
    if cfg.train.global_batch % (cfg.train.micro_batch * dp):
        raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of "
                          f"train.micro_batch × dp = {cfg.train.micro_batch} × {dp}; "
                          f"make it one")
    return topo


# -------------------------------------------------------------------------------- TP sharding
def _region_in(group, module, args):
    x, *rest = args
    return (gather_from_sp(x, group), *rest)


def _region_out(group, module, args, out):
    return reduce_scatter_to_sp(out, group)


def _shard_tensor_parallel(model: nn.Module, tp: int, t: int, group) -> dict:
    """Swap the modules of ``model`` for rank ``t``'s TP pieces; ``{fqn: tp_dim}`` of the
    TP-split parameters."""
    from mmtrain.model.attention import LightningAttention, SoftmaxAttention

    cfg = model.cfg
    H, G, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    Hl, Vl = H // tp, V // tp
    h0, v0 = t * Hl, t * Vl
    split: dict[str, int] = {}
    model.embed = VocabParallelEmbedding(model.embed, v0, v0 + Vl, group)
    split["embed.weight"] = 0
    model.lm_head = ColumnParallelLinear(model.lm_head, slice(v0, v0 + Vl), group, "gather")
    split["lm_head.weight"] = 0
    heads = slice(h0 * K, (h0 + Hl) * K)
    for i, layer in enumerate(model.layers):
        a, pre = layer.attn, f"layers.{i}.attn."
        if isinstance(a, LightningAttention):
            a.qkv_proj = ColumnParallelLinear(a.qkv_proj, slice(3 * h0 * K, 3 * (h0 + Hl) * K),
                                              group, "none")
            a.gate_proj = ColumnParallelLinear(a.gate_proj, heads, group, "none")
            a.out_proj = RowParallelLinear(a.out_proj, heads, group, "none")
            a.norm = TPRMSNorm(a.norm.weight[heads], a.norm.eps, H * K, group)
            a.slopes = a.slopes[h0:h0 + Hl].clone()
            a.num_heads, a.head_start = Hl, h0
            split.update({pre + "qkv_proj.weight": 0, pre + "gate_proj.weight": 0,
                          pre + "out_proj.weight": 1, pre + "norm.weight": 0})
        elif isinstance(a, SoftmaxAttention):
            a.q_proj = ColumnParallelLinear(a.q_proj, heads, group, "none")
            if G % tp == 0:
                Gl = G // tp
                kv = slice(t * Gl * K, (t + 1) * Gl * K)
                a.k_proj = ColumnParallelLinear(a.k_proj, kv, group, "none")
                a.v_proj = ColumnParallelLinear(a.v_proj, kv, group, "none")
                split.update({pre + "k_proj.weight": 0, pre + "v_proj.weight": 0})
            else:  # tp > G: replicate, use the KV head of this rank's query heads
                Gl = 1
                g = h0 // (H // G)
                kv = slice(g * K, (g + 1) * K)
                a.k_proj = SlicedLinear(a.k_proj, kv)
                a.v_proj = SlicedLinear(a.v_proj, kv)
            a.o_proj = RowParallelLinear(a.o_proj, heads, group, "none")
            a.num_heads, a.num_kv_heads = Hl, Gl
            split.update({pre + "q_proj.weight": 0, pre + "o_proj.weight": 1})
        else:
            raise TypeError(f"no tensor-parallel plan for {type(a).__name__}")
        a.register_forward_pre_hook(functools.partial(_region_in, group))
        a.register_forward_hook(functools.partial(_region_out, group))
    return split


# ----------------------------------------------------------------------------------- CP ops
def _shard_context_parallel(model: nn.Module, cp: int, c: int, groups, lightning: str,
                            balance: str, rounds: int):
    """Swap the attention cores for their CP versions (the MoE's groups are set by the caller)."""
    from mmtrain.model.attention import LightningAttention, SoftmaxAttention
    from mmtrain.parallel.context import ContextLightningOp, ContextParallel
    from mmtrain.parallel.ring import ContextSoftmaxOp

    cpx = ContextParallel(groups.cp, cp, c, lightning, balance, rounds)
    for layer in model.layers:
        a = layer.attn
        if isinstance(a, LightningAttention):
            a.core = ContextLightningOp(a.core, cpx, lightning)
        elif isinstance(a, SoftmaxAttention):
            a.core = ContextSoftmaxOp(cpx)
    return cpx


# ------------------------------------------------------------------------------- shard plan
@dataclass
class ShardPlan:
    """What :func:`shard_model` did to this rank's model: the TP split dim of each TP-split
    parameter, and ``{fqn: (full shape, pieces)}`` of every parameter held in part (TP slices and
    expert shards; the rest are held whole), in the geometry of :mod:`mmtrain.model.init`."""

    split: dict = field(default_factory=dict)
    shards: dict = field(default_factory=dict)
    full_shapes: dict = field(default_factory=dict)
    vocab_start: int = 0
    context: object = None


def shard_model(model: nn.Module, topology: Topology, groups, pcfg: ParallelConfig,
                rank: int) -> ShardPlan:
    """Swap ``model``'s modules, in place, for ``rank``'s pieces of ``topology`` (TP, CP, the
    MoE's balance and expert shards). Touches no parameter value, so it works on a model built on
    the meta device (only the local shards are materialised afterwards)."""
    plan = ShardPlan(full_shapes={n: tuple(p.shape) for n, p in model.named_parameters()})
    info = topology.rank_info(rank)
    if topology.tp > 1:
        plan.split = _shard_tensor_parallel(model, topology.tp, info.tp, groups.tp)
        plan.vocab_start = info.tp * (model.cfg.vocab_size // topology.tp)
    if topology.cp > 1:
        plan.context = _shard_context_parallel(model, topology.cp, info.cp, groups,
                                               pcfg.cp_lightning, pcfg.cp_balance,
                                               pcfg.cp_zigzag_rounds)
    if groups is not None:
        # aux loss over every rank's tokens; local capacity over the ranks that split one
        # micro-batch (TP, and CP under context parallelism)
        cap = groups.tp_cp if topology.cp > 1 else groups.tp
        model.set_balance(GroupBalance(model.cfg.global_routing, groups.tp_dp_cp, cap))
        if topology.ep * topology.etp > 1:
            plan.shards.update(shard_experts(model, groups.ep, groups.etp,
                                             pcfg.moe_overlap_groups))
    params = dict(model.named_parameters())
    for name, dim in plan.split.items():
        local = tuple(params[name].shape)
        glob = tuple(info.tp * n if d == dim else 0 for d, n in enumerate(local))
        plan.shards[name] = (plan.full_shapes[name], [Piece((0,) * len(local), glob, local)])
    return plan


# ----------------------------------------------------------------------------------- Parallel
class Parallel:
    """This rank's view of the layout: what the loop calls for everything distributed (data
    sharding, loss, gradient sync, clipping; the optimizer and checkpoints build on it in
    :mod:`mmtrain.train.distributed`).

    Single process (``groups is None``): plain cross-entropy and torch clipping, except with
    ``main_grads`` (bf16 parameters: gradients accumulate in fp32 buckets, which a
    :class:`GradSync` of one-rank groups holds; clipping reads them)."""

    def __init__(self, model: nn.Module, topology: Topology, groups, pcfg: ParallelConfig,
                 device: torch.device, plan: Optional[ShardPlan] = None,
                 main_grads: bool = False):
        self.model, self.topology, self.groups, self.pcfg = model, topology, groups, pcfg
        self.distributed = groups is not None
        self.main_grads = main_grads
        self.device = device
        rank = dist.get_rank() if self.distributed else 0
        info = topology.rank_info(rank)
        self.tp, self.tp_rank = topology.tp, info.tp
        self.dp, self.dp_rank = topology.dp, info.dp
        self.cp, self.cp_rank = topology.cp, info.cp
        if plan is None:
            plan = shard_model(model, topology, groups, pcfg, rank)
        self.plan = plan
        self.context = plan.context
        self.vocab_start = plan.vocab_start
        #: ``{fqn: (full shape, pieces)}`` of the parameters held in part
        self.shards = plan.shards
        split = plan.split
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            model.to_empty(device=device)  # this rank's shards only; values are set by the caller
        else:
            model.to(device)
        self.infos: list[ParamInfo] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            cp = "_cp" if self.cp > 1 else ""  # replicas over CP see other tokens: sum them too
            if ".moe.experts." in name:
                group = "edp"
            elif name in split:
                group = "dp" + cp
            else:
                group = ("tp_dp" if self.tp > 1 else "dp") + cp
            self.infos.append(ParamInfo(name, p, group, plan.full_shapes[name], split.get(name),
                                        decay=p.dim() >= 2))
        self.sync: Optional[GradSync] = None
        if self.distributed or main_grads:
            pgs = {"dp": groups.dp, "tp_dp": groups.tp_dp, "edp": groups.edp,
                   "dp_cp": groups.dp_cp, "tp_dp_cp": groups.tp_dp_cp} if groups else {}
            self.sync = GradSync(self.infos, pgs, pcfg.bucket_mb,
                                 pcfg.zero1 and self.distributed,
                                 overlap=device.type == "cuda", device=device,
                                 main_grads=main_grads)

    def pieces(self, name: str, local_shape: tuple) -> list:
        """Where parameter ``name``'s local tensor sits in its full tensor."""
        return self.shards[name][1] if name in self.shards else whole(local_shape)

    def owned(self):
        """``(bucket, info, offset, lo, hi)`` for each parameter: its offset in its bucket and the
        flat range [lo, hi) of its local tensor that this rank owns in the bucket (its replicas,
        the ranks of the bucket's group, own disjoint ranges that cover it; [0, numel) in a
        single process)."""
        if self.sync is None:
            return [(None, i, 0, 0, i.param.numel()) for i in self.infos]
        out = []
        for b in self.sync.buckets:
            own = b.owned
            for info, off in zip(b.infos, b.offsets):
                lo = max(own.start, off) - off
                hi = min(own.stop, off + info.param.numel()) - off
                out.append((b, info, off, lo, max(lo, hi)))
        return out

    # ------------------------------------------------------------------------------ data
    def shard_batch(self, batch, device):
        """This rank's part of a micro-batch on ``device``: under CP its pieces of every row
        (with its CP plan), else the batch itself."""
        if self.context is None:
            return batch.to(device)
        return self.context.shard_batch(batch, device)

    # ------------------------------------------------------------------------------ loss
    def token_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [N] (fp32) of (possibly vocab-sharded) logits."""
        flat = logits.reshape(-1, logits.shape[-1])
        if self.tp > 1:
            return vocab_parallel_cross_entropy(flat, labels.reshape(-1), self.vocab_start,
                                                self.groups.tp)
        return F.cross_entropy(flat.float(), labels.reshape(-1), reduction="none")

    def linear_ce(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  chunk: int) -> torch.Tensor:
        """Per-token CE [N] (fp32) of ``hidden @ weight.T`` (the LM head, vocab-sharded under TP)
        ``chunk`` tokens at a time, without the full logits (``train.fused_ce``)."""
        return vocab_parallel_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), self.vocab_start,
            self.groups.tp if self.tp > 1 else None, chunk)

    def all_reduce(self, t: torch.Tensor, group: str = "dp") -> torch.Tensor:
        """Sum ``t`` in place over ``group`` (``dp``: DP ranks; ``tp_dp``: every rank of the
        dense grid slice) and return it; a no-op in a single process."""
        if self.distributed:
            # NCCL reduces device tensors only: stage host tensors through the device.
            buf = t.to(self.device)
            dist.all_reduce(buf, group=self.groups[group])
            if buf is not t:
                t.copy_(buf)
        return t

    # ------------------------------------------------------------------------ grad sync
    def prepare_backward(self, last_micro_batch: bool) -> None:
        if self.sync is not None:
            self.sync.prepare_backward(last_micro_batch)

    def reduce_grads(self) -> None:
        if self.sync is not None:
            self.sync.finish()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        limit = max_norm if max_norm > 0 else float("inf")
        if self.sync is None:
            params = [i.param for i in self.infos]
            return torch.nn.utils.clip_grad_norm_(params, limit)
        return clip_grad_norm(self.sync, limit)


def parallelize(model: nn.Module, topology: Topology, groups, pcfg: ParallelConfig,
                device: torch.device, main_grads: bool = False) -> Parallel:
    """Shard ``model`` in place for this rank of ``topology`` (:func:`shard_model`), bring its
    local shards to ``device`` and return the :class:`Parallel` handle. ``model`` is either built
    in full and initialised (its shards keep their values) or built on the meta device (the
    shards are then allocated on ``device`` uninitialised: :func:`mmtrain.model.init.init_weights`
    with ``Parallel.shards`` fills them). ``groups`` is
    :func:`mmtrain.parallel.groups.create_process_groups`'s result (``None``: single process).
    ``main_grads``: gradients accumulate in fp32 buckets (bf16 parameters, see
    :mod:`mmtrain.parallel.data`)."""
    return Parallel(model, topology, groups, pcfg, device, main_grads=main_grads)
