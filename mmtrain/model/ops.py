"""The two attention seams between the model and the parallel/kernel layers (DESIGN.md).

Legend: T tokens of the packed micro-batch, H query heads, G KV heads, K/V head dims,
N sequences (documents) in ``cu_seqlens``.

The model calls attention only through these op objects; each attention module holds one in
``self.core`` so ``mmtrain.parallel.apply`` can swap in a distributed version (LASP+, ring
attention) per module, without globals.

* ``LightningOp(q, k, v, slopes, cu_seqlens, initial_state=None) -> (o, final_state)``
  q, k, v: [1, T, H, K]; the Triton kernel on CUDA, the torch block form elsewhere.
* ``SoftmaxOp(q, k, v, cu_seqlens, scale) -> o``
  q: [T, H, K], k, v: [T, G, K]; causal within each sequence, nothing across sequences.

Which softmax op runs where: the model's default core is :class:`SoftmaxOp` (flash-attn's varlen
kernel on CUDA when installed, else one SDPA call per document — a host sync and a launch per
document; said once in the log on CUDA). :class:`mmtrain.model.doc_attention.DocSoftmaxOp` is the
document-masked alternative with the same interface (FlexAttention with a block mask on CUDA, no
host sync; the exact torch reference on CPU). Under context parallelism the softmax cores are
Varlen Ring Attention (:mod:`mmtrain.parallel.ring`) around
:class:`mmtrain.model.doc_attention.DocAttention` (the same two implementations, returning the
log-sum-exp).
"""

from __future__ import annotations

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


def _flash_varlen():
    try:  # optional dependency, used when a user installed it
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except Exception:
        return None


class SoftmaxOp:
    """Local varlen causal GQA attention.

    CUDA with flash-attn installed: ``flash_attn_varlen_func``. Otherwise SDPA one sequence at a
    time (exact per document on every device)."""

    _said = False  # the slow CUDA path is logged once per process

    def __call__(self, q_THK, k_TGK, v_TGK, cu_seqlens, scale: float):
        H, G = q_THK.shape[1], k_TGK.shape[1]
        if q_THK.is_cuda and q_THK.dtype in (torch.float16, torch.bfloat16):
            fn = _flash_varlen()
            if fn is not None:
                cu = cu_seqlens.to(torch.int32)
                mx = int((cu[1:] - cu[:-1]).max())
                return fn(q_THK, k_TGK, v_TGK, cu, cu, mx, mx, softmax_scale=scale, causal=True)
        if q_THK.is_cuda and not SoftmaxOp._said:
            SoftmaxOp._said = True
            log.warning("softmax attention: one SDPA call per document on CUDA (flash-attn not "
                        "installed or not half precision); mmtrain.model.doc_attention."
                        "DocSoftmaxOp (FlexAttention) is the document-masked alternative")
        out = torch.empty_like(q_THK)
        rep = H // G
        bounds = cu_seqlens.tolist()
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
