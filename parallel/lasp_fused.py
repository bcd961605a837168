"""LASP+ fused into the Triton lightning kernel's own passes (the CUDA path of
:class:`mmtrain.parallel.context.ContextLightningOp`; the generic ``_LaspPlus`` there is the
reference on CPU and the ``MMTRAIN_LASP_FUSED=0`` baseline).

The LASP+ arithmetic (SPEC §6; the states, the chain rules and :func:`combine_states`) is the one
of :mod:`mmtrain.parallel.context`; what differs is where the rank's states come from: the
kernel's two-pass plan already computes every item's local state in its state pass, and a hook
between that pass and the chain (``scan_attention(..., state_hook=)``) turns them into the
all-gathered incoming state, so no separate pass over k, v (forward) or q, dO (backward) runs.
"""

from __future__ import annotations

import os

import torch

from mmtrain.parallel.context import _corrected_rows, combine_states, states_outside_autocast

__all__ = ["FUSED", "fusable", "LaspPlusFused"]

#: The fused LASP+ path (below) is used wherever the local op is the Triton kernel; ``0`` forces
#: the generic one (for measuring the two side by side).
FUSED = os.environ.get("MMTRAIN_LASP_FUSED", "1") != "0"


def fusable(local, q) -> bool:
    from mmtrain.kernels.lightning import triton_scan as ts
    from mmtrain.model.ops import LightningOp

    return (FUSED and isinstance(local, LightningOp) and q.dtype != torch.float64
            and ts.HAVE_TRITON and (q.is_cuda or ts.interpreting()))


def _seg_weights(P, segs, s, reverse: bool, extra: int = 0):
    """``W`` [H, R, I]: ``Σ_i W[h, r, i] s_loc[i, h]`` is the state of kernel sequence
    ``segs[r]`` of plan ``P`` from a zero start (``None``: a zero row), from its items' local
    states — decayed to the sequence's end, or to its start when ``reverse``; ``extra`` more
    steps of decay. The distances and the mask are built once per (plan, segments) and kept on
    the device (every lightning layer of a micro-batch shares them); a layer's call costs three
    small ops here and one batched GEMM after, for all its pieces at once."""
    key = ("lasp_w", tuple(segs), reverse, extra)
    e = P.cache.get(key)
    if e is None:
        gap = torch.zeros(1, len(segs), P.n_items, dtype=torch.float32)
        mask = torch.zeros(1, len(segs), P.n_items, dtype=torch.float32)
        for r, n in enumerate(segs):
            if n is None:
                continue
            a, b = P.host_seq_items[n], P.host_seq_items[n + 1]
            for i in range(a, b):
                gap[0, r, i] = extra + (P.host_bos[i] - P.host_bos[a] if reverse
                                        else P.host_eos[b - 1] - P.host_eos[i])
                mask[0, r, i] = 1.0
        e = P.cache[key] = ((-gap).to(s.device), mask.to(s.device))
    neg_gap, mask = e
    return torch.exp(s[:, None, None] * neg_gap) * mask


def _seg_states(s_loc, P, segs, s, reverse: bool, extra: int = 0):
    """[R, H, K, V] (a strided view): the states of :func:`_seg_weights` from the items' local
    states ``s_loc`` [I, H, K, V] — one batched GEMM over the heads, reading ``s_loc`` in
    place."""
    I, H, K, V = s_loc.shape
    src = s_loc.permute(1, 0, 2, 3).flatten(2)  # [H, I, K·V], a view
    return torch.bmm(_seg_weights(P, segs, s, reverse, extra), src).transpose(0, 1).unflatten(
        2, (K, V))


def _layout(plan, dev):
    """What the hooks need of the CP plan, built once per plan (every lightning layer of a
    micro-batch, forward and backward, shares it): the corrected local pieces; the kernel
    sequence of each one's first segment (device indices); per local piece, its first segment
    if corrected, else None; the last segments (device indices)."""
    key = ("lasp_layout", str(dev))
    e = plan._cache.get(key)
    if e is None:
        rows = [b for b, _, _ in _corrected_rows(plan)]
        corrected = set(rows)
        first = [plan.first_seg[b] if b in corrected else None for b in range(plan.rows)]
        e = plan._cache[key] = (
            rows, torch.tensor([plan.first_seg[b] for b in rows], dtype=torch.long, device=dev),
            first, torch.tensor(plan.last_seg, dtype=torch.long, device=dev))
    return e


