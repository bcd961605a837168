"""Mixture of experts (SPEC §4): router, grouped SwiGLU experts, the token-dispatcher seam.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, S routed slots (T·K),
C capacity per expert, n rows handed to the experts (kept slots, grouped by expert).

**One forward** (:meth:`MoE.forward`): route → capacity → dispatch → experts → combine → aux.
The distributed variants change only two objects that ``mmtrain.parallel`` installs:

* ``MoE.balance`` (:class:`Balance`): which tokens the capacity and the aux loss are judged over.
  Locally that is this call's tokens; distributed it is a group of ranks (see
  ``mmtrain.parallel.moe.GroupBalance``);
* ``MoE.dispatcher``: :class:`LocalDispatcher` permutes the kept slots on the device and runs the
  local experts; ``mmtrain.parallel.moe.AllToAllDispatcher`` sends them over EP (with ETP).

**Router**: ``p = softmax(x W_g)`` in fp32 over all E, top-K, the K weights renormalised to sum 1.

**Aux loss** (GShard form, mmtrain's normalisation): ``E · Σ_i f_i · m_i`` with f_i the fraction
of routed slots that chose expert i (before any drop) and m_i the mean router probability of
expert i; it is 1 under perfectly balanced routing. The paper's ``(1/E)·Σ f·m`` with coefficient
α_paper equals this with coefficient α_paper / E². Over a training step (``Balance.begin_step``)
f and m are those of the step's whole global batch: each micro-batch contributes
``E · Σ_i f_i^run · S_i / N`` with S_i its (local) probability sums, N the step's routed tokens and
f^run the expert counts of the micro-batches routed so far in the step (all ranks, running
counts): exact when the step has one micro-batch per rank; under gradient accumulation the
gradient of micro-batch j uses the counts of micro-batches 0..j (the last one's are exact). The
logged value always uses the step's final counts and is exact.

**Capacity** (``capacity_factor`` not null): C = ceil(capacity_factor · T · K / E). Slots are
ranked first-choice before second-choice (all tokens' k=0 slots, then all k=1 slots, …), and by
token order within a choice rank (GShard's priority); an expert keeps its first C slots in that
order: a dropped slot contributes nothing and the residual carries the token.

**Experts**: one stacked gate+up weight ``w13`` [E, 2F, D] (rows [0, F) = W1 the gate, [F, 2F) =
W3 the up projection; transformers' ``gate_up_proj`` layout) and ``w2`` [E, D, F]. On CUDA the
expert GEMMs are grouped GEMMs (``torch._grouped_mm``) with device-side offsets; on other devices
(no grouped GEMM for every dtype) a loop over the experts. :class:`GroupedSwiGLU` has a hand
written backward so that the distributed dispatcher can pipeline it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.config import ModelConfig
from mmtrain.model.compiled import Region
from mmtrain.model.layers import xavier_normal_


@dataclass
class Routing:
    idx_TK: torch.Tensor  # chosen experts
    weight_TK: torch.Tensor  # renormalised weights (fp32)
    keep_TK: torch.Tensor  # bool, False where capacity dropped the slot
    probs_TE: torch.Tensor  # full softmax (fp32)
    # recompute the unpermute-and-weigh of the experts' outputs in the backward instead of
    # keeping its fp32 [T·K, D] copy (train.recompute=selective; see mmtrain.model.recompute)
    recompute_combine: bool = False
    # the residual stream's dtype (the MoE input's): the combine weighs and sums in it, at least
    # in the experts' output dtype. fp32 parameters: fp32 (bf16 expert outputs widened, as
    # always); bf16 parameters: bf16, so the fp32 routing weights do not promote the residual
    # stream to fp32 (they are cast to bf16 deliberately)
    combine_dtype: torch.dtype = torch.float32


def _router_probs(logits_TE: torch.Tensor) -> torch.Tensor:
    """The router's softmax over the experts, in fp32 (fp64 stays fp64)."""
    return torch.softmax(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1)


def route_weights(logits_TE: torch.Tensor, top_k: int, idx_TK: torch.Tensor | None = None):
    """(probs_TE, idx_TK, weight_TK): the fp32 softmax, the top-k experts (``idx_TK`` given:
    these), their probabilities renormalised to sum 1."""
    probs = _router_probs(logits_TE)
    if idx_TK is None:
        with torch.no_grad():
            idx_TK = torch.topk(probs, top_k, dim=-1).indices
    w = probs.gather(1, idx_TK)  # the same graph either way (a recomputation must match it)
    w = w / w.sum(dim=-1, keepdim=True)
    return probs, idx_TK, w


