"""Document-masked softmax attention that returns the log-sum-exp (SPEC §3; the local op of
Varlen Ring Attention, SPEC §6).

Legend: Tq query rows, Tk key rows, H query heads, G KV heads (H = G·R), K head dim, N documents
(segments), BS the block size of a FlexAttention block mask.

A :class:`Segments` pairs query row ranges with key row ranges: segment n lets the rows
``[q0_n, q1_n)`` attend the keys ``[k0_n, k1_n)``; nothing crosses segments. ``causal`` segments
have identical query and key ranges (the diagonal of a packed stream: row i sees keys ≤ i of its
document); non-causal segments may have any lengths (ring attention's off-diagonal step: the rows
of one document on this rank against that document's rows on an earlier rank, all of which come
before). Rows in no segment get ``o = 0`` and ``lse = -inf``.

    forward(q [Tq,H,K], k [Tk,G,K], v [Tk,G,Kv], segs, scale) -> (o [Tq,H,Kv], lse [Tq,H] fp32)
    backward(q, k, v, o, lse, do, segs, scale) -> (dq, dk, dv)

``backward`` takes the *final* output and log-sum-exp of a row (after ring attention merged every
partial result), so the partial gradients of each step sum to the gradient of the merged output
(``P = exp(s - lse)``, ``dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))``, as flash attention's backward).

Two implementations, chosen by device (no silent fallback):

* **CUDA: FlexAttention** (``torch.nn.attention.flex_attention``, compiled once) with a block mask
  built directly from the document ranges (:func:`doc_block_mask`: per query block the contiguous
  range of key blocks that can be non-empty, split into full blocks and partial blocks that apply
  the document mask). GQA by ``enable_gqa`` (K/V are never repeated), ``lse`` via
  ``AuxRequest(lse=True)``. The backward recomputes the step with FlexAttention's autograd and
  feeds it ``w·dO`` and the matching gradient of its own ``lse`` (``w = exp(lse_step - lse)``),
  which gives exactly the flash-style gradient above.
* **CPU (and fp64): a torch reference**, one document at a time with explicit matrices, exact,
  in fp32 (fp64 for fp64 inputs), forward and backward written out (no autograd).

:class:`DocSoftmaxOp` wraps either as the model's ``SoftmaxOp`` interface
(``(q, k, v, cu_seqlens, scale) -> o``) for the single-device path; on CUDA it needs no host
synchronisation (the block mask is built on the device from ``cu_seqlens``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Segments", "DocAttention", "DocSoftmaxOp", "doc_block_mask", "flex_available"]

log = logging.getLogger(__name__)
BLOCK = 128  # FlexAttention's default sparse block size


# ------------------------------------------------------------------------------------ segments
@dataclass
class Segments:
    """Query/key row ranges of the documents (host lists), see the module docstring."""

    q: list  # [(q0, q1)] increasing, disjoint
    k: list  # [(k0, k1)] increasing, disjoint, same length as q
    causal: bool
    Tq: int
    Tk: int
    _dev: dict = field(default_factory=dict, repr=False)  # cached device tensors / block mask

    def __post_init__(self):
        if len(self.q) != len(self.k):
            raise ValueError("Segments: q and k need one range per document")
        if self.causal and any(a != b for a, b in zip(self.q, self.k)):
            raise ValueError("Segments: causal segments need identical query and key ranges")

    @classmethod
    def from_cu(cls, cu: list, T: Optional[int] = None) -> "Segments":
        """The causal documents of a packed stream with boundaries ``cu`` (host ints)."""
        T = cu[-1] if T is None else T
        r = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
        return cls(r, list(r), True, T, T)

    def __len__(self) -> int:
        return len(self.q)

    def doc_tensors(self, device):
        """(qdoc [Tq], kdoc [Tk], kstart [N], kend [N]) int32 on ``device``; rows outside any
        segment are -1 (queries) / -2 (keys), so they never match."""
        key = ("docs", str(device))
        if key not in self._dev:
            qdoc = torch.full((self.Tq,), -1, dtype=torch.int32)
            kdoc = torch.full((self.Tk,), -2, dtype=torch.int32)
            for n, ((q0, q1), (k0, k1)) in enumerate(zip(self.q, self.k)):
                qdoc[q0:q1] = n
                kdoc[k0:k1] = n
            ks = torch.tensor([a for a, _ in self.k] or [0], dtype=torch.int32)
            ke = torch.tensor([b for _, b in self.k] or [0], dtype=torch.int32)
            self._dev[key] = tuple(t.to(device, non_blocking=True) for t in (qdoc, kdoc, ks, ke))
        return self._dev[key]


# ----------------------------------------------------------------------------- torch reference
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scores(qs, ks, scale, causal):
    """qs [L, H, K], ks [M, G, K] (acc dtype) -> s [G, R, L, M] with -inf above the diagonal."""
    L, H, K = qs.shape
    M, G = ks.shape[0], ks.shape[1]
    q4 = qs.view(L, G, H // G, K).permute(1, 2, 0, 3)  # [G, R, L, K]
    s = (q4 @ ks.permute(1, 2, 0)[:, None]) * scale  # [G, R, L, M]
    if causal:
        s = s.masked_fill(torch.ones(L, M, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return s, q4


def ref_forward(q, k, v, segs: Segments, scale: float):
    acc = _acc_dtype(q)
    Tq, H = q.shape[0], q.shape[1]
    G, Kv = k.shape[1], v.shape[2]
    o = torch.zeros(Tq, H, Kv, dtype=acc, device=q.device)
    lse = torch.full((Tq, H), -math.inf, dtype=acc, device=q.device)
    for (q0, q1), (k0, k1) in zip(segs.q, segs.k):
        if q1 <= q0 or k1 <= k0:
            continue
        s, _ = _scores(q[q0:q1].to(acc), k[k0:k1].to(acc), scale, segs.causal)
        l = torch.logsumexp(s, dim=-1)  # [G, R, L]
        p = torch.exp(s - l[..., None])
        o_ = p @ v[k0:k1].to(acc).permute(1, 0, 2)[:, None]  # [G, R, L, Kv]
        o[q0:q1] = o_.permute(2, 0, 1, 3).reshape(q1 - q0, H, Kv)
        lse[q0:q1] = l.permute(2, 0, 1).reshape(q1 - q0, H)
    return o, lse.float() if acc == torch.float32 else lse


def ref_backward(q, k, v, o, lse, do, segs: Segments, scale: float):
    acc = _acc_dtype(q)
    H, G, K, Kv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    R = H // G
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for (q0, q1), (k0, k1) in zip(segs.q, segs.k):
        if q1 <= q0 or k1 <= k0:
            continue
        L = q1 - q0
        s, q4 = _scores(q[q0:q1].to(acc), k[k0:k1].to(acc), scale, segs.causal)
        l = lse[q0:q1].to(acc).view(L, G, R).permute(1, 2, 0)  # [G, R, L]
        p = torch.exp(s - l[..., None])  # [G, R, L, M] (0 where masked)
        do4 = do[q0:q1].to(acc).view(L, G, R, Kv).permute(1, 2, 0, 3)
        o4 = o[q0:q1].to(acc).view(L, G, R, Kv).permute(1, 2, 0, 3)
        v3 = v[k0:k1].to(acc).permute(1, 0, 2)  # [G, M, Kv]
        k3 = k[k0:k1].to(acc).permute(1, 0, 2)  # [G, M, K]
        dv[k0:k1] += (p.transpose(-1, -2) @ do4).sum(1).permute(1, 0, 2)
        dp = do4 @ v3[:, None].transpose(-1, -2)  # [G, R, L, M]
        ds = p * (dp - (do4 * o4).sum(-1, keepdim=True)) * scale
        dq[q0:q1] = (ds @ k3[:, None]).permute(2, 0, 1, 3).reshape(L, H, K)
        dk[k0:k1] += (ds.transpose(-1, -2) @ q4).sum(1).permute(1, 0, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------ FlexAttention
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention  # noqa
        return True
    except Exception:
        return False


def doc_block_mask(qdoc, kdoc, kstart, kend, causal: bool, Tq: int, Tk: int, block: int = BLOCK):
    """A FlexAttention BlockMask for document ranges, built on the device without a host sync.

    Per query row i of document d: allowed keys ``[kstart[d], kend[d])`` (and ``≤ i`` if causal).
    Per query block: the union of its rows' allowed key ranges gives the (contiguous) range of
    key blocks that may be non-empty; a key block lying inside every row's allowed range of a
    query block whose rows are all valid is *full* (no mask evaluated); the rest are partial
    (the mask_mod ``qdoc[i] == kdoc[j] (& i >= j)`` decides)."""
    from torch.nn.attention.flex_attention import BlockMask

    dev = qdoc.device
    nq, nk = -(-Tq // block), -(-Tk // block)
    Pq, Pk = nq * block, nk * block
    qd = torch.full((Pq,), -1, dtype=torch.int32, device=dev)
    qd[:Tq] = qdoc
    kd = torch.full((Pk,), -2, dtype=torch.int32, device=dev)
    kd[:Tk] = kdoc
    valid = qd >= 0
    d = qd.clamp(min=0).long()
    lo = kstart.long()[d]
    hi = kend.long()[d] - 1
    if causal:
        hi = torch.minimum(hi, torch.arange(Pq, device=dev))
    valid = valid & (hi >= lo)
    big = torch.iinfo(torch.int64).max // 4
    lo_v = torch.where(valid, lo, torch.full_like(lo, big)).view(nq, block)
    hi_v = torch.where(valid, hi, torch.full_like(hi, -1)).view(nq, block)
    ne0 = lo_v.amin(1) // block
    ne1 = torch.where(hi_v.amax(1) >= 0, hi_v.amax(1) // block, ne0 - 1)  # empty: ne1 < ne0
    all_valid = valid.view(nq, block).all(1)
    lo_max = torch.where(valid, lo, torch.full_like(lo, -1)).view(nq, block).amax(1)
    hi_min = torch.where(valid, hi, torch.full_like(hi, big)).view(nq, block).amin(1)
    f0 = (lo_max + block - 1) // block
    f1 = (hi_min + 1) // block - 1
    has_full = all_valid & (f1 >= f0)
    f0 = torch.where(has_full, f0, ne1 + 1)
    f1 = torch.where(has_full, f1, ne1)
    a = (f0 - ne0).clamp(min=0)  # partial blocks before the full range
    c = (ne1 - f1).clamp(min=0)  # partial blocks after it
    t = torch.arange(nk, device=dev)[None, :]
    part_idx = torch.where(t < a[:, None], ne0[:, None] + t, f1[:, None] + 1 + (t - a[:, None]))
    part_idx = torch.where(t < (a + c)[:, None], part_idx, torch.zeros_like(part_idx))
    nfull = (f1 - f0 + 1).clamp(min=0)
    full_idx = torch.where(t < nfull[:, None], f0[:, None] + t, torch.zeros_like(t))
    part_num = (a + c).to(torch.int32)

    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return (qd[q_idx] == kd[kv_idx]) & (q_idx >= kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return qd[q_idx] == kd[kv_idx]

    return BlockMask.from_kv_blocks(
        part_num[None, None], part_idx.to(torch.int32)[None, None],
        nfull.to(torch.int32)[None, None], full_idx.to(torch.int32)[None, None],
        BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Tq, Tk))


_COMPILED = {}


def _flex_fn():
    """flex_attention compiled once per process (eager FlexAttention materialises the scores)."""
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["fn"] = torch.compile(flex_attention)  # shapes: static first, then dynamic
        log.info("softmax attention: FlexAttention (compiled) with document block masks")
    return _COMPILED["fn"]


def _flex_call(q, k, v, bm, scale, compiled=True):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    fn = _flex_fn() if compiled else flex_attention
    H, G = q.shape[1], k.shape[1]
    out, aux = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                  block_mask=bm, scale=scale, enable_gqa=H != G,
                  return_aux=AuxRequest(lse=True))
    return out[0].transpose(0, 1), aux.lse[0].transpose(0, 1)  # [Tq, H, Kv], [Tq, H]


def _segments_mask(segs: Segments, device):
    key = ("mask", str(device))
    if key not in segs._dev:
        qdoc, kdoc, ks, ke = segs.doc_tensors(device)
        segs._dev[key] = doc_block_mask(qdoc, kdoc, ks, ke, segs.causal, segs.Tq, segs.Tk)
    return segs._dev[key]


# -------------------------------------------------------------------------------------- the op
class DocAttention:
    """The local document-masked attention with LSE: FlexAttention on CUDA, the torch
    reference elsewhere (``impl`` forces one: ``"flex"``, ``"flex_eager"`` (tests on CPU) or
    ``"reference"``)."""

    def __init__(self, impl: str = "auto"):
        if impl not in ("auto", "flex", "flex_eager", "reference"):
            raise ValueError(f"impl must be auto, flex, flex_eager or reference, got {impl!r}")
        self.impl = impl
        self._said = False

    def _use_flex(self, q) -> bool:
        if self.impl == "reference":
            return False
        if self.impl in ("flex", "flex_eager"):
            return True
        use = q.is_cuda and q.dtype != torch.float64
        if q.is_cuda and not use and not self._said:
            log.warning("softmax attention: fp64 on CUDA runs the torch reference (slow, exact)")
            self._said = True
        if use and not flex_available():
            raise RuntimeError("softmax attention on CUDA needs torch.nn.attention.flex_attention "
                               "with AuxRequest (torch >= 2.9)")
        return use

    def forward(self, q, k, v, segs: Segments, scale: float):
        if not self._use_flex(q):
            return ref_forward(q, k, v, segs, scale)
        bm = _segments_mask(segs, q.device)
        with torch.no_grad():
            o, lse = _flex_call(q, k, v, bm, scale, self.impl != "flex_eager")
        return o, lse.float()

    def backward(self, q, k, v, o, lse, do, segs: Segments, scale: float):
        if not self._use_flex(q):
            return ref_backward(q, k, v, o, lse, do, segs, scale)
        bm = _segments_mask(segs, q.device)
        compiled = self.impl != "flex_eager"
        return grad_by_recompute(lambda a, b, c: _flex_call(a, b, c, bm, scale, compiled),
                                 q, k, v, o, lse, do)


def grad_by_recompute(fn, q, k, v, o, lse, do):
    """The flash-style gradient of one step, given the final (o, lse) of its rows, from any
    differentiable ``fn(q, k, v) -> (o_step, lse_step)``: with ``w = exp(lse_step - lse)`` the
    merged output is ``Σ w·o_step``, so the step receives ``w·dO`` on its output and
    ``w·rowsum(dO ∘ (o_step - o))`` on its log-sum-exp."""
    with torch.enable_grad():
        q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
        o_s, lse_s = fn(q_, k_, v_)
        acc = torch.promote_types(lse_s.dtype, torch.float32)
        w = torch.exp(lse_s.to(acc) - lse.to(acc))  # [Tq, H]; 0 where this step saw nothing
        w = torch.where(torch.isfinite(lse_s), w, torch.zeros_like(w))
        dof = do.to(acc)
        g_o = (w[..., None] * dof).to(o_s.dtype)
        g_l = w * (dof * (o_s.to(acc) - o.to(acc))).sum(-1)
        dq, dk, dv = torch.autograd.grad((o_s, lse_s), (q_, k_, v_), (g_o, g_l.to(lse_s.dtype)))
    return dq, dk, dv


class _DocAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segs, scale, op):
        o, lse = op.forward(q, k, v, segs, scale)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.segs, ctx.scale, ctx.op = segs, scale, op
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.op.backward(q, k, v, o, lse, do, ctx.segs, ctx.scale)
        return dq, dk, dv, None, None, None


class DocSoftmaxOp:
    """The model's ``SoftmaxOp`` interface (``(q, k, v, cu_seqlens, scale) -> o``) over
    :class:`DocAttention`: FlexAttention on CUDA (no host sync: the block mask is built on the
    device), the exact torch reference on CPU."""

    def __init__(self, impl: str = "auto"):
        self.attn = DocAttention(impl)

    def __call__(self, q_THK, k_TGK, v_TGK, cu_seqlens, scale: float):
        T = q_THK.shape[0]
        if self.attn._use_flex(q_THK):
            key = (T, str(q_THK.device))
            cached = getattr(cu_seqlens, "_doc_block_mask", None)  # one mask for every layer
            if cached is not None and cached[0] == key:
                bm = cached[1]
            else:
                cu = cu_seqlens.to(device=q_THK.device, dtype=torch.int64)
                pos = torch.arange(T, device=q_THK.device)
                doc = (torch.searchsorted(cu, pos, right=True) - 1).to(torch.int32)
                bm = doc_block_mask(doc, doc, cu[:-1].to(torch.int32), cu[1:].to(torch.int32),
                                    True, T, T)
                cu_seqlens._doc_block_mask = (key, bm)
            # the same call (with LSE) as the ring's steps: one compiled graph serves both
            return _flex_call(q_THK, k_TGK, v_TGK, bm, scale, self.attn.impl != "flex_eager")[0]
        from mmtrain.data.batch import host_cu

        segs = Segments.from_cu(host_cu(cu_seqlens), T)
        return _DocAttnFn.apply(q_THK, k_TGK, v_TGK, segs, scale, self.attn)
