"""The two attention seams between the model and the parallel/kernel layers (DESIGN.md).

Legend: T tokens of the packed micro-batch, H query heads, G KV heads, K/V head dims,
N sequences (documents) in ``cu_seqlens``.

The model calls attention only through these op objects; each attention module holds one in
``self.core`` so ``mmtrain.parallel.apply`` can swap in a distributed version (LASP+, ring
attention) per module, without globals.

* ``LightningOp(q, k, v, slopes, cu_seqlens, initial_state=None) -> (o, final_state)``
  q, k, v: [1, T, H, K]; the Triton kernel on CUDA, the torch block form elsewhere.
  ``LightningOp.packed(qkv, slopes, cu_seqlens) -> (o, None)``: the same on the per-head packed
  qkv [1, T, H, 3K] the lightning layer projects (read in place on CUDA, one gradient); the
  layer calls it when its core has it (the CP op does), else the three-view call.
* ``SoftmaxOp(q, k, v, cu_seqlens, scale) -> o``
  q: [T, H, K], k, v: [T, G, K]; causal within each sequence, nothing across sequences.

Which softmax op runs where: the model's default core is :class:`SoftmaxOp` (on CUDA in half
precision flash-attn's varlen kernel when installed, else torch's built-in FlashAttention-2 varlen
kernel — one launch, no host sync; elsewhere one SDPA call per document, said once in the log on
CUDA). :class:`mmtrain.model.doc_attention.DocSoftmaxOp` is the
document-masked alternative with the same interface (on CUDA in fp16/bf16 torch's
FlashAttention-2 varlen kernel, FlexAttention with a block mask where that cannot run or when
chosen; the exact torch reference on CPU). Under context parallelism the softmax cores are
Varlen Ring Attention (:mod:`mmtrain.parallel.ring`) around
:class:`mmtrain.model.doc_attention.DocAttention` (the same implementations, returning the
log-sum-exp).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class LightningOp:
    """Local lightning attention: Triton on CUDA, torch block form elsewhere."""

    def __init__(self, block_size: int = 64):
        self.block_size = block_size

    def __call__(self, q, k, v, slopes, cu_seqlens=None, initial_state=None,
                 output_final_state=False):
        if q.is_cuda:
            from mmtrain.kernels.lightning import lightning_attn

            return lightning_attn(q, k, v, slopes, cu_seqlens=cu_seqlens,
                                  initial_state=initial_state,
                                  output_final_state=output_final_state)
        from mmtrain.kernels.lightning.reference import lightning_attn_block

        return lightning_attn_block(q, k, v, slopes, cu_seqlens=cu_seqlens,
                                    initial_state=initial_state,
                                    output_final_state=output_final_state,
                                    block_size=self.block_size)

    def packed(self, qkv, slopes, cu_seqlens=None):
        """The op on the per-head packed qkv [B, T, H, 3K] (``[q_h | k_h | v_h]`` per head, the
        lightning layer's projection): on CUDA the kernels read q, k, v in place and write one
        gradient (no copies of the three strided views, no concatenation of their gradients);
        elsewhere the block form on the views."""
        from mmtrain.kernels.lightning import lightning_attn_qkv
        from mmtrain.kernels.lightning.autograd import split_qkv

        if qkv.is_cuda:
            return lightning_attn_qkv(qkv, slopes, cu_seqlens=cu_seqlens)
        return self(*split_qkv(qkv, qkv.shape[-1] // 3), slopes, cu_seqlens)


def _flash_varlen():
    try:  # optional dependency, used when a user installed it
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except Exception:
        return None


def _torch_flash_varlen(q_THK, k_TGK, v_TGK, cu_seqlens, max_len: int, scale: float):
    """torch's own FlashAttention-2 varlen kernel (``aten._flash_attention_forward``, which
    carries its backward): causal within each document, GQA without copying K/V, one launch for
    the whole packed batch."""
    cu = cu_seqlens.to(torch.int32)
    return torch.ops.aten._flash_attention_forward(q_THK, k_TGK, v_TGK, cu, cu, max_len, max_len,
                                                   0.0, True, False, scale=scale)[0]


class SoftmaxOp:
    """Local varlen causal GQA attention.

    On CUDA in half precision: flash-attn's ``flash_attn_varlen_func`` when installed, else
    torch's built-in FlashAttention-2 varlen kernel (:func:`_torch_flash_varlen`) — one launch,
    no host sync (the longest document comes from the host copy of ``cu_seqlens`` that travels
    with the batch). Otherwise (CPU, fp32, or a torch without that kernel) SDPA one document at a
    time, exact on every device; on CUDA it is told once in the log, and cuDNN's SDPA backend is
    left out there (it builds a plan per new document length: milliseconds of host time a call).
    """

    _said = False  # the slow CUDA path is logged once per process
    _torch_flash_ok = True

    def __call__(self, q_THK, k_TGK, v_TGK, cu_seqlens, scale: float):
        from mmtrain.data.batch import host_cu

        H, G = q_THK.shape[1], k_TGK.shape[1]
        bounds = host_cu(cu_seqlens)
        half = q_THK.is_cuda and q_THK.dtype in (torch.float16, torch.bfloat16)
        if half:
            mx = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
            fn = _flash_varlen()
            if fn is not None:
                cu = cu_seqlens.to(torch.int32)
                return fn(q_THK, k_TGK, v_TGK, cu, cu, mx, mx, softmax_scale=scale, causal=True)
            if SoftmaxOp._torch_flash_ok:
                try:
                    return _torch_flash_varlen(q_THK, k_TGK, v_TGK, cu_seqlens, mx, scale)
                except (RuntimeError, TypeError) as exc:  # no such kernel in this torch build
                    SoftmaxOp._torch_flash_ok = False
                    log.warning("softmax attention: torch's FlashAttention varlen kernel is "
                                "unavailable (%s); falling back to one SDPA call per document",
                                str(exc).splitlines()[0][:200])
        if q_THK.is_cuda and not SoftmaxOp._said:
            SoftmaxOp._said = True
            log.warning("softmax attention: one SDPA call per document on CUDA (%s)",
                        "not half precision" if not half else "no varlen flash kernel")
        out = torch.empty_like(q_THK)
        rep = H // G
        ctx = contextlib.nullcontext()
        if q_THK.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                               SDPBackend.MATH])
        with ctx:
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b == a:
                    continue
                q = q_THK[a:b].transpose(0, 1)  # [H, L, K]
                k = k_TGK[a:b].transpose(0, 1).repeat_interleave(rep, dim=0)
                v = v_TGK[a:b].transpose(0, 1).repeat_interleave(rep, dim=0)
                o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                   scale=scale)[0]
                out[a:b] = o.transpose(0, 1)
        return out
