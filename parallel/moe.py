"""Expert parallelism (SPEC §4, §6): the all-to-all token dispatcher over EP with expert tensor
parallelism (ETP), group-wide capacity and aux loss (global routing), EP-ETP overlap.

Legend: T tokens of this rank, K top-k, E experts, El = E / ep experts on this EP rank, F expert
width, Fl = F / etp its slice on this ETP rank, G overlap groups, D hidden.

**Who holds what.** The expert grid (``mmtrain.parallel.topology``) puts rank r at (edp, ep, etp).
EP rank j holds experts [j·El, (j+1)·El); ETP rank i holds, of each, the rows
[i·Fl, (i+1)·Fl) of W1 and of W3 (``w13`` column-parallel) and the columns of W2 (row-parallel).
Every rank routes its own tokens (its sequence shard under SP, its micro-batch under DP).

**Dispatch** (:class:`AllToAllDispatcher`), per MoE layer:

1. route, sort the kept slots by (overlap group, expert) on the device (dropped slots last);
2. exchange the counts: one all-to-all over EP, one all-gather over ETP, then **one host sync per
   layer** (a [G·E + etp·ep·G·El] int64 copy): the all-to-all split sizes must reach the host;
3. per overlap group g: all-to-all of the rows over EP (uneven splits) → all-gather over ETP (so
   every ETP rank of an expert sees all its rows) → rows ordered by local expert → grouped SwiGLU
   on the local F slice → back to arrival order → reduce-scatter over ETP (sums the F slices'
   partial outputs) → reverse all-to-all over EP;
4. unpermute and combine the K experts of each token (fp32), as the local dispatcher does.

Uneven all-gathers and reduce-scatters inside ETP are all-to-alls with repeated / split inputs.
Step 3 is one autograd Function (:class:`_ExpertPipeline`) whose forward and backward both
pipeline the groups: on CUDA each group's communication chain (EP all-to-all, then the ETP
collective) runs on a side stream, so group g+1's dispatch and group g−1's return overlap group
g's expert GEMMs on the main stream (``parallel.moe_overlap_groups`` = G; 1 = no overlap). EP and
ETP use different communicators, so their traffic can overlap too. The groups split each rank's
tokens into G contiguous ranges.

**Capacity and aux** (:class:`GroupBalance`): the aux loss's f and m are summed over every rank
of the dense grid that holds other tokens (TP×CP×DP of a pipeline stage), so it equals the
single-process value of the same global batch. Capacity is judged over the *capacity group*: the
TP group (sequence shards of one micro-batch, as one device would route them) by default, or, with
``model.global_routing``, that whole TP×CP×DP group: the per-(choice rank, expert) counts are
all-gathered and every slot's priority is (choice rank, group rank, token order), i.e. exactly
the drops of routing all those tokens together on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtrain.model.moe import (Balance, Experts, Routing, capacity_keep, combine_slots,
                               compute_dtype, expert_capacity, gather_slots, grouped_mm_available,
                               inverse, swiglu_backward, swiglu_forward)
from mmtrain.parallel.tensor import all_gather_dim0

__all__ = ["GroupBalance", "AllToAllDispatcher", "all_to_all", "shard_moe", "shard_experts",
           "expert_pieces"]


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


# ---------------------------------------------------------------------------------- balance
class GroupBalance(Balance):
    """:class:`~mmtrain.model.moe.Balance` over process groups (see the module docstring)."""

    def __init__(self, global_routing: bool, aux_group, local_cap_group):
        super().__init__(global_routing)
        self.aux_group = aux_group
        self.cap_group = aux_group if global_routing else local_cap_group

    def group_sum(self, t: torch.Tensor) -> torch.Tensor:
        if _size(self.aux_group) > 1:
            t = t.clone()
            dist.all_reduce(t, group=self.aux_group)
        return t

    def keep(self, idx_TK: torch.Tensor, num_experts: int, capacity_factor) -> torch.Tensor:
        if capacity_factor is None:
            return torch.ones_like(idx_TK, dtype=torch.bool)
        n, r = _size(self.cap_group), _rank(self.cap_group)
        if n == 1:
            return capacity_keep(idx_TK, num_experts, capacity_factor)
        T, K = idx_TK.shape
        counts_KE = F.one_hot(idx_TK.t(), num_experts).sum(dim=1)
        every_nKE = all_gather_dim0(counts_KE[None].contiguous(), self.cap_group)
        total_KE = every_nKE.sum(dim=0)
        prior_KE = total_KE.cumsum(dim=0) - total_KE + every_nKE[:r].sum(dim=0)
        cap = expert_capacity(T * n, K, num_experts, capacity_factor)
        return capacity_keep(idx_TK, num_experts, None, capacity=cap, prior_KE=prior_KE)


# ------------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out, work = all_to_all(x, out_splits, in_splits, group)
        if work is not None:
            work.wait()
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        out, work = all_to_all(g.contiguous(), in_splits, out_splits, ctx.group)
        if work is not None:
            work.wait()
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group,
               async_op: bool = False):
    """``all_to_all_single`` with uneven splits along dim 0; (out, work or None)."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    if _size(group) == 1:
        out.copy_(x)
        return out, None
    work = dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits),
                                  group=group, async_op=async_op)
    return out, (work if async_op else None)


