"""The public lightning attention op: Triton forward and backward behind one autograd Function.

Legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

    lightning_attn(q, k, v, slopes, cu_seqlens=None, initial_state=None, output_final_state=False)
        q, k [B, T, H, K]; v [B, T, H, V]; slopes [H] (lam = exp(-s)); cu_seqlens int [N+1]
        (then B == 1); initial_state [N, H, K, V] (any float dtype, used as fp32).
        -> (o [B, T, H, V] in q's dtype, final_state fp32 [N, H, K, V] or None)

CUDA tensors run the Triton kernels; CPU tensors run the torch block reference unless
TRITON_INTERPRET=1 is set, in which case the same Triton kernels run in the interpreter.

Backward (see triton_scan's module doc): three scan-attention passes,
    dq = fwd scan(do, v, k; S0^T)    dv = rev scan(k, q, do; dSf/lam)    dk = rev scan(v, do, q; (dSf/lam)^T)
    dS0 = lam * (final state of the dv pass).
In the sequence-split (two-pass) mode dq's and dk's item states are the transposes of the
forward's and the dv scan's, so those two run their out pass only (5 launches instead of 9, and
14 instead of 18 units of traffic for the backward).
"""

from __future__ import annotations

import torch

from .reference import lightning_attn_block, sequence_bounds, _check
from . import triton_scan as ts

__all__ = ["lightning_attn", "lightning_attn_qkv"]


def _flat_bounds(q, cu_seqlens):
    B, T = q.shape[0], q.shape[1]
    return [(b * T + s, b * T + e) for b, s, e in sequence_bounds(q, cu_seqlens)]


