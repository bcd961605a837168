"""Tensor and sequence parallelism (Megatron style): collectives as autograd Functions, column-,
row- and vocab-parallel layers, the TP-aware RMSNorm of lightning attention and vocab-parallel
cross-entropy. (The MoE under SP is the plain MoE with a group-aware balance: parallel/moe.py.)

Legend: T tokens of the packed micro-batch (all rows flattened), Tl = T / tp the tokens of one
TP rank under sequence parallelism, D hidden, V vocab, Vl = V / tp, E experts, K top-k.

Sequence parallelism (SP) is the only TP mode: between attention regions the residual stream is
split along T across the TP group (rank r holds tokens [r·Tl, (r+1)·Tl)), so norms, the router and
the experts run on Tl tokens. An attention module is one TP region: its input is all-gathered
along T (:func:`gather_from_sp`), its column-parallel projections hold the rows of the local heads,
its row-parallel output projection gives a partial sum that is reduce-scattered back along T
(:func:`reduce_scatter_to_sp`). The vocab-parallel embedding reduce-scatters its partial lookups;
the LM head all-gathers its input and yields vocab-sharded logits for
:func:`vocab_parallel_cross_entropy`.

Gradient convention: every TP rank computes the same scalar loss, and each rank's backward gives
the full gradient of that loss w.r.t. what it holds locally (its weight shard, its tokens). Hence
TP-sharded weights reduce their gradients over DP only, while weights that are replicated across TP
but see only the rank's tokens (norms, router, experts when etp=1) reduce over TP×DP
(see :mod:`mmtrain.parallel.data`).

Process groups are passed explicitly; nothing here reads globals.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "copy_to_tp", "reduce_from_tp", "all_reduce_tp", "gather_from_sp", "reduce_scatter_to_sp",
    "scatter_to_sp", "ColumnParallelLinear", "RowParallelLinear", "SlicedLinear",
    "VocabParallelEmbedding", "TPRMSNorm", "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


# ------------------------------------------------------------------------------ raw collectives
def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ``x`` of every rank of ``group`` along dim 0 (rank order)."""
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's 1/n slice of dim 0."""
    n = _size(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(f"dim 0 of {tuple(x.shape)} does not split over {n} ranks")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)
    return out


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, op=op, group=group)
    return x


def _split_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    r = dist.get_rank(group)
    return x.chunk(n, dim=0)[r].contiguous()