def route_choice(logits_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k experts of :func:`route_weights` alone (no gradient)."""
    return torch.topk(_router_probs(logits_TE), top_k, dim=-1).indices


def route_probs(logits_TE: torch.Tensor, idx_TK: torch.Tensor):
    """(probs_TE, weight_TK) of :func:`route_weights` for the given experts."""
    probs, _, w = route_weights(logits_TE, 0, idx_TK)
    return probs, w


# train.compile (mmtrain.model.compiled): the choice and the weights are two graphs, so that a
# forward and its recomputation under train.recompute=full (which replays the choice) run the
# same weights graph; the choice recomputes the softmax (T·E, cheap) without autograd.
route_choice_compiled = Region(route_choice, token_args=(0,))
route_probs_compiled = Region(route_probs, token_args=(0, 1))


def route(logits_TE: torch.Tensor, top_k: int, capacity_factor: float | None,
          idx_TK: torch.Tensor | None = None, compiled: bool = False) -> Routing:
    """Top-k routing; ``idx_TK`` given: these experts (a recomputation replays the original
    forward's choice), weights from ``logits_TE`` all the same. ``compiled``: the math after
    the router GEMM through its compiled regions."""
    if compiled:
        if idx_TK is None:
            with torch.no_grad():
                idx_TK = route_choice_compiled(logits_TE, top_k)
        probs, w = route_probs_compiled(logits_TE, idx_TK)
        idx = idx_TK
    else:
        probs, idx, w = route_weights(logits_TE, top_k, idx_TK)
    keep = capacity_keep(idx, probs.shape[-1], capacity_factor)
    return Routing(idx, w, keep, probs)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep(idx_TK: torch.Tensor, num_experts: int, capacity_factor: float | None,
                  capacity: int | None = None, prior_KE: torch.Tensor | None = None):
    """Which slots survive the capacity limit (see the module docstring for the order).

    ``prior_KE[k, e]``: slots already ahead of this rank's choice-rank-k slots on expert e
    (global routing passes the counts of earlier choice ranks and lower ranks of the group)."""
    T, K = idx_TK.shape
    if capacity_factor is None and capacity is None:
        return torch.ones_like(idx_TK, dtype=torch.bool)
    cap = capacity if capacity is not None else expert_capacity(T, K, num_experts, capacity_factor)
    onehot_KTE = F.one_hot(idx_TK.t(), num_experts)
    pos_KT = (onehot_KTE.cumsum(dim=1) - 1).gather(2, idx_TK.t()[..., None])[..., 0]
    if prior_KE is None:  # earlier choice ranks of this call's own tokens
        counts_KE = onehot_KTE.sum(dim=1)
        prior_KE = counts_KE.cumsum(dim=0) - counts_KE
    pos_KT = pos_KT + prior_KE.to(pos_KT.dtype).gather(1, idx_TK.t())
    return (pos_KT < cap).t()


def aux_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor | None = None,
             num_slots: int | None = None) -> torch.Tensor:
    """``E · Σ f_i m_i`` of one set of tokens; ``counts_E``/``num_slots`` may come from a
    global gather."""
    E = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
        num_slots = idx_TK.numel()
    f = counts_E.to(probs_TE.dtype) / max(num_slots, 1)
    m = probs_TE.mean(dim=0)
    return E * (f * m).sum()


# ------------------------------------------------------------------------------ balance (local)
class Balance:
    """Capacity and aux loss over this call's tokens, with the step's running counts.

    Shared by every MoE layer of a model (per-layer state is keyed by the layer). Outside a
    training step (no :meth:`begin_step`) each call is judged alone: aux = E·Σ f·m of the call.
    Distributed subclasses (``mmtrain.parallel.moe.GroupBalance``) override :meth:`group_sum`
    (sum over the ranks whose tokens form one batch) and :meth:`keep`."""

    def __init__(self, global_routing: bool = False):
        self.global_routing = global_routing
        self.step_tokens: Optional[int] = None  # routed tokens of the whole step, all ranks
        self.running: dict[int, torch.Tensor] = {}  # layer -> [E] counts routed so far
        self.stats: dict[int, torch.Tensor] = {}  # layer -> [2E + 2] fp64 (see record)
        # While a checkpointed layer runs (mmtrain.model.recompute): where its original forward
        # records the routing decisions and aux weights, and whether this is the recomputation
        # (which replays them: no second record, no running-count update, no collective).
        self.tape: Optional["Tape"] = None

    # -- hooks the distributed version overrides
    def group_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks whose tokens are routed as one batch (no gradient)."""
        return t

    def keep(self, idx_TK: torch.Tensor, num_experts: int, capacity_factor) -> torch.Tensor:
        return capacity_keep(idx_TK, num_experts, capacity_factor)

    # -- step protocol (the training loop)
    def begin_step(self, step_tokens: int) -> None:
        """A new optimizer step whose global batch routes ``step_tokens`` tokens (all ranks)."""
        self.step_tokens = int(step_tokens)
        self.running.clear()
        self.stats.clear()

    def aux(self, layer: int, probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The layer's aux term of this call (differentiable through ``probs_TE``)."""
        return aux_term(probs_TE, self.aux_weights(layer, probs_TE.shape[0], counts_E))

    def aux_weights(self, layer: int, num_tokens: int, counts_E: torch.Tensor):
        """(f [E] fp64, divisor) of the layer's aux term of this call; updates the step's running
        counts (a collective under distributed balance; no gradient)."""
        with torch.no_grad():
            group_counts = self.group_sum(counts_E.to(torch.float64))
            if self.step_tokens is None:  # standalone call: f and m of this call's tokens
                f = group_counts / group_counts.sum().clamp_min(1)
                n = self.group_sum(torch.tensor(float(num_tokens), dtype=torch.float64,
                                                device=counts_E.device))
                return f, n
            run = self.running.get(layer)
            run = group_counts if run is None else run + group_counts
            self.running[layer] = run
            return run / run.sum().clamp_min(1), self.step_tokens

    def record(self, layer: int, probs_TE: torch.Tensor, counts_E: torch.Tensor,
               dropped: torch.Tensor) -> None:
        """Accumulate this rank's statistics of the step (device tensors, no host sync):
        counts per expert, probability sums per expert, dropped slots, slots."""
        with torch.no_grad():
            row = torch.cat([counts_E.to(torch.float64), probs_TE.detach().sum(0).double(),
                             dropped.reshape(1).double(),
                             counts_E.new_full((1,), probs_TE.shape[0], dtype=torch.float64)])
            prev = self.stats.get(layer)
            self.stats[layer] = row if prev is None else prev + row


def aux_term(probs_TE: torch.Tensor, weights) -> torch.Tensor:
    """``E · Σ_i f_i · S_i / n`` with (f, n) from :meth:`Balance.aux_weights` and S the
    probability sums of this call (differentiable through ``probs_TE``)."""
    f, n = weights
    E = probs_TE.shape[-1]
    n = n.to(probs_TE.dtype) if torch.is_tensor(n) else n
    return E * (f.to(probs_TE.dtype) * probs_TE.sum(0)).sum() / n


class Tape:
    """The MoE decisions of one checkpointed forward (:mod:`mmtrain.model.recompute`), per layer:
    the chosen experts, the capacity keep mask and the aux weights. ``replay``: the recomputation
    is running and reads them back."""

    def __init__(self):
        self.entries: dict[int, dict] = {}
        self.replay = False


def step_summary(stats: torch.Tensor, num_experts: int, top_k: int) -> dict:
    """Metrics of a step from the summed per-layer statistics [L, 2E + 2] (counts, probability
    sums, dropped slots, tokens) over every rank: the exact global-batch aux value (mean over
    layers of E·Σ f·m), the drop rate, and the expert-load imbalance (max / mean tokens per
    expert, worst layer)."""
    E = num_experts
    counts, psum = stats[:, :E], stats[:, E:2 * E]
    dropped, tokens = stats[:, 2 * E], stats[:, 2 * E + 1]
    slots = tokens * top_k
    f = counts / slots.clamp_min(1)[:, None]
    m = psum / tokens.clamp_min(1)[:, None]
    aux = (E * (f * m).sum(1)).mean()
    load = counts / counts.mean(1, keepdim=True).clamp_min(1e-12)
    return {"aux_loss": float(aux), "drop_rate": float(dropped.sum() / slots.sum().clamp_min(1)),
            "expert_imbalance": float(load.max())}


# ----------------------------------------------------------------------------------- experts
def grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype in (torch.bfloat16,
                                                                         torch.float32)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: Optional[list]):
    """Grouped ``a[rows of e] @ b[e]`` (a: [n, k], b: [E, k, m]) -> [n, m]."""
    if counts is None:
        return torch._grouped_mm(a, b, offs=offs)
    out, start = a.new_empty((a.shape[0], b.shape[-1])), 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a[start:start + c], b[e], out=out[start:start + c])
        start += c
    return out


def _gmm_wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, counts: Optional[list],
               E: int):
    """Per group ``a[rows of e]ᵀ @ g[rows of e]`` (a: [n, k], g: [n, m]) -> [E, k, m]."""
    if counts is None:
        return torch._grouped_mm(a.t(), g, offs=offs)
    out, start = a.new_empty((E, a.shape[1], g.shape[1])), 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a[start:start + c].t(), g[start:start + c], out=out[e])
        else:
            out[e].zero_()
        start += c
    return out


