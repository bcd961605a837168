"""Varlen Ring Attention (SPEC §6) for the softmax layers under context parallelism.

Legend: C CP size, r this rank's CP index, Tl tokens per piece, H query heads, G KV heads, K
head dim; pieces and virtual pieces as in :mod:`mmtrain.parallel.context` (V = C virtual pieces
a row under the contiguous partition, 2C under zigzag; rank r holds r, and 2C-1-r under zigzag;
every local piece is a local row of the plan, no per-document padding).

K/V of both pieces of a rank travel together: at hop h rank r holds the K/V of CP rank
``(r - h) mod C`` (hop 0: its own):

* diagonal (hop 0): varlen-causal attention of every local piece within itself (local
  ``cu_seqlens``, which always break at piece edges);
* off-diagonal: for a local piece u whose first token continues a document that began in an
  earlier piece, its rows before the first local document start attend, non-causally, the rows
  of that document in every earlier virtual piece w < u (from ``max(doc_start - w·Tl, 0)`` to
  the piece end), at the hop where w's owner's K/V are here. Under zigzag this includes hop 0
  (piece 2C-1-r attends piece r on the same rank) and wraps round the ring (rank 0's last piece
  needs every rank); the pieces a query piece needs of the visiting rank are consecutive in its
  stream, the first possibly partial and the rest whole, so they form one key range. Each hop
  runs one non-causal call per receiving slot (a call's query and key ranges must be disjoint).
  Every other (piece, piece) pair is skipped.

Local steps: every step is one call of :class:`mmtrain.model.doc_attention.DocAttention` on a
:class:`~mmtrain.model.doc_attention.Segments` (host ranges, cached on the plan with whatever
device tensors the implementation builds). On CUDA in fp16/bf16 that is torch's FlashAttention-2
varlen kernel (``impl="auto"``): the diagonal is one launch over the local stream with no copy,
an off-diagonal step gathers its query rows, and the backward gets the final merged (o, lse), so
no step is recomputed. ``ContextSoftmaxOp(impl="flex")`` runs FlexAttention instead (block masks
built lazily per Segments, recompute-style backward); off CUDA the exact torch reference runs.
Off-diagonal results are merged, and their gradients accumulated, on the rows their segments
cover only (``forward_rows`` / ``backward_rows``).

The number of hops is the largest ring distance any continuing document needs (from the plan,
the same on every rank); a batch whose documents never cross a rank's pieces runs no hop.
Partial results merge by log-sum-exp (fp32). The K/V of hop h+1 are in flight
(``batch_isend_irecv``) while hop h computes. Contiguous: the ring does not wrap (chunk r - h <
0 is nothing) and a rank sends only chunks its successor will use; zigzag: every rank sends and
receives at every hop.

Backward: the diagonal (and zigzag hop-0) gradients stay local; K/V go round again (prefetched
one hop ahead, like the forward) and a dK/dV accumulator follows its chunk (every rank adds the
contribution of its rows); contiguous: an accumulator that is complete (after the last hop, or
on the last rank) is sent straight back to the chunk's owner; zigzag: each hop's accumulator
goes to r+1 in one batch with the next one arriving from r-1, and after the last hop home to
rank r-n while this rank's comes back from r+n. Each step's local backward uses the final
merged (o, lse), so the partial gradients sum exactly.

Load balance (``parallel.cp_balance``). Causal attention over contiguous chunks is imbalanced:
for one document spanning all C ranks, rank r attends ``Tl(Tl+1)/2 + r·Tl²`` (query, key) pairs,
so the last rank does about 2C-1 times the first rank's work (3× at C=2). The zigzag partition
(the default) gives rank r pieces r and 2C-1-r of p = T/2C tokens: for that document every rank
attends ``p(p+1) + (2C-1)·p²`` pairs, exactly the same. Packed documents that do not span the
row are balanced only by finer pieces: ``parallel.cp_zigzag_rounds`` = R repeats the zigzag over
R stretches of 2C pieces (on the issue's benchmark batch at C=2, max/mean rank work 1.50
contiguous, 1.45 at R=1, 1.01 at R=2). LASP+ runs over the same partition
(its chain is over virtual pieces, :func:`mmtrain.parallel.context.combine_states`), so both
layer kinds see one partition of the hidden states. :func:`causal_work` counts the pairs per
rank of a batch (``scripts/bench_context.py --balance`` reports it next to each rank's measured
time). Packed documents much shorter than a piece cost about the same on every rank under
either partition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmtrain.model.doc_attention import DocAttention, Segments
from mmtrain.parallel.context import CPPlan, ContextParallel, plan_of

__all__ = ["ContextSoftmaxOp", "ring_segments", "causal_work"]


def diag_segments(plan: CPPlan) -> Segments:
    key = ("diag",)
    if key not in plan._cache:
        plan._cache[key] = Segments.from_cu(plan.cu, plan.tokens)
    return plan._cache[key]


def ring_segments(plan: CPPlan, hop: int) -> list:
    """The off-diagonal :class:`Segments` of hop ``hop`` on this rank (K/V of CP rank
    ``(r - hop) mod C``; hop 0: this rank's own K/V), one per receiving slot that has any (a
    query piece attends at most one key range per hop, so every list item has disjoint, increasing
    query and key ranges). Empty when nothing is attended."""
    key = ("hop", hop)
    if key not in plan._cache:
        C, Tl, m, r = plan.cp, plan.Tl, plan.per_row, plan.rank
        j = (r - hop) % C
        if plan.balance == "contiguous" and hop > r:  # no wrap-around: chunk r - hop < 0
            j = None
        by_slot = [([], []) for _ in range(m)]
        for i in range(plan.rows if j is not None else 0):
            if not (plan.cont[i] and plan.first[i] > 0):
                continue
            b, u, ds = i // m, plan.virt[i], plan.doc_start[i]
            ranges = []
            for w in range(ds // Tl, u):  # the earlier pieces of the document, held by rank j
                rj, sj = plan.owner(w)
                if rj == j:
                    k0 = (b * m + sj) * Tl
                    ranges.append((k0 + max(ds - w * Tl, 0), k0 + Tl))
            if not ranges:
                continue
            # rank j's pieces needed here are consecutive in its stream and all but the first
            # are needed whole: one key range
            for (_, e), (s0, _) in zip(ranges, ranges[1:]):
                assert e == s0, ("non-adjacent key ranges", ranges)
            qs, ks = by_slot[i % m]
            qs.append((i * Tl, i * Tl + plan.first[i]))
            ks.append((ranges[0][0], ranges[-1][1]))
        plan._cache[key] = [Segments(qs, ks, False, plan.tokens, plan.tokens)
                            for qs, ks in by_slot if qs]
    return plan._cache[key]


def causal_work(plan_for_rank) -> list:
    """Attended (query, key) pairs per rank: ``plan_for_rank(r)`` gives rank r's plan."""
    out = []
    for r in range(plan_for_rank(0).cp):
        p = plan_for_rank(r)
        n = sum((b - a) * (b - a + 1) // 2 for a, b in diag_segments(p).q)
        for h in range(0, p.ring_hops + 1):
            for s in ring_segments(p, h):
                n += sum((q1 - q0) * (k1 - k0) for (q0, q1), (k0, k1) in zip(s.q, s.k))
        out.append(n)
    return out


class _Exchange:
    """One hop of the ring: send ``tensors`` to r+1 (if it will use them), receive from r-1."""

    def __init__(self, cpx: ContextParallel, tensors, send: bool, recv: bool, shift: int = 1):
        r, C = cpx.rank, cpx.cp
        ops = []
        self.out = None
        if recv:
            self.out = [torch.empty_like(t) for t in tensors]
            ops += [dist.P2POp(dist.irecv, t, cpx.ranks[(r - shift) % C], cpx.group)
                    for t in self.out]
        if send:
            ops += [dist.P2POp(dist.isend, t.contiguous(), cpx.ranks[(r + shift) % C], cpx.group)
                    for t in tensors]
        self.ops = ops  # keeps the (contiguous copies of the) sent tensors alive until wait
        self.reqs = dist.batch_isend_irecv(ops) if ops else []

    def wait(self):
        for q in self.reqs:
            q.wait()
        self.ops = None
        return self.out


def _p2p(cpx: ContextParallel, sends, like, src):
    """One batch: ``sends`` [(tensor, CP rank)] and receives shaped like ``like`` from CP rank
    ``src``; waits for all of it and returns the received tensors."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), cpx.ranks[dst], cpx.group) for t, dst in sends]
    out = [torch.empty_like(t) for t in like]
    ops += [dist.P2POp(dist.irecv, t, cpx.ranks[src], cpx.group) for t in out]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _merge(o_acc, lse_acc, o, lse):
    new = torch.logaddexp(lse_acc, lse)
    w_old = torch.exp(lse_acc - new)
    w_new = torch.where(torch.isfinite(lse), torch.exp(lse - new), torch.zeros_like(lse))
    return o_acc * w_old[..., None] + o.to(o_acc.dtype) * w_new[..., None], new


def _merge_rows(o_acc, lse_acc, rows, o, lse):
    """Merge one step's result on its rows (:meth:`DocAttention.forward_rows`) into the
    accumulators, in place: only the rows the step covers are read and written."""
    if rows.n:
        o_m, lse_m = _merge(rows.take(o_acc), rows.take(lse_acc), o, lse.to(lse_acc.dtype))
        rows.write(o_acc, o_m)
        rows.write(lse_acc, lse_m)


def _add_rows(acc, step):
    """Add one step's gradients on its rows (:meth:`DocAttention.backward_rows`) into the
    accumulators (dq, dk, dv), in place."""
    q_rows, k_rows, gq, gk, gv = step
    q_rows.add(acc[0], gq.to(acc[0].dtype))
    k_rows.add(acc[1], gk.to(acc[1].dtype))
    k_rows.add(acc[2], gv.to(acc[2].dtype))


class _Ring(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, scale, attn, cpx, plan):
        r, n, C = plan.rank, plan.ring_hops, plan.cp
        wrap = plan.balance != "contiguous"  # zigzag: K/V go all the way round
        # Hop h's K/V are in flight while the previous hop computes.
        ex = (_Exchange(cpx, (k, v), send=wrap or r + 1 < C, recv=wrap or r >= 1)
              if n > 0 else None)
        o, lse = attn.forward(q, k, v, diag_segments(plan), scale)
        acc = torch.promote_types(o.dtype, torch.float32)
        o, lse = o.to(acc), lse.to(acc)
        for segs in ring_segments(plan, 0):  # zigzag: piece 2C-1-r attends piece r
            _merge_rows(o, lse, *attn.forward_rows(q, k, v, segs, scale))
        for h in range(1, n + 1):
            held = ex.wait()
            if held is None:
                break  # r - h < 0: nothing reaches this rank any more, and it sends nothing
            if h < n:  # pass this chunk on: r+1 uses it at hop h+1
                ex = _Exchange(cpx, held, send=wrap or r + 1 < C, recv=wrap or r - (h + 1) >= 0)
            for segs in ring_segments(plan, h):
                _merge_rows(o, lse, *attn.forward_rows(q, held[0], held[1], segs, scale))
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.attn, ctx.cpx, ctx.plan = scale, attn, cpx, plan
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        plan, cpx, attn, scale = ctx.plan, ctx.cpx, ctx.attn, ctx.scale
        r, n, C = plan.rank, plan.ring_hops, plan.cp
        wrap = plan.balance != "contiguous"
        # K/V of hop 1 travel while the diagonal backward runs.
        kv_ex = (_Exchange(cpx, (k, v), send=wrap or r + 1 < C, recv=wrap or r >= 1)
                 if n > 0 else None)
        dq, dk, dv = attn.backward(q, k, v, o, lse, do, diag_segments(plan), scale)
        acc = torch.promote_types(k.dtype, torch.float32)
        dq = dq.to(acc)
        if ring_segments(plan, 0):
            dk, dv = dk.to(acc), dv.to(acc)
            for segs in ring_segments(plan, 0):
                _add_rows((dq, dk, dv), attn.backward_rows(q, k, v, o, lse, do, segs, scale))
        mine = None
        zeros = lambda: (torch.zeros(k.shape, dtype=acc, device=k.device),  # noqa: E731
                         torch.zeros(v.shape, dtype=acc, device=v.device))
        if wrap:
            # Every rank holds a chunk at every hop. The accumulator of the chunk held at hop h
            # goes to r+1 in the same batch as the one for hop h+1 comes from r-1 (a cycle of
            # lone sends could deadlock); after the last hop it goes home to rank r-n while this
            # rank's own comes back from r+n.
            grads = zeros()
            for h in range(1, n + 1):
                held = kv_ex.wait()
                if h < n:
                    kv_ex = _Exchange(cpx, held, send=True, recv=True)
                for segs in ring_segments(plan, h):
                    _add_rows((dq,) + tuple(grads),
                              attn.backward_rows(q, held[0], held[1], o, lse, do, segs, scale))
                if h < n:
                    grads = tuple(_p2p(cpx, [(g, (r + 1) % C) for g in grads], zeros(),
                                       (r - 1) % C))
                else:
                    mine = _p2p(cpx, [(g, (r - n) % C) for g in grads], zeros(), (r + n) % C)
        for h in range(1, n + 1) if not wrap else ():
            # Per hop, in the same order on every link (r-1 -> r): K/V of hop h (prefetched at
            # hop h-1), the accumulator of chunk r-h (completed by r-1 at hop h-1), then the
            # prefetch of hop h+1's K/V, which overlaps this hop's compute.
            held = kv_ex.wait() if kv_ex is not None else None
            kv_ex = None
            grads = None
            if held is not None:  # r - h >= 0
                if h >= 2:
                    grads = tuple(_Exchange(cpx, zeros(), send=False, recv=True).wait())
                if h < n:
                    kv_ex = _Exchange(cpx, held, send=r + 1 < C, recv=r - (h + 1) >= 0)
                grads = grads or zeros()
                for segs in ring_segments(plan, h):
                    _add_rows((dq,) + tuple(grads),
                              attn.backward_rows(q, held[0], held[1], o, lse, do, segs, scale))
            # The accumulator of chunk r-h travels on to r+1, unless it is complete: at its
            # last hop (h = n) or on the last rank (r = C-1) it goes straight home to rank r-h.
            # Both, and this rank's own accumulator coming home, go in one batch (posting them
            # one after another could deadlock: r's send to r+1 is only received at hop h+1,
            # after r+1's send home to r).
            done = h == n or r == C - 1
            sends, recv_from = [], None
            if held is not None:
                sends = [(g, r + 1 if not done else r - h) for g in grads]
            if (h < n and r + h == C - 1) or (h == n and r + n <= C - 1):
                recv_from = r + h
            if sends or recv_from is not None:
                got = _p2p(cpx, sends, zeros() if recv_from is not None else (), recv_from)
                if recv_from is not None:
                    mine = got
        if mine is not None:
            dk = (dk.to(acc) + mine[0]).to(k.dtype)
            dv = (dv.to(acc) + mine[1]).to(v.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class ContextSoftmaxOp:
    """The softmax seam under CP: Varlen Ring Attention around the local :class:`DocAttention`
    (``attn``, else ``DocAttention(impl)``: ``auto`` runs FlashAttention-2 varlen on CUDA in
    half precision, ``flex`` forces FlexAttention)."""

    def __init__(self, cpx: ContextParallel, attn: DocAttention | None = None,
                 impl: str = "auto"):
        self.cpx = cpx
        self.attn = attn or DocAttention(impl)

    def __call__(self, q_THK, k_TGK, v_TGK, cu_seqlens, scale: float):
        plan = plan_of(cu_seqlens)
        return _Ring.apply(q_THK, k_TGK, v_TGK, scale, self.attn, self.cpx, plan)
