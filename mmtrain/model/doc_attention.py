"""Document-masked softmax attention that returns the log-sum-exp (SPEC §3; the local op of
Varlen Ring Attention, SPEC §6).

Legend: Tq query rows, Tk key rows, H query heads, G KV heads (H = G·R), K head dim, N documents
(segments), Lq / Lk the query / key rows the segments cover, BS the block size of a FlexAttention
block mask.

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
``forward_rows`` / ``backward_rows`` give the same results on the covered rows only (a
:class:`Rows` says which), so a caller that merges partial results (the ring) touches only them.

Three implementations (``DocAttention(impl)``; ``auto`` picks by device and dtype, says once in
the log which one runs, and never falls back silently):

* **CUDA, fp16/bf16, head dim ≤ 256 (multiple of 8), sm80+: FlashAttention-2 varlen** (``flash``,
  the ``auto`` choice there): torch's ``aten._flash_attention_forward`` / ``_backward``
  (:class:`TorchFlashVarlen`; tests inject a CPU stand-in), one launch per call, GQA without
  copies. The segments become the kernel's packed sequences (``cu_seqlens_q`` / ``_k`` int32 on
  the device, cached on the :class:`Segments`): slice views where the ranges tile one span (the
  diagonal of a packed stream: no copy at all), else rows gathered and results scattered back.
  Causal segments are square, so flash's causal mask is the document-causal one. The kernel's
  LSE ``[H, Lq]`` (unpadded varlen layout) is transposed to ``[Lq, H]``. The backward passes the
  final merged (o, lse) of the covered rows to ``_flash_attention_backward``, whose
  ``D = rowsum(dO ∘ O)`` and ``P = exp(S - lse)`` then give exactly this step's partial
  gradients, no recompute. Uncovered rows (lse -inf) never reach the kernel: dq is 0 there,
  dk/dv are 0 outside the key ranges.
* **FlexAttention** (``flex``; on CUDA the ``auto`` choice for fp32 or where flash cannot run,
  with a warning saying why; ``flex_eager`` uncompiled, for CPU tests) with a block mask built
  directly from the document ranges (:func:`doc_block_mask`: per query block the contiguous
  range of key blocks that can be non-empty, split into full blocks and partial blocks that apply
  the document mask), built lazily on first use and cached on the :class:`Segments`. GQA by
  ``enable_gqa`` (K/V are never repeated), ``lse`` via ``AuxRequest(lse=True)``. The backward
  recomputes the step with FlexAttention's autograd and feeds it ``w·dO`` and the matching
  gradient of its own ``lse`` (``w = exp(lse_step - lse)``), which gives exactly the flash-style
  gradient above.
* **CPU (and fp64): a torch reference** (``reference``), one document at a time with explicit
  matrices, exact, in fp32 (fp64 for fp64 inputs), forward and backward written out (no
  autograd).

:class:`DocSoftmaxOp` wraps any of them as the model's ``SoftmaxOp`` interface
(``(q, k, v, cu_seqlens, scale) -> o``) for the single-device path; on CUDA it needs no host
synchronisation (flash: the host copy of ``cu_seqlens`` that travels with the batch; flex: the
block mask is built on the device from ``cu_seqlens``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Segments", "Rows", "DocAttention", "DocSoftmaxOp", "TorchFlashVarlen",
           "doc_block_mask", "flex_available", "flash_unsupported"]

log = logging.getLogger(__name__)
BLOCK = 128  # FlexAttention's default sparse block size
IMPLS = ("auto", "flash", "flex", "flex_eager", "reference")
_SAID = set()  # log lines already written (each once per process)


def _say_once(level: int, msg: str) -> None:
    if msg not in _SAID:
        _SAID.add(msg)
        log.log(level, msg)


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

    def packing(self, device) -> "_Packing":
        """The segments as packed varlen sequences on ``device`` (cached), see :class:`_Packing`."""
        key = ("pack", str(device))
        if key not in self._dev:
            self._dev[key] = _Packing(self, device)
        return self._dev[key]


class Rows:
    """Rows of a ``[T, ...]`` tensor given as ordered ranges: a slice when the ranges tile one
    span without gaps (``span``; nothing is copied), else an int64 index on the device (``idx``;
    rows gathered and scattered). ``n`` rows in all, in the order of the ranges."""

    def __init__(self, ranges, T: int, device):
        ranges = [(a, b) for a, b in ranges if b > a]
        self.T, self.n, self.idx = T, sum(b - a for a, b in ranges), None
        self.span = (ranges[0][0], ranges[-1][1]) if ranges else (0, 0)
        if any(r[1] != s[0] for r, s in zip(ranges, ranges[1:])):
            self.span = None
            self.idx = torch.cat([torch.arange(a, b) for a, b in ranges]).to(device,
                                                                             non_blocking=True)

    def take(self, x):
        """x [T, ...] -> its rows [n, ...] (a view when the ranges tile a span)."""
        return x[self.span[0]:self.span[1]] if self.idx is None else x.index_select(0, self.idx)

    def put(self, part, fill: float):
        """[n, ...] -> [T, ...] with ``fill`` on every other row (``part`` itself when the
        ranges cover every row)."""
        if self.span == (0, self.T):
            return part
        out = part.new_full((self.T,) + tuple(part.shape[1:]), fill)
        self.write(out, part)
        return out

    def write(self, x, part) -> None:
        """x[rows] = part, in place."""
        if self.idx is None:
            x[self.span[0]:self.span[1]] = part
        else:
            x.index_copy_(0, self.idx, part)

    def add(self, x, part) -> None:
        """x[rows] += part, in place."""
        if self.idx is None:
            x[self.span[0]:self.span[1]] += part
        else:
            x.index_add_(0, self.idx, part)


class _Packing:
    """The non-empty segments as the kernel's packed sequences: query rows ``q`` and key rows
    ``k`` (:class:`Rows`, sequence n = segment n), ``cu_q`` / ``cu_k`` int32 on the device, the
    longest query / key sequence (host ints: no sync), ``n`` sequences. Both range lists must be
    increasing and disjoint (the :class:`Segments` contract): the scatter of the outputs and of
    the key gradients relies on it."""

    def __init__(self, segs: "Segments", device):
        pairs = [(a, b) for a, b in zip(segs.q, segs.k) if a[1] > a[0] and b[1] > b[0]]
        qr, kr = [a for a, _ in pairs], [b for _, b in pairs]
        for name, rr, T in (("q", qr, segs.Tq), ("k", kr, segs.Tk)):
            if any(a[1] > b[0] for a, b in zip(rr, rr[1:])) or any(b > T for _, b in rr):
                raise ValueError(f"Segments.{name}: ranges must be increasing, disjoint and "
                                 f"within [0, {T}), got {rr}")
        self.n = len(pairs)
        self.q, self.k = Rows(qr, segs.Tq, device), Rows(kr, segs.Tk, device)
        lq, lk = [b - a for a, b in qr], [b - a for a, b in kr]
        self.max_q, self.max_k = max(lq, default=0), max(lk, default=0)
        cu = torch.tensor([list(itertools.accumulate(x, initial=0)) for x in (lq, lk)],
                          dtype=torch.int32).to(device, non_blocking=True)  # [2, n+1]
        self.cu_q, self.cu_k = cu[0], cu[1]


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


# ------------------------------------------------------------------ FlashAttention-2 varlen
class TorchFlashVarlen:
    """torch's FlashAttention-2 varlen kernel: the two aten calls of the ``flash`` implementation.
    Tests inject a CPU stand-in with the same contract:

    * ``forward(q [Lq,H,K], k [Lk,G,K], v [Lk,G,K], cu_q, cu_k, max_q, max_k, causal, scale)
      -> (out [Lq,H,K] in q's dtype, lse [H, Lq] fp32)``;
    * ``backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)``
      with ``out``/``do`` in q's dtype and ``lse`` fp32 ``[H, Lq]`` contiguous: any (out, lse),
      not necessarily the forward's own (D = rowsum(do ∘ out), P = exp(S - lse)).

    ``cu_q`` / ``cu_k``: int32 [N+1] on the device, from 0 to Lq / Lk; every sequence non-empty;
    causal sequences have equal query and key lengths (flash aligns its causal mask to the end
    of the keys, which is then the diagonal)."""

    _rng = {}

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)[:2]
        return out, lse

    @staticmethod
    def backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        key = str(q.device)
        if key not in TorchFlashVarlen._rng:  # read only with dropout (we have none)
            TorchFlashVarlen._rng[key] = (torch.empty(2, dtype=torch.uint64, device=q.device),
                                          torch.empty(0, device=q.device))
        seed, unused = TorchFlashVarlen._rng[key]
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, seed, unused,
            scale=scale)
        return dq, dk, dv


def flash_unsupported(dtype, head_dim: int, v_head_dim: int, capability, built: bool):
    """Why torch's FlashAttention-2 kernel cannot run these inputs (None when it can)."""
    if not built:
        return "this torch build has no FlashAttention-2 kernel"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{str(dtype)[6:]} inputs (the kernel takes fp16/bf16)"
    if head_dim != v_head_dim:
        return f"query head dim {head_dim} != value head dim {v_head_dim}"
    if head_dim % 8 or head_dim > 256:
        return f"head dim {head_dim} (the kernel takes multiples of 8 up to 256)"
    if tuple(capability) < (8, 0):
        return f"compute capability {capability[0]}.{capability[1]} (the kernel needs sm80+)"
    return None