def swiglu_forward(x_nD, w13_EHD, w2_EDF, offs, counts):
    """Rows of ``x_nD`` grouped by expert (offs: int32 cumulative ends on the device for grouped
    GEMM; counts: host list for the loop, else None). Returns (y_nD, h) with h the gate/up GEMM
    output saved for the backward: [n, 2F] (grouped GEMM) or [2, n, F] (the loop keeps gate and
    up contiguous, which the elementwise ops on CPU need to be fast)."""
    if counts is not None:
        return _loop_forward(x_nD, w13_EHD, w2_EDF, counts)
    from mmtrain.kernels.swiglu import swiglu_act

    h = _gmm(x_nD, w13_EHD.transpose(-2, -1), offs, counts)
    y = _gmm(swiglu_act(h), w2_EDF.transpose(-2, -1), offs, counts)
    return y, h


def swiglu_backward(dy_nD, x_nD, h, w13_EHD, w2_EDF, offs, counts):
    """Gradients (dx, dw13, dw2) of :func:`swiglu_forward` (the activation is recomputed)."""
    if counts is not None:
        return _loop_backward(dy_nD, x_nD, h, w13_EHD, w2_EDF, counts)
    from mmtrain.kernels.swiglu import swiglu_act_backward

    E = w13_EHD.shape[0]
    da = _gmm(dy_nD, w2_EDF, offs, counts)  # [n, F]
    dh, a = swiglu_act_backward(h, da)
    dw2 = _gmm_wgrad(dy_nD, a, offs, counts, E)  # [E, D, F]
    dx = _gmm(dh, w13_EHD, offs, counts)  # [n, D]
    dw13 = _gmm_wgrad(dh, x_nD, offs, counts, E)  # [E, 2F, D]
    return dx, dw13, dw2