def _rows(x, n):
    """[B, T, H, D] -> [B·T, H, D] for the kernels, a view wherever the strides allow (the
    kernels take any row and head strides with the last dim contiguous), else a copy."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(n, x.shape[2], x.shape[3])


def split_qkv(qkv_, K):
    """The q, k, v views of a per-head packed ``[..., H, 3K]`` tensor (``[q_h | k_h | v_h]``
    for each head): no copy."""
    return qkv_[..., :K], qkv_[..., K:2 * K], qkv_[..., 2 * K:]


def flat_qkv(q, k, v, n):
    """The kernels' [n, H, D] q, k, v (views where the strides allow), and whether the input was
    packed: ``k is None`` means ``q`` is the per-head packed qkv [B, T, H, 3K] (the autograd
    Functions take it in q's place)."""
    if k is None:
        return (*split_qkv(_rows(q, n), q.shape[-1] // 3), True)
    return _rows(q, n), _rows(k, n), _rows(v, n), False


def grad_outs(packed: bool, n, H, K, like):
    """Where the backward's three scans write dq, dk, dv: for a packed input, views of one
    [n, H, 3K] gradient (returned first; no concatenation after), else new tensors (None)."""
    if not packed:
        return None, None, None, None
    dqkv = torch.empty((n, H, 3 * K), dtype=like.dtype, device=like.device)
    return (dqkv, *split_qkv(dqkv, K))


def _slog2(slopes, device):
    """``slopes · log2 e`` (fp32, on ``device``), kept on the slopes tensor while it is unchanged
    (a layer's slopes are a constant buffer: one multiply per layer instead of one per call)."""
    key = (str(device), slopes._version, slopes.data_ptr())
    hit = getattr(slopes, "_mm_slog2", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = (slopes.detach().to(device=device, dtype=torch.float32) * ts.LOG2E).contiguous()
    try:
        slopes._mm_slog2 = (key, val)
    except (AttributeError, RuntimeError):  # e.g. a tensor subclass that takes no attributes
        pass
    return val


class _LightningAttnFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, slopes, initial_state, bounds, output_final_state, seg_len):
        B, T, H = q.shape[:3]
        q_, k_, v_, ctx.packed = flat_qkv(q, k, v, B * T)  # packed: lightning_attn_qkv
        K, V = q_.shape[-1], v_.shape[-1]
        cfg = ts._cfg(K, V, q.dtype, q.device)
        seg = ts.choose_seg_len(bounds, H, -(-V // int(cfg["BV"])), q.device, seg_len)
        plan = ts.get_plan(bounds, seg, q.device)
        slog2 = _slog2(slopes, q.device)
        o, final, items_in = ts.scan_attention(q_, k_, v_, slopes, plan, initial_state,
                                               output_final_state, keep_items_in=True, cfg=cfg,
                                               slog2=slog2)
        ctx.slog2, ctx.cfg = slog2, cfg  # the backward's scans reuse them (host time)
        ctx.save_for_backward(q_, k_, v_, slopes, initial_state)
        ctx.plan, ctx.items_in = plan, items_in  # two-pass: dq reuses them, transposed
        ctx.bounds, ctx.seg_len, ctx.shape = bounds, seg_len, (B, T, H, K, V)
        ctx.has_init = initial_state is not None
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        return o.view(B, T, H, V), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q_, k_, v_, slopes, s0 = ctx.saved_tensors
        B, T, H, K, V = ctx.shape
        dev = q_.device
        do_ = _rows(do, B * T)
        dqkv, dq_o, dk_o, dv_o = grad_outs(ctx.packed, B * T, H, K, q_)
        s = slopes.detach().to(device=dev, dtype=torch.float32)
        Y = None
        if dfinal is not None:
            Y = dfinal.float() * torch.exp(s)[None, :, None, None]  # dS_final / lam
        sl2 = ctx.slog2
        # the state-transposed scans (dq, dk) share one config; the dv scan has the forward's
        if K == V:  # the same config and so the same split as the forward's
            cfg_t, plan_t = ctx.cfg, ctx.plan
        else:
            cfg_t = ts._cfg(V, K, q_.dtype, dev)
            plan_t = ts.get_plan(ctx.bounds, ts.choose_seg_len(
                ctx.bounds, H, -(-K // int(cfg_t["BV"])), dev, ctx.seg_len), dev)
        # dq: forward scan with (q, k, v) -> (do, v, k), state S^T (V x K)
        if ctx.items_in is not None and plan_t is ctx.plan:  # the forward's states, transposed
            dq, _ = ts.scan_attention(do_, v_, k_, slopes, plan_t, out_dtype=q_.dtype,
                                      items_in=ctx.items_in.transpose(-1, -2), cfg=cfg_t,
                                      slog2=sl2, out=dq_o)
        else:
            dq, _ = ts.scan_attention(do_, v_, k_, slopes, plan_t,
                                      s0.transpose(-1, -2) if s0 is not None else None,
                                      out_dtype=q_.dtype, cfg=cfg_t, slog2=sl2, out=dq_o)
        ctx.items_in = None
        # dv (and dS0): reverse scan with (k, q, do), state R (K x V): the forward's config/plan
        plan_v = ctx.plan
        need_ds0 = ctx.has_init and ctx.needs_input_grad[4]
        dv, fin, items_v = ts.scan_attention(k_, q_, do_, slopes, plan_v, Y,
                                             output_final_state=need_ds0, reverse=True,
                                             out_dtype=v_.dtype, keep_items_in=True,
                                             cfg=ctx.cfg, slog2=sl2, out=dv_o)
        # dk: reverse scan with (v, do, q), state R^T (V x K)
        if items_v is not None and plan_t is plan_v:  # the dv scan's states, transposed
            dk, _ = ts.scan_attention(v_, do_, q_, slopes, plan_t, reverse=True,
                                      out_dtype=k_.dtype, items_in=items_v.transpose(-1, -2),
                                      cfg=cfg_t, slog2=sl2, out=dk_o)
        else:
            dk, _ = ts.scan_attention(v_, do_, q_, slopes, plan_t,
                                      Y.transpose(-1, -2) if Y is not None else None,
                                      reverse=True, out_dtype=k_.dtype, cfg=cfg_t, slog2=sl2,
                                      out=dk_o)
        ds0 = None
        if need_ds0:
            ds0 = (fin * torch.exp(-s)[None, :, None, None]).to(ctx.init_dtype)
        if ctx.packed:
            return (dqkv.view(B, T, H, 3 * K), None, None, None, ds0, None, None, None)
        return (dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, H, V), None, ds0,
                None, None, None)


def _use_triton(x) -> bool:
    return x.is_cuda or (ts.HAVE_TRITON and ts.interpreting())


def _triton_apply(x, q, k, v, slopes, cu_seqlens, initial_state, output_final_state, seg_len,
                  fn_args):
    """The checks and the Triton op of both entry points: ``x`` is the tensor the rows are
    counted on (q, or the packed qkv), ``fn_args`` the Function's first three inputs."""
    bounds = sequence_bounds(x, cu_seqlens)
    _check(q, k, v, slopes, initial_state, len(bounds))
    if x.dtype == torch.float64:
        raise TypeError("the Triton lightning kernel takes bf16, fp16 or fp32 inputs")
    return _LightningAttnFn.apply(*fn_args, slopes, initial_state, _flat_bounds(x, cu_seqlens),
                                  bool(output_final_state), seg_len)


def lightning_attn(q, k, v, slopes, cu_seqlens=None, initial_state=None,
                   output_final_state=False, *, seg_len: int | None = None):
    """Lightning attention (SPEC §2): o_t = sum_{u<=t} lam^(t-u) (q_t . k_u) v_u, per head.

    Returns (o, final_state); final_state is None unless output_final_state.
    ``seg_len`` (tuning/testing) forces the sequence-split length: 0 = single pass."""
    if not _use_triton(q):
        return lightning_attn_block(q, k, v, slopes, cu_seqlens, initial_state, output_final_state)
    return _triton_apply(q, q, k, v, slopes, cu_seqlens, initial_state, output_final_state,
                         seg_len, (q, k, v))


def lightning_attn_qkv(qkv, slopes, cu_seqlens=None, initial_state=None,
                       output_final_state=False, *, seg_len: int | None = None):
    """:func:`lightning_attn` of a per-head packed ``qkv`` [B, T, H, 3K] (``[q_h | k_h | v_h]``
    for each head, the layout of the model's qkv projection): the kernels read q, k and v in
    place and the backward writes their gradients into one [B, T, H, 3K] tensor, so neither the
    copies of three strided views nor the concatenation of their gradients runs."""
    if qkv.shape[-1] % 3:
        raise ValueError(f"lightning_attn_qkv: the last dim holds [q_h | k_h | v_h], so it must "
                         f"divide by 3; got qkv of shape {list(qkv.shape)}")
    q, k, v = split_qkv(qkv, qkv.shape[-1] // 3)
    if not _use_triton(qkv):
        return lightning_attn_block(q, k, v, slopes, cu_seqlens, initial_state, output_final_state)
    return _triton_apply(qkv, q, k, v, slopes, cu_seqlens, initial_state, output_final_state,
                         seg_len, (qkv, None, None))