def differentiable_all_to_all(x, out_splits, in_splits, group):
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# ------------------------------------------------------------------------------- the plan
class _GroupPlan:
    """Host-side sizes of one overlap group on this rank (all ints)."""

    def __init__(self, send_counts_jl, recv_ijl, etp_rank):
        # send_counts_jl[j][l]: rows this rank sends to EP rank j for its local expert l
        # recv_ijl[i][j][l]: rows ETP rank i (of this EP rank) gets from EP rank j for expert l
        self.in_splits = [sum(r) for r in send_counts_jl]
        self.out_splits = [sum(r) for r in recv_ijl[etp_rank]]
        self.etp_sizes = [sum(sum(r) for r in recv_i) for recv_i in recv_ijl]
        self.etp_rank = etp_rank
        r = torch.tensor(recv_ijl, dtype=torch.long)  # [etp, ep, El]
        # gathered layout: [i][j][l] blocks; expert-major order: for l, for i, for j
        starts = (r.reshape(-1).cumsum(0) - r.reshape(-1)).view(r.shape)
        lengths = r.permute(2, 0, 1).reshape(-1)
        first = starts.permute(2, 0, 1).reshape(-1)
        self.n_gathered = int(r.sum())
        within = torch.arange(self.n_gathered) - torch.repeat_interleave(
            lengths.cumsum(0) - lengths, lengths)
        self.perm = torch.repeat_interleave(first, lengths) + within
        self.expert_counts = r.sum(dim=(0, 1)).tolist()
        self.n_send = sum(self.in_splits)