def _spans(counts):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c)
        start += c


def _loop_forward(x, w13, w2, counts):
    """One expert at a time, elementwise work included (cache-sized pieces on CPU)."""
    Fw = w13.shape[1] // 2
    h = x.new_empty((2, x.shape[0], Fw))
    y = x.new_empty((x.shape[0], w2.shape[1]))
    for e, r in _spans(counts):
        g = torch.mm(x[r], w13[e, :Fw].t(), out=h[0, r])
        u = torch.mm(x[r], w13[e, Fw:].t(), out=h[1, r])
        torch.mm(F.silu(g).mul_(u), w2[e].t(), out=y[r])
    return y, h


def _loop_backward(dy, x, h, w13, w2, counts):
    Fw = w13.shape[1] // 2
    dx = torch.empty_like(x)
    dw13 = torch.zeros_like(w13)
    dw2 = torch.zeros_like(w2)
    for e, r in _spans(counts):
        g, u = h[0, r], h[1, r]
        da = dy[r] @ w2[e]
        silu = F.silu(g)
        torch.mm(dy[r].t(), silu * u, out=dw2[e])
        dg = torch.ops.aten.silu_backward(da * u, g)
        du = da.mul_(silu)
        torch.mm(dg, w13[e, :Fw], out=dx[r])
        dx[r].addmm_(du, w13[e, Fw:])
        torch.mm(dg.t(), x[r], out=dw13[e, :Fw])
        torch.mm(du.t(), x[r], out=dw13[e, Fw:])
    return dx, dw13, dw2


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 under autocast (the weights are cast for the GEMMs, as autocast would), else x's."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if not x.is_cuda and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class GroupedSwiGLU(torch.autograd.Function):
    """``W2(SiLU(W1 x) ⊙ W3 x)`` over rows grouped by expert, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x_nD, w13, w2, offs, counts):
        dt = x_nD.dtype
        w13c, w2c = w13.to(dt), w2.to(dt)
        y, h = swiglu_forward(x_nD, w13c, w2c, offs, counts)
        ctx.save_for_backward(x_nD, h, w13c, w2c, offs)
        ctx.counts = counts
        ctx.wdtypes = (w13.dtype, w2.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, w13c, w2c, offs = ctx.saved_tensors
        dx, dw13, dw2 = swiglu_backward(dy.contiguous(), x, h, w13c, w2c, offs, ctx.counts)
        return dx, dw13.to(ctx.wdtypes[0]), dw2.to(ctx.wdtypes[1]), None, None


def group_offsets(counts_E: torch.Tensor, total: int, x: torch.Tensor):
    """(offs, counts): device int32 cumulative ends for grouped GEMM, whose last end is ``total``
    (rows past the kept ones, zeroed by the caller, ride with the last expert), or, where grouped
    GEMM is unavailable, the host list of counts (the same extension)."""
    if grouped_mm_available(x):
        offs = counts_E.cumsum(0).to(torch.int32)
        offs[-1] = total
        return offs, None
    counts = counts_E.tolist()
    counts[-1] += total - sum(counts)
    return torch.zeros(0), counts


class Experts(nn.Module):
    """E SwiGLU experts, weights stacked: ``w13`` [E, 2F, D] (gate rows first), ``w2`` [E, D, F].

    ``w13``/``w2`` may hold only some experts (expert parallelism) and a slice of F (expert tensor
    parallelism): the computation is the same on whatever rows and columns are held."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_nD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``x_nD`` grouped by expert (expert 0's rows first; rows past ``counts_E.sum()`` must
        be zero and give zero); returns [n, D]."""
        dt = compute_dtype(x_nD)
        x = x_nD.to(dt)
        offs, counts = group_offsets(counts_E, x.shape[0], x)
        return GroupedSwiGLU.apply(x, self.w13, self.w2, offs, counts)

    def reset_parameters(self, beta: float, generator=None):
        """Xavier per expert for W1, W3 (each [F, D], drawn in that order) and W2."""
        Fw = self.w13.shape[1] // 2
        with torch.no_grad():
            for half in (slice(0, Fw), slice(Fw, 2 * Fw)):
                w = torch.empty_like(self.w13[:, half])
                xavier_normal_(w, gain=beta, generator=generator)
                self.w13[:, half] = w
        xavier_normal_(self.w2, gain=beta, generator=generator)


# -------------------------------------------------------------------------------- dispatchers
class _Gather(torch.autograd.Function):
    """``x.index_select(0, idx)`` whose backward is a gather too: rows ``idx`` of x, where idx
    is (a prefix of) a permutation of ``K`` copies of x's rows (``idx = order // K``).

    The backward pads the gradient of the missing rows (dropped slots) with zeros, brings it
    back to slot order with ``inv`` and sums each row's K copies: no scatter-add (atomics on
    CUDA), deterministic."""

    @staticmethod
    def forward(ctx, x, order, inv, K):
        ctx.save_for_backward(inv)
        ctx.K, ctx.rows = K, x.shape[0]
        return x.index_select(0, order // K if K > 1 else order)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        S = ctx.rows * ctx.K
        if g.shape[0] < S:
            g = torch.cat([g, g.new_zeros((S - g.shape[0],) + tuple(g.shape[1:]))])
        g = g.index_select(0, inv)
        if ctx.K > 1:
            g = g.view(ctx.rows, ctx.K, *g.shape[1:]).sum(1)
        return g, None, None, None


def sort_slots(routing: Routing, num_experts: int):
    """Kept slots grouped by expert (dropped slots last), all on the device.

    Returns (order_S, inv_S, counts_E, kept_S): ``order_S`` indexes the flat T·K slots,
    ``inv_S`` its inverse, ``counts_E`` counts the kept slots per expert, ``kept_S`` the keep
    flag in sorted order."""
    flat_e = routing.idx_TK.reshape(-1)
    flat_keep = routing.keep_TK.reshape(-1)
    key = torch.where(flat_keep, flat_e, torch.full_like(flat_e, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    return order, inverse(order), counts, flat_keep[order]


def inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def gather_slots(x_TD: torch.Tensor, order_S: torch.Tensor, inv_S: torch.Tensor, K: int):
    """The rows of the sorted slots (``order_S`` may be a prefix: kept slots only)."""
    return _Gather.apply(x_TD, order_S, inv_S, K)


def combine_slots(y_SD: torch.Tensor, order_S: torch.Tensor, inv_S: torch.Tensor,
                  routing: Routing) -> torch.Tensor:
    """Unpermute the slots' outputs (``y_SD`` in sorted order; missing trailing rows are dropped
    slots) and sum each token's K experts, weighted, in ``routing.combine_dtype`` (fp32 with
    fp32 parameters, bf16 with bf16 ones; dropped slots weigh 0)."""
    if routing.recompute_combine and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        plain = Routing(routing.idx_TK, routing.weight_TK, routing.keep_TK, routing.probs_TE,
                        combine_dtype=routing.combine_dtype)
        return checkpoint(combine_slots, y_SD, order_S, inv_S, plain, use_reentrant=False)
    T, K = routing.idx_TK.shape
    y_TKD = _Gather.apply(y_SD, inv_S, order_S, 1) if y_SD.shape[0] == T * K else \
        _Gather.apply(torch.cat([y_SD, y_SD.new_zeros((T * K - y_SD.shape[0], y_SD.shape[1]))]),
                      inv_S, order_S, 1)
    acc = torch.promote_types(y_SD.dtype, routing.combine_dtype)
    w = torch.where(routing.keep_TK, routing.weight_TK, torch.zeros_like(routing.weight_TK))
    return (y_TKD.view(T, K, -1).to(acc) * w.to(acc)[..., None]).sum(1)


class LocalDispatcher:
    """All experts on this device: permute by a device sort, grouped experts, unpermute."""

    def __init__(self, drops: bool = True):
        self.drops = drops  # False: dropless (capacity_factor null), no masking needed

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        E = experts.w13.shape[0]
        K = routing.idx_TK.shape[1]
        order, inv, counts, kept = sort_slots(routing, E)
        x_SD = gather_slots(x_TD.to(compute_dtype(x_TD)), order, inv, K)  # bf16 under autocast
        if self.drops:  # dropped slots (sorted last) ride with the last expert as zero rows
            x_SD = x_SD * kept[:, None].to(x_SD.dtype)
        y_SD = experts(x_SD, counts)
        return combine_slots(y_SD, order, inv, routing)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.layer_idx = layer_idx
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size)
        self.dispatcher = LocalDispatcher(drops=cfg.capacity_factor is not None)
        self.balance = Balance(cfg.global_routing)
        self.last_stats: dict = {}
        self.recompute_combine = False  # train.recompute=selective (mmtrain.model.recompute)
        self.use_compiled = False  # train.compile (mmtrain.model.compiled)

    def forward(self, x_TD: torch.Tensor):
        """Returns (y_TD, aux) with aux this call's differentiable aux term (see the module
        docstring: the step's running E·Σ f·m share, or E·Σ f·m of the call alone)."""
        rdt = torch.promote_types(x_TD.dtype, torch.float32)  # fp32 routing (fp64 in fp64 tests)
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 logits, not autocast's bf16
            logits = F.linear(x_TD.to(rdt), self.router.weight.to(rdt))
        tape = self.balance.tape
        if tape is not None and tape.replay:  # recomputation: the original forward's decisions
            saved = tape.entries[self.layer_idx]
            routing = route(logits, self.top_k, None, idx_TK=saved["idx"],
                            compiled=self.use_compiled)
            routing.keep_TK = saved["keep"]
        else:
            routing = route(logits, self.top_k, None, compiled=self.use_compiled)
            routing.keep_TK = self.balance.keep(routing.idx_TK, self.num_experts,
                                                self.capacity_factor)
        routing.recompute_combine = self.recompute_combine
        routing.combine_dtype = x_TD.dtype
        y = self.dispatcher(x_TD, routing, self.experts)
        if tape is not None and tape.replay:
            return y, aux_term(routing.probs_TE, saved["aux"])
        counts = torch.bincount(routing.idx_TK.reshape(-1), minlength=self.num_experts)
        weights = self.balance.aux_weights(self.layer_idx, routing.probs_TE.shape[0], counts)
        aux = aux_term(routing.probs_TE, weights)
        dropped = (~routing.keep_TK).sum()
        self.balance.record(self.layer_idx, routing.probs_TE, counts, dropped)
        self.last_stats = {"dropped": dropped, "slots": routing.keep_TK.numel(), "load": counts}
        if tape is not None:
            tape.entries[self.layer_idx] = {"idx": routing.idx_TK, "keep": routing.keep_TK,
                                            "aux": weights}
        return y, aux

    def reset_parameters(self, beta: float, generator=None):
        xavier_normal_(self.router.weight, generator=generator)
        self.experts.reset_parameters(beta, generator)