@functools.lru_cache(maxsize=None)
def _flash_reason(device: str, dtype, head_dim: int, v_head_dim: int):
    built = (hasattr(torch.ops.aten, "_flash_attention_forward")
             and torch.backends.cuda.is_flash_attention_available())
    cap = torch.cuda.get_device_capability(torch.device(device))
    return flash_unsupported(dtype, head_dim, v_head_dim, cap, built)


_SAYS = {"flash": "torch's FlashAttention-2 varlen kernel", "flex_eager": "FlexAttention, eager",
         "flex": "FlexAttention (compiled) with document block masks",
         "reference": "the torch reference"}


# -------------------------------------------------------------------------------------- the op
class DocAttention:
    """The local document-masked attention with LSE. ``impl``: ``auto`` (flash on CUDA in
    fp16/bf16 where the kernel runs, else FlexAttention with a warning; the torch reference on CPU
    and for fp64) or one forced: ``flash``, ``flex``, ``flex_eager`` (uncompiled, CPU tests),
    ``reference``. ``kernels``: the two varlen calls of ``flash`` (default
    :class:`TorchFlashVarlen`; a CPU stand-in in tests, then run on any device and dtype)."""

    def __init__(self, impl: str = "auto", kernels=None):
        if impl not in IMPLS:
            raise ValueError(f"DocAttention impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.impl = impl
        self.kernels = kernels

    def choose(self, q, v) -> str:
        """The implementation that runs for these inputs (said once per process in the log)."""
        impl = self.impl
        if impl == "auto":
            if not q.is_cuda:
                impl = "reference"
            elif q.dtype == torch.float64:
                _say_once(logging.WARNING, "softmax attention: fp64 on CUDA runs the torch "
                          "reference (slow, exact)")
                impl = "reference"
            else:
                why = _flash_reason(str(q.device), q.dtype, q.shape[-1], v.shape[-1])
                impl = "flash" if why is None else "flex"
                if why is not None:
                    _say_once(logging.WARNING, f"softmax attention: FlexAttention, not "
                              f"FlashAttention-2 ({why})")
        if impl == "flash" and self.kernels is None:
            why = ("not on CUDA" if not q.is_cuda else
                   _flash_reason(str(q.device), q.dtype, q.shape[-1], v.shape[-1]))
            if why is not None:
                raise RuntimeError(f"DocAttention(impl='flash') cannot run here: {why}; use "
                                   f"impl='auto' (picks what runs) or 'flex'")
        if impl in ("flex", "flex_eager") and not flex_available():
            raise RuntimeError("softmax attention with FlexAttention needs "
                               "torch.nn.attention.flex_attention with AuxRequest (torch >= 2.9)")
        _say_once(logging.INFO, "softmax attention (document-masked, with LSE): " + _SAYS[impl]
                  + (" (injected kernels)" if impl == "flash" and self.kernels else ""))
        return impl

    # ---- rows-only forms: the covered rows (a Rows) and the results on them
    def forward_rows(self, q, k, v, segs: Segments, scale: float):
        """(rows, o [n,H,Kv], lse [n,H]) on the rows the segments cover."""
        impl = self.choose(q, v)
        pk = segs.packing(q.device)
        if impl != "flash":
            o, lse = self.forward(q, k, v, segs, scale)
            return pk.q, pk.q.take(o), pk.q.take(lse)
        H, Kv = q.shape[1], v.shape[2]
        if pk.n == 0:
            return pk.q, q.new_zeros(0, H, Kv), q.new_zeros(0, H, dtype=torch.float32)
        kern = self.kernels or TorchFlashVarlen
        o, lse = kern.forward(pk.q.take(q), pk.k.take(k), pk.k.take(v), pk.cu_q, pk.cu_k,
                              pk.max_q, pk.max_k, segs.causal, scale)
        if tuple(lse.shape) != (H, pk.q.n):
            raise RuntimeError(f"flash varlen returned an LSE of shape {tuple(lse.shape)}, "
                               f"expected the unpadded layout [H={H}, total_q={pk.q.n}]")
        return pk.q, o, lse.t()

    def backward_rows(self, q, k, v, o, lse, do, segs: Segments, scale: float):
        """(q rows, k rows, dq [nq,H,K], dk [nk,G,K], dv [nk,G,Kv]) on the covered rows, given
        the final (o, lse) of every row (only the covered rows' are read)."""
        impl = self.choose(q, v)
        pk = segs.packing(q.device)
        if impl != "flash":
            dq, dk, dv = self.backward(q, k, v, o, lse, do, segs, scale)
            return pk.q, pk.k, pk.q.take(dq), pk.k.take(dk), pk.k.take(dv)
        if pk.n == 0:
            return (pk.q, pk.k) + tuple(torch.zeros_like(x[:0]) for x in (q, k, v))
        kern = self.kernels or TorchFlashVarlen
        lse_t = pk.q.take(lse).float().t().contiguous()  # [H, nq]: every row finite (covered)
        dq, dk, dv = kern.backward(pk.q.take(do).to(q.dtype), pk.q.take(q), pk.k.take(k),
                                   pk.k.take(v), pk.q.take(o).to(q.dtype), lse_t, pk.cu_q,
                                   pk.cu_k, pk.max_q, pk.max_k, segs.causal, scale)
        return pk.q, pk.k, dq, dk, dv

    # ---- full-size forms
    def forward(self, q, k, v, segs: Segments, scale: float):
        impl = self.choose(q, v)
        if impl == "reference":
            return ref_forward(q, k, v, segs, scale)
        if impl == "flash":
            rows, o, lse = self.forward_rows(q, k, v, segs, scale)
            return rows.put(o, 0.0), rows.put(lse, -math.inf)
        bm = _segments_mask(segs, q.device)
        with torch.no_grad():
            o, lse = _flex_call(q, k, v, bm, scale, impl == "flex")
        return o, lse.float()

    def backward(self, q, k, v, o, lse, do, segs: Segments, scale: float):
        impl = self.choose(q, v)
        if impl == "reference":
            return ref_backward(q, k, v, o, lse, do, segs, scale)
        if impl == "flash":
            qr, kr, dq, dk, dv = self.backward_rows(q, k, v, o, lse, do, segs, scale)
            return qr.put(dq, 0.0), kr.put(dk, 0.0), kr.put(dv, 0.0)
        bm = _segments_mask(segs, q.device)
        return grad_by_recompute(lambda a, b, c: _flex_call(a, b, c, bm, scale, impl == "flex"),
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
    :class:`DocAttention` (same ``impl`` / ``kernels``): FlashAttention-2 varlen on CUDA in
    half precision (the documents from the host copy of ``cu_seqlens``: no host sync), else
    FlexAttention on CUDA (no host sync: the block mask is built on the device), the exact torch
    reference on CPU. The segments / block mask are cached on ``cu_seqlens``: one for every
    layer of the batch."""

    def __init__(self, impl: str = "auto", kernels=None):
        self.attn = DocAttention(impl, kernels)

    def __call__(self, q_THK, k_TGK, v_TGK, cu_seqlens, scale: float):
        T = q_THK.shape[0]
        impl = self.attn.choose(q_THK, v_TGK)
        key = (T, str(q_THK.device))
        if impl in ("flex", "flex_eager"):
            cached = getattr(cu_seqlens, "_doc_block_mask", None)
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
            return _flex_call(q_THK, k_TGK, v_TGK, bm, scale, impl == "flex")[0]
        cached = getattr(cu_seqlens, "_doc_segments", None)
        if cached is not None and cached[0] == key:
            segs = cached[1]
        else:
            from mmtrain.data.batch import host_cu

            segs = Segments.from_cu(host_cu(cu_seqlens), T)
            cu_seqlens._doc_segments = (key, segs)
        return _DocAttnFn.apply(q_THK, k_TGK, v_TGK, segs, scale, self.attn)