# ------------------------------------------------------------------- collectives with autograd
class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward (input of a column-parallel layer without SP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (output of a row-parallel layer without SP; also
    sums of per-rank statistics whose gradient belongs to each rank's own inputs)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceBoth(torch.autograd.Function):
    """All-reduce forward and backward: a statistic that every rank's output depends on (the
    full-width RMSNorm variance), so its gradient is the sum of every rank's contribution."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    """All-gather along T forward, reduce-scatter backward (entering a TP region under SP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim0(g, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce-scatter along T forward, all-gather backward (leaving a TP region under SP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Keep this rank's slice of T forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group) if _size(group) > 1 else x


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group) if _size(group) > 1 else x


def all_reduce_tp(x, group):
    return _AllReduceBoth.apply(x, group) if _size(group) > 1 else x


def gather_from_sp(x, group):
    return _GatherFromSP.apply(x, group) if _size(group) > 1 else x


def reduce_scatter_to_sp(x, group):
    return _ReduceScatterToSP.apply(x, group) if _size(group) > 1 else x


def scatter_to_sp(x, group):
    return _ScatterToSP.apply(x, group) if _size(group) > 1 else x


# ---------------------------------------------------------------------------------------- layers
_INPUT_MODES = ("none", "copy", "gather")
_OUTPUT_MODES = ("none", "reduce", "reduce_scatter")


class ColumnParallelLinear(nn.Linear):
    """``y = x Wᵀ`` with W's output rows split over TP (this rank holds ``rows``).

    ``input_mode``: ``gather`` (SP: all-gather x along T first), ``copy`` (x replicated; all-reduce
    its gradient), ``none`` (the caller's TP region already did either). The output is the local
    slice of the output features."""

    def __init__(self, full: nn.Linear, rows: slice, group, input_mode: str = "gather"):
        w = full.weight.detach()[rows]
        super().__init__(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.weight.copy_(w)
        if input_mode not in _INPUT_MODES:
            raise ValueError(f"input_mode must be one of {_INPUT_MODES}, got {input_mode!r}")
        self.group, self.input_mode = group, input_mode

    def forward(self, x):
        if self.input_mode == "gather":
            x = gather_from_sp(x, self.group)
        elif self.input_mode == "copy":
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Linear):
    """``y = x Wᵀ`` with W's input columns split over TP; x holds the matching feature slice and
    the per-rank products are summed: ``reduce_scatter`` (SP: sum and split along T), ``reduce``
    (all-reduce) or ``none`` (the caller's TP region sums)."""

    def __init__(self, full: nn.Linear, cols: slice, group, output_mode: str = "reduce_scatter"):
        w = full.weight.detach()[:, cols]
        super().__init__(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.weight.copy_(w)
        if output_mode not in _OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {_OUTPUT_MODES}, got {output_mode!r}")
        self.group, self.output_mode = group, output_mode

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.output_mode == "reduce_scatter":
            return reduce_scatter_to_sp(y, self.group)
        if self.output_mode == "reduce":
            return reduce_from_tp(y, self.group)
        return y


class SlicedLinear(nn.Module):
    """A replicated full weight of which this rank uses the rows ``rows`` (KV projections when TP
    exceeds the KV heads: several TP ranks share one KV head). The parameter stays full and
    replicated; rows a rank does not use get zero gradient there, and summing the gradient over
    TP (as for every replicated weight) gives the full gradient."""

    def __init__(self, full: nn.Linear, rows: slice):
        super().__init__()
        self.weight = full.weight
        self.rows = rows

    def forward(self, x):
        return F.linear(x, self.weight[self.rows])


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocab rows split over TP; each rank looks up the ids it holds (zeros for
    the others) and the partial results are summed: reduce-scattered along T under SP."""

    def __init__(self, full: nn.Embedding, vocab_start: int, vocab_end: int, group,
                 sequence_parallel: bool = True):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[vocab_start:vocab_end].clone())
        self.vocab_start, self.vocab_end = vocab_start, vocab_end
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, ids):
        inside = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(inside, ids - self.vocab_start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group)
        return reduce_from_tp(out, self.group)


class TPRMSNorm(nn.Module):
    """RMSNorm over a feature axis split across TP: the mean of squares is taken over the full
    ``full_width`` (sum of squares all-reduced over TP), the gain is this rank's slice."""

    def __init__(self, weight: torch.Tensor, eps: float, full_width: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps, self.full_width, self.group = eps, full_width, group

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        ss = all_reduce_tp(x32.pow(2).sum(-1, keepdim=True), self.group)
        y = x32 * torch.rsqrt(ss / self.full_width + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


# ----------------------------------------------------------------------- vocab-parallel loss
class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NVl, target_N, vocab_start, group):
        lf = logits_NVl.to(torch.promote_types(logits_NVl.dtype, torch.float32))
        vl = lf.shape[-1]
        mx = lf.max(dim=-1).values
        _all_reduce(mx, group, dist.ReduceOp.MAX)
        lf = lf - mx[:, None]
        local = target_N - vocab_start
        inside = (local >= 0) & (local < vl)
        local = torch.where(inside, local, torch.zeros_like(local))
        picked = lf.gather(1, local[:, None])[:, 0] * inside.to(lf.dtype)
        _all_reduce(picked, group)
        e = lf.exp()
        se = e.sum(dim=-1)
        _all_reduce(se, group)
        loss = se.log() - picked
        e.div_(se[:, None])
        ctx.save_for_backward(e, local, inside)
        ctx.in_dtype = logits_NVl.dtype
        return loss

    @staticmethod
    def backward(ctx, g_N):
        softmax, local, inside = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= inside.to(grad.dtype)
        grad.mul_(g_N[:, None])
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_NVl: torch.Tensor, target_N: torch.Tensor,
                                 vocab_start: int, group) -> torch.Tensor:
    """Per-token CE [N] (fp32) of logits whose vocab axis is split over ``group``; identical on
    every rank of the group."""
    if _size(group) == 1:
        lf = logits_NVl.to(torch.promote_types(logits_NVl.dtype, torch.float32))
        return F.cross_entropy(lf, target_N, reduction="none")
    return _VocabParallelCE.apply(logits_NVl, target_N, vocab_start, group)


def vocab_parallel_linear_cross_entropy(x_ND: torch.Tensor, weight_VlD: torch.Tensor,
                                        target_N: torch.Tensor, vocab_start: int, group,
                                        chunk: int = 4096, sequence_parallel: bool = True
                                        ) -> torch.Tensor:
    """Per-token CE [N] (fp32) of ``x @ Wᵀ`` with W's vocab rows split over ``group`` (the
    :class:`ColumnParallelLinear` LM head's local weight), chunked: no logits of all N tokens
    exist (:mod:`mmtrain.model.fused_ce`). Under sequence parallelism ``x_ND`` is this rank's
    sequence shard and is all-gathered first (as the LM head does; the gather's backward sums
    every rank's partial gradient and keeps this rank's slice); each chunk's row max, sum of
    exponentials and target logit are all-reduced over ``group``. Identical on every rank."""
    from mmtrain.model.fused_ce import linear_cross_entropy

    if _size(group) == 1:
        return linear_cross_entropy(x_ND, weight_VlD, target_N, chunk, vocab_start=vocab_start)
    x = gather_from_sp(x_ND, group) if sequence_parallel else copy_to_tp(x_ND, group)

    def reduce(t: torch.Tensor, op: str) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                        group=group)

    return linear_cross_entropy(x, weight_VlD, target_N, chunk, vocab_start=vocab_start,
                                reduce=reduce)