def _to_device(plan: _GroupPlan, device, use_gmm: bool):
    perm = plan.perm.to(device, non_blocking=True)
    inv = torch.empty_like(plan.perm)
    inv[plan.perm] = torch.arange(plan.perm.numel())
    inv = inv.to(device, non_blocking=True)
    if use_gmm:
        offs = torch.tensor(plan.expert_counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        offs = offs.to(device, non_blocking=True)
        counts = None
    else:
        offs, counts = torch.zeros(0), list(plan.expert_counts)
    return perm, inv, offs, counts


# --------------------------------------------------------------------------- the pipeline
class _Streams:
    """Where the communication chain of a group runs. On CUDA a side stream: a group's EP
    all-to-all, the ETP collective that depends on it and the reshaping between them are
    enqueued there (NCCL ops async), so the main stream computes another group's expert GEMMs
    meanwhile; events order the hand-overs, ``record_stream`` keeps the caching allocator from
    reusing a buffer still read by the other stream. Elsewhere (gloo on CPU) everything is
    synchronous on the one thread and these calls do nothing."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            self.side = torch.cuda.Stream(device)

    def on_side(self):
        import contextlib

        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def mark(self, stream_name: str):
        """An event at the current end of ``stream_name`` ('main' or 'side')."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(getattr(self, stream_name))
        return ev

    def wait(self, stream_name: str, ev) -> None:
        if ev is not None:
            getattr(self, stream_name).wait_event(ev)

    def used_by(self, t: torch.Tensor, stream_name: str) -> torch.Tensor:
        if self.cuda:
            t.record_stream(getattr(self, stream_name))
        return t


def _fetch(st, x, p, ep_group, etp_group, etp, ready_ev):
    """Rows of one group to the experts' ranks (EP all-to-all) and, with ETP, to every ETP rank
    of them; enqueued on the side stream. Returns (rows, pending ETP work, event, n_recv)."""
    with st.on_side():
        st.wait("side", ready_ev)
        st.used_by(x, "side")
        recv, work = all_to_all(x, p.out_splits, p.in_splits, ep_group, async_op=True)
        if work is not None:
            work.wait()
        n = recv.shape[0]
        work2 = None
        if etp > 1:
            recv, work2 = all_to_all(recv.repeat(etp, 1), p.etp_sizes, [n] * etp, etp_group,
                                     async_op=True)
        ev = st.mark("side")
    return recv, work2, ev, n


def _arrive(st, fetched):
    """Make the main stream wait for a fetched group; its rows."""
    rows, work, ev, n = fetched
    st.wait("main", ev)
    if work is not None:
        work.wait()
    return st.used_by(rows, "main")


def _send_back(st, y, p, n, ep_group, etp_group, etp, ready_ev):
    """The reverse: ETP reduce-scatter (uneven, as an all-to-all and a sum) then the EP
    all-to-all home; enqueued on the side stream. Returns (out, pending work, event)."""
    with st.on_side():
        st.wait("side", ready_ev)
        st.used_by(y, "side")
        if etp > 1:
            part, work = all_to_all(y, [n] * etp, p.etp_sizes, etp_group, async_op=True)
            if work is not None:
                work.wait()
            y = part.view(etp, n, -1).sum(0)
        out, work = all_to_all(y, p.in_splits, p.out_splits, ep_group, async_op=True)
        ev = st.mark("side")
    return out, work, ev


def _pipeline(src, plans, bounds, ep_group, etp_group, compute):
    """The group schedule shared by forward and backward: ``src`` rows in send order ->
    ``compute(g, rows at the experts)`` -> the results back in send order. Group g+1 is fetched
    while g computes; group g goes home while g+1 computes."""
    st = _Streams(src.device)
    etp = _size(etp_group)
    ready = st.mark("main")

    def fetch(g):
        a, b = bounds[g]
        return _fetch(st, src[a:b], plans[g], ep_group, etp_group, etp, ready)

    pending = fetch(0) if plans else None
    returns = []
    for g, p in enumerate(plans):
        here, pending = pending, (fetch(g + 1) if g + 1 < len(plans) else None)
        rows = compute(g, _arrive(st, here))
        returns.append(_send_back(st, rows, p, here[3], ep_group, etp_group, etp,
                                  st.mark("main")) + (bounds[g],))
    out = src.new_empty(src.shape)
    for res, work, ev, (a, b) in returns:
        st.wait("main", ev)
        if work is not None:
            work.wait()
        out[a:b] = st.used_by(res, "main")
    return out


class _ExpertPipeline(torch.autograd.Function):
    """Rows sorted by (group, destination EP rank, expert) -> the experts' outputs in the same
    layout. Per group g: fetch (EP all-to-all, ETP all-gather) on the side stream, expert GEMMs
    on the main stream, send back (ETP reduce-scatter, EP all-to-all) on the side stream
    (:func:`_pipeline`). The backward runs the same schedule on the gradients: they travel the
    forward's return path backwards (EP all-to-all to the experts' ranks, ETP all-gather) and its
    dispatch path home, which are the same collectives as fetch and send-back."""

    @staticmethod
    def forward(ctx, x_send, w13, w2, plans, ep_group, etp_group):
        dt = x_send.dtype
        w13c, w2c = w13.to(dt), w2.to(dt)
        bounds, pos = [], 0
        for p in plans:
            bounds.append((pos, pos + p.n_send))
            pos += p.n_send
        dev_plans = [_to_device(p, x_send.device, grouped_mm_available(x_send)) for p in plans]
        saved = []

        def experts(g, gathered):
            perm, inv, offs, counts = dev_plans[g]
            xg = gathered.index_select(0, perm)
            yg, hg = swiglu_forward(xg, w13c, w2c, offs, counts)
            saved.extend((xg, hg))
            return yg.index_select(0, inv)

        y_send = _pipeline(x_send, plans, bounds, ep_group, etp_group, experts)
        ctx.plans, ctx.groups, ctx.bounds = plans, (ep_group, etp_group), bounds
        ctx.dev_plans = dev_plans
        ctx.wdtypes = (w13.dtype, w2.dtype)
        ctx.save_for_backward(w13c, w2c, *saved)
        return y_send

    @staticmethod
    def backward(ctx, dy_send):
        w13c, w2c, *flat = ctx.saved_tensors
        acc = torch.promote_types(w13c.dtype, torch.float32)  # fp32 (fp64 in fp64 tests)
        dw13 = torch.zeros(w13c.shape, dtype=acc, device=w13c.device)
        dw2 = torch.zeros(w2c.shape, dtype=acc, device=w2c.device)

        def experts(g, dy_recv):
            perm, inv, offs, counts = ctx.dev_plans[g]
            dxg, dw13g, dw2g = swiglu_backward(dy_recv.index_select(0, perm), flat[2 * g],
                                               flat[2 * g + 1], w13c, w2c, offs, counts)
            dw13.add_(dw13g)
            dw2.add_(dw2g)
            return dxg.index_select(0, inv)

        dx_send = _pipeline(dy_send.contiguous().to(w13c.dtype), ctx.plans, ctx.bounds,
                            *ctx.groups, experts)
        return (dx_send, dw13.to(ctx.wdtypes[0]), dw2.to(ctx.wdtypes[1]), None, None, None)


# ------------------------------------------------------------------------------- dispatcher
class AllToAllDispatcher:
    """The MoE seam over the expert grid (see the module docstring)."""

    def __init__(self, ep_group, etp_group, num_experts: int, overlap_groups: int = 1):
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep, self.etp = _size(ep_group), _size(etp_group)
        self.num_experts = num_experts
        self.groups = max(1, int(overlap_groups))
        self.host_syncs = 0  # counted for tests: one per layer call

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        E, G, ep, etp = self.num_experts, self.groups, self.ep, self.etp
        El = E // ep
        T, K = routing.idx_TK.shape
        dev = x_TD.device
        # 1. sort the kept slots by (group, expert); group = contiguous token range
        tok = torch.arange(T, device=dev).repeat_interleave(K)
        grp = (tok * G) // max(T, 1)
        flat_e = routing.idx_TK.reshape(-1)
        keep = routing.keep_TK.reshape(-1)
        key = torch.where(keep, grp * E + flat_e, torch.full_like(flat_e, G * E))
        order = torch.argsort(key, stable=True)
        counts_GE = torch.bincount(key, minlength=G * E + 1)[:G * E]
        # 2. counts: EP all-to-all, ETP all-gather, one host sync
        send = counts_GE.view(G, ep, El).transpose(0, 1).contiguous()  # [ep(dest), G, El]
        recv, _ = all_to_all(send.view(ep, -1), [1] * ep, [1] * ep, self.ep_group)
        recv_all = all_gather_dim0(recv.reshape(1, -1).contiguous(), self.etp_group)
        host = torch.cat([counts_GE, recv_all.reshape(-1)]).cpu()  # the layer's one sync
        self.host_syncs += 1
        cge = host[:G * E].view(G, ep, El)
        rall = host[G * E:].view(etp, ep, G, El)  # [etp member, src EP rank, group, expert]
        plans = [_GroupPlan(cge[g].tolist(), rall[:, :, g, :].tolist(), _rank(self.etp_group))
                 for g in range(G)]
        n_keep = int(cge.sum())
        # 3. rows out (kept slots only), through the pipeline, back
        dt = compute_dtype(x_TD)
        inv = inverse(order)
        x_send = gather_slots(x_TD.to(dt), order[:n_keep], inv, K)
        y_send = _ExpertPipeline.apply(x_send, experts.w13, experts.w2, plans,
                                       self.ep_group, self.etp_group)
        # 4. unpermute (dropped slots: zeros) and combine in fp32
        return combine_slots(y_send, order, inv, routing)


# --------------------------------------------------------------------------------- sharding
def expert_slices(num_experts: int, ffn: int, ep: int, ep_rank: int, etp: int, etp_rank: int):
    El, Fl = num_experts // ep, ffn // etp
    return slice(ep_rank * El, (ep_rank + 1) * El), slice(etp_rank * Fl, (etp_rank + 1) * Fl)


def local_w13(full: torch.Tensor, es: slice, fs: slice) -> torch.Tensor:
    """This rank's [El, 2·Fl, D] of a full [E, 2F, D] (W1 rows, then W3 rows, of the F slice)."""
    E, F2, D = full.shape
    v = full[es].reshape(es.stop - es.start, 2, F2 // 2, D)[:, :, fs]
    return v.reshape(es.stop - es.start, 2 * (fs.stop - fs.start), D)


def local_w2(full: torch.Tensor, es: slice, fs: slice) -> torch.Tensor:
    return full[es][:, :, fs]


def full_w13(local: torch.Tensor, ep_group, etp_group) -> torch.Tensor:
    """Inverse of :func:`local_w13` (collective over ETP then EP)."""
    El, F2l, D = local.shape
    parts = all_gather_dim0(local.reshape(El, 2, F2l // 2, D).movedim(2, 0).contiguous(),
                            etp_group)  # [etp·Fl, El, 2, D]
    w = parts.movedim(0, 2).reshape(El, -1, D).contiguous()
    return all_gather_dim0(w, ep_group)


def full_w2(local: torch.Tensor, ep_group, etp_group) -> torch.Tensor:
    parts = all_gather_dim0(local.movedim(2, 0).contiguous(), etp_group)  # [F, El, D]
    w = parts.movedim(0, 2).contiguous()
    return all_gather_dim0(w, ep_group)


def shard_moe(moe, ep_group, etp_group, overlap_groups: int):
    """Keep this rank's experts and F slice of one MoE layer and install the all-to-all
    dispatcher; returns (local_fn, full_fn) pairs for ``w13`` and ``w2``."""
    E, F2 = moe.experts.w13.shape[0], moe.experts.w13.shape[1]
    ep, etp = _size(ep_group), _size(etp_group)
    es, fs = expert_slices(E, F2 // 2, ep, _rank(ep_group), etp, _rank(etp_group))
    ex = moe.experts
    with torch.no_grad():
        ex.w13 = torch.nn.Parameter(local_w13(ex.w13.detach(), es, fs).clone())
        ex.w2 = torch.nn.Parameter(local_w2(ex.w2.detach(), es, fs).clone())
    moe.dispatcher = AllToAllDispatcher(ep_group, etp_group, E, overlap_groups)
    return ((lambda full: local_w13(full, es, fs), lambda loc: full_w13(loc, ep_group, etp_group)),
            (lambda full: local_w2(full, es, fs), lambda loc: full_w2(loc, ep_group, etp_group)))


def expert_pieces(shape13: tuple, shape2: tuple, es: slice, fs: slice):
    """Where this rank's ``w13`` [El, 2·Fl, D] and ``w2`` [El, D, Fl] sit in the full [E, 2F, D]
    and [E, D, F]: ``w13`` is two rectangles (the W1 rows, then the W3 rows, of the F slice),
    ``w2`` one; ``(full shape, pieces)`` each (see :mod:`mmtrain.model.init`)."""
    from mmtrain.model.init import Piece

    E, F2, D = shape13
    El, Fl, F = es.stop - es.start, fs.stop - fs.start, F2 // 2
    w13 = [Piece((0, 0, 0), (es.start, fs.start, 0), (El, Fl, D)),
           Piece((0, Fl, 0), (es.start, F + fs.start, 0), (El, Fl, D))]
    w2 = [Piece((0, 0, 0), (es.start, 0, fs.start), (El, shape2[1], Fl))]
    return (tuple(shape13), w13), (tuple(shape2), w2)


def shard_experts(model, ep_group, etp_group, overlap_groups: int) -> dict:
    """:func:`shard_moe` for every layer (works on the meta device); ``{fqn: (full shape,
    pieces)}`` of the expert parameters (initialisation and checkpoints use them)."""
    out = {}
    for i, layer in enumerate(model.layers):
        ex = layer.moe.experts
        shape13, shape2 = tuple(ex.w13.shape), tuple(ex.w2.shape)
        shard_moe(layer.moe, ep_group, etp_group, overlap_groups)
        es, fs = expert_slices(shape13[0], shape13[1] // 2, _size(ep_group), _rank(ep_group),
                               _size(etp_group), _rank(etp_group))
        p13, p2 = expert_pieces(shape13, shape2, es, fs)
        out[f"layers.{i}.moe.experts.w13"] = p13
        out[f"layers.{i}.moe.experts.w2"] = p2
    return out