class LaspPlusFused(torch.autograd.Function):
    """LASP+ with the state GEMMs inside the Triton kernel's own passes.

    Forward: the kernel's state pass (two-pass plan) already computes every item's local state;
    the hook between its state pass and its chain sums the last piece's items into ``KV_r``,
    all-gathers, forms ``KV_in`` (:func:`combine_states`) and hands it to the chain as the initial
    state of the piece's first segment — the same arithmetic as :class:`_LaspPlus` without its
    separate pass over k and v. Backward: dq is the usual forward scan with ``KV_in``ᵀ as its
    initial state; the dv scan's state pass (over q and dO) gives ``dKV_in`` of the corrected
    rows (the reverse state of the first segment, times λ), the hook all-gathers it and feeds the
    decayed suffix ``dKV_r`` (÷ λ) to the chain; the dk scan takes its transpose."""

    @staticmethod
    @states_outside_autocast
    def forward(ctx, q, k, v, slopes, cu, cpx, plan):
        """``k is None``: ``q`` is the per-head packed qkv [1, T, H, 3K] (read in place; the
        backward returns one [1, T, H, 3K] gradient)."""
        from mmtrain.kernels.lightning import triton_scan as ts
        from mmtrain.kernels.lightning.autograd import _flat_bounds, _slog2, flat_qkv

        _, T, H = q.shape[:3]
        dev = q.device
        q_, k_, v_, ctx.packed = flat_qkv(q, k, v, T)
        K, V = q_.shape[-1], v_.shape[-1]
        s = slopes.detach().to(device=dev, dtype=torch.float32)
        slog2 = _slog2(slopes, dev)
        bounds = _flat_bounds(q, cu)
        rows, first_idx, _, _ = _layout(plan, dev)
        held = {}

        def hook(s_loc, P):
            kv = _seg_states(s_loc, P, plan.last_seg, s, False)
            gathered = cpx.all_gather(kv)
            init = s_loc.new_zeros(P.n_seq, H, K, V)
            if rows:  # KV_in enters the chain of each corrected piece's first segment
                init.index_copy_(0, first_idx, combine_states(plan, gathered, s, transpose=False,
                                                              rows=rows))
            held["init"] = init
            return init

        cfg = ts._cfg(K, V, q.dtype, dev)
        P = ts.get_plan(bounds, ts.choose_seg_len(bounds, H, -(-V // int(cfg["BV"])), dev), dev,
                        True)
        o, _, items_in = ts.scan_attention(q_, k_, v_, s, P, state_hook=hook, keep_items_in=True,
                                           cfg=cfg, slog2=slog2)
        ctx.save_for_backward(q_, k_, v_, held["init"])
        ctx.P, ctx.items_in, ctx.cfg = P, items_in, cfg  # dq's item states, transposed
        ctx.bounds, ctx.s, ctx.slog2, ctx.cpx, ctx.plan = bounds, s, slog2, cpx, plan
        ctx.shape = (T, H, K, V)
        return o.view(1, T, H, V)

    @staticmethod
    @states_outside_autocast
    def backward(ctx, do):
        from mmtrain.kernels.lightning import triton_scan as ts
        from mmtrain.kernels.lightning.autograd import _rows, grad_outs

        q_, k_, v_, init = ctx.saved_tensors
        T, H, K, V = ctx.shape
        plan, cpx, s, bounds, dev = ctx.plan, ctx.cpx, ctx.s, ctx.bounds, q_.device
        sl2 = ctx.slog2
        do_ = _rows(do, T)
        dqkv, dq_o, dk_o, dv_o = grad_outs(ctx.packed, T, H, K, q_)
        # the state-transposed scans (dq, dk) share one config and plan; dv has the forward's
        if K == V:
            cfg_t, P_t = ctx.cfg, ctx.P
        else:
            cfg_t = ts._cfg(V, K, q_.dtype, dev)
            P_t = ts.get_plan(bounds, ts.choose_seg_len(bounds, H, -(-K // int(cfg_t["BV"])),
                                                        dev), dev, True)
        if P_t is ctx.P:
            dq, _ = ts.scan_attention(do_, v_, k_, s, P_t, out_dtype=q_.dtype,
                                      items_in=ctx.items_in.transpose(-1, -2), cfg=cfg_t,
                                      slog2=sl2, out=dq_o)
        else:
            dq, _ = ts.scan_attention(do_, v_, k_, s, P_t, init.transpose(-1, -2),
                                      out_dtype=q_.dtype, cfg=cfg_t, slog2=sl2, out=dq_o)
        ctx.items_in = None
        _, _, first, last_idx = _layout(plan, dev)
        held = {}

        def hook(s_loc, P):  # s_loc: reverse local states of (q, dO)
            din = _seg_states(s_loc, P, first, s, True, extra=1)  # λ · (first segment's state)
            dkv = combine_states(plan, cpx.all_gather(din), s, transpose=True, extra=-1)  # ÷ λ
            Y = s_loc.new_zeros(P.n_seq, H, K, V)
            Y.index_copy_(0, last_idx, dkv)
            held["Y"] = Y
            return Y

        dv, _, items_v = ts.scan_attention(k_, q_, do_, s, ctx.P, reverse=True,
                                           out_dtype=v_.dtype, state_hook=hook,
                                           keep_items_in=True, cfg=ctx.cfg, slog2=sl2, out=dv_o)
        if P_t is ctx.P:  # the dv scan's item states, transposed
            dk, _ = ts.scan_attention(v_, do_, q_, s, P_t, reverse=True, out_dtype=k_.dtype,
                                      items_in=items_v.transpose(-1, -2), cfg=cfg_t, slog2=sl2,
                                      out=dk_o)
        else:
            dk, _ = ts.scan_attention(v_, do_, q_, s, P_t, held["Y"].transpose(-1, -2),
                                      reverse=True, out_dtype=k_.dtype, cfg=cfg_t, slog2=sl2,
                                      out=dk_o)
        if ctx.packed:
            return dqkv.view(1, T, H, 3 * K), None, None, None, None, None, None
        return (dq.view(1, T, H, K), dk.view(1, T, H, K), dv.view(1, T, H, V), None, None, None,
                None)
