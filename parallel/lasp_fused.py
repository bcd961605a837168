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

from mmtrain.parallel.context import _corrected_rows, combine_states

__all__ = ["FUSED", "fusable", "LaspPlusFused"]

#: The fused LASP+ path (below) is used wherever the local op is the Triton kernel; ``0`` forces
#: the generic one (for measuring the two side by side).
FUSED = os.environ.get("MMTRAIN_LASP_FUSED", "1") != "0"


def fusable(local, q) -> bool:
    from mmtrain.kernels.lightning import triton_scan as ts
    from mmtrain.model.ops import LightningOp

    return (FUSED and isinstance(local, LightningOp) and q.dtype != torch.float64
            and ts.HAVE_TRITON and (q.is_cuda or ts.interpreting()))


def _seq_state(s_loc, P, n: int, s, reverse: bool):
    """The state of sequence ``n`` of kernel plan ``P`` from a zero start, from its items' local
    states ``s_loc`` [I, H, K, V]: decayed to the sequence's end (``reverse``: to its start).
    The items' decay distances are copied to the device once per plan (every lightning layer
    of a micro-batch shares it), not once per layer call."""
    a, b = P.host_seq_items[n], P.host_seq_items[n + 1]
    if b == a:
        return s_loc.new_zeros(s_loc.shape[1:])
    key = ("lasp_dist", n, reverse)
    e = P.cache.get(key)
    if e is None:
        if reverse:
            d = [P.host_bos[i] - P.host_bos[a] for i in range(a, b)]
        else:
            d = [P.host_eos[b - 1] - P.host_eos[i] for i in range(a, b)]
        e = P.cache[key] = torch.tensor(d, dtype=torch.float32, device=s_loc.device)
    w = torch.exp(-e[:, None] * s[None])
    return (w[:, :, None, None] * s_loc[a:b]).sum(0)


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
    def forward(ctx, q, k, v, slopes, cu, cpx, plan):
        from mmtrain.kernels.lightning import triton_scan as ts
        from mmtrain.kernels.lightning.autograd import _flat_bounds

        _, T, H, K = q.shape
        V = v.shape[-1]
        q_, k_, v_ = (x.contiguous().view(T, H, x.shape[-1]) for x in (q, k, v))
        s = slopes.detach().to(device=q.device, dtype=torch.float32)
        bounds = _flat_bounds(q, cu)
        rows = _corrected_rows(plan)
        held = {}

        def hook(s_loc, P):
            kv = torch.stack([_seq_state(s_loc, P, plan.last_seg[b], s, False)
                              for b in range(plan.rows)])
            kv_in = combine_states(plan, cpx.all_gather(kv), s, transpose=False)
            init = s_loc.new_zeros(P.n_seq, H, K, V)
            for b, _, _ in rows:
                init[plan.first_seg[b]] = kv_in[b]
            held["init"] = init
            return init

        nv = -(-V // int(ts._cfg(K, V, q.dtype, q.device)["BV"]))
        P = ts.get_plan(bounds, ts.choose_seg_len(bounds, H, nv, q.device), q.device, True)
        o, _, items_in = ts.scan_attention(q_, k_, v_, s, P, state_hook=hook, keep_items_in=True)
        ctx.save_for_backward(q_, k_, v_, held["init"])
        ctx.P, ctx.items_in = P, items_in  # dq's item states, transposed
        ctx.bounds, ctx.s, ctx.cpx, ctx.plan, ctx.shape = bounds, s, cpx, plan, (T, H, K, V)
        return o.view(1, T, H, V)

    @staticmethod
    def backward(ctx, do):
        from mmtrain.kernels.lightning import triton_scan as ts

        q_, k_, v_, init = ctx.saved_tensors
        T, H, K, V = ctx.shape
        plan, cpx, s, bounds, dev = ctx.plan, ctx.cpx, ctx.s, ctx.bounds, q_.device
        do_ = do.contiguous().view(T, H, V)

        def plan_for(d_out, d_state, two_pass=False):
            nv = -(-d_out // int(ts._cfg(d_state, d_out, q_.dtype, dev)["BV"]))
            return ts.get_plan(bounds, ts.choose_seg_len(bounds, H, nv, dev), dev, two_pass)

        P_q = plan_for(K, V, True)
        if P_q is ctx.P:
            dq, _ = ts.scan_attention(do_, v_, k_, s, P_q, out_dtype=q_.dtype,
                                      items_in=ctx.items_in.transpose(-1, -2))
        else:
            dq, _ = ts.scan_attention(do_, v_, k_, s, P_q, init.transpose(-1, -2),
                                      out_dtype=q_.dtype)
        ctx.items_in = None
        rows = _corrected_rows(plan)
        held = {}

        def hook(s_loc, P):  # s_loc: reverse local states of (q, dO)
            lam = torch.exp(-s)[:, None, None]
            din = s_loc.new_zeros(plan.rows, H, K, V)
            for b, _, _ in rows:
                din[b] = lam * _seq_state(s_loc, P, plan.first_seg[b], s, True)
            dkv = combine_states(plan, cpx.all_gather(din), s, transpose=True)
            Y = s_loc.new_zeros(P.n_seq, H, K, V)
            for b in range(plan.rows):
                Y[plan.last_seg[b]] = dkv[b] / lam
            held["Y"] = Y
            return Y

        P_v = plan_for(V, K, True)
        dv, _, items_v = ts.scan_attention(k_, q_, do_, s, P_v, reverse=True, out_dtype=v_.dtype,
                                           state_hook=hook, keep_items_in=True)
        P_k = plan_for(K, V, True)
        if P_k is P_v:  # the dv scan's item states, transposed
            dk, _ = ts.scan_attention(v_, do_, q_, s, P_k, reverse=True, out_dtype=k_.dtype,
                                      items_in=items_v.transpose(-1, -2))
        else:
            dk, _ = ts.scan_attention(v_, do_, q_, s, P_k, held["Y"].transpose(-1, -2),
                                      reverse=True, out_dtype=k_.dtype)
        return (dq.view(1, T, H, K), dk.view(1, T, H, K), dv.view(1, T, H, V), None, None, None,
                None)
