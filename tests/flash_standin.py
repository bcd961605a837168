"""A CPU stand-in for torch's FlashAttention-2 varlen kernel (``aten._flash_attention_forward`` /
``_flash_attention_backward``), so the ``flash`` implementation of
:class:`mmtrain.model.doc_attention.DocAttention` — its segment packing (cu_seqlens, gathers and
scatters, the LSE transpose, uncovered rows) — runs in CPU tests. One packed sequence at a time
with explicit einsums (independent of ``ref_forward`` / ``ref_backward``), and it asserts the
contract the real kernel imposes, so a packing bug fails here rather than on the GPU:

* int32 ``cu_seqlens`` on the data's device, contiguous, from 0 to the packed row count, every
  sequence non-empty, ``max_q`` / ``max_k`` the longest sequence, causal sequences square;
* q/k/v with a unit last stride, H a multiple of G; out and dout in q's dtype; the LSE fp32,
  contiguous, in the unpadded varlen layout ``[H, total_q]`` (returned so by the forward too).

``calls`` records each call's name and inputs (tests check which ones were views).
"""

import math

import torch


class FlashStandIn:
    def __init__(self):
        self.calls = []

    @staticmethod
    def _check(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        for cu, n in ((cu_q, q.shape[0]), (cu_k, k.shape[0])):
            assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.device == q.device
            assert cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == n, (cu, n)
        assert cu_q.numel() == cu_k.numel() >= 2
        lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        assert min(lq) > 0 and min(lk) > 0, "empty sequences reach the kernel"
        assert max(lq) == max_q and max(lk) == max_k, (lq, lk, max_q, max_k)
        assert not causal or lq == lk, "causal sequences must be square"
        assert all(x.stride(-1) == 1 for x in (q, k, v))
        assert q.shape[1] % k.shape[1] == 0 and k.shape[1] == v.shape[1]
        return lq, lk

    @staticmethod
    def _scores(q, k, a, b, c, d, causal, scale):
        """s [H, L, M] (fp64) of the sequence q[a:b] × k[c:d] and the repeated K/V heads."""
        R = q.shape[1] // k.shape[1]
        kk = k[c:d].double().repeat_interleave(R, dim=1)
        s = torch.einsum("lhd,mhd->hlm", q[a:b].double(), kk) * scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, d - c, dtype=torch.bool).triu(1), -math.inf)
        return s, kk, R

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        self.calls.append(("forward", q, k, v))
        self._check(q, k, v, cu_q, cu_k, max_q, max_k, causal)
        H = q.shape[1]
        out = torch.empty(q.shape[0], H, v.shape[2], dtype=q.dtype)
        lse = torch.empty(H, q.shape[0], dtype=torch.float32)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
            s, _, R = self._scores(q, k, a, b, c, d, causal, scale)
            l = torch.logsumexp(s, -1)  # [H, L]
            vv = v[c:d].double().repeat_interleave(R, dim=1)
            out[a:b] = torch.einsum("hlm,mhd->lhd", torch.exp(s - l[..., None]), vv).to(q.dtype)
            lse[:, a:b] = l.float()
        return out, lse

    def backward(self, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        self.calls.append(("backward", q, k, v, out, do))
        self._check(q, k, v, cu_q, cu_k, max_q, max_k, causal)
        assert out.dtype == do.dtype == q.dtype, (out.dtype, do.dtype, q.dtype)
        assert lse.dtype == torch.float32 and lse.is_contiguous()
        assert tuple(lse.shape) == (q.shape[1], q.shape[0]), lse.shape
        G, R = k.shape[1], q.shape[1] // k.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float64)
        dk = torch.zeros(k.shape, dtype=torch.float64)
        dv = torch.zeros(v.shape, dtype=torch.float64)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
            s, kk, _ = self._scores(q, k, a, b, c, d, causal, scale)
            p = torch.exp(s - lse[:, a:b].double()[..., None])  # with the given lse
            g, o = do[a:b].double(), out[a:b].double()
            vv = v[c:d].double().repeat_interleave(R, dim=1)
            dvv = torch.einsum("hlm,lhd->mhd", p, g)
            dp = torch.einsum("lhd,mhd->hlm", g, vv)
            ds = p * (dp - (g * o).sum(-1).t()[..., None])  # D = rowsum(dO ∘ out)
            dq[a:b] = torch.einsum("hlm,mhd->lhd", ds, kk) * scale
            dkk = torch.einsum("hlm,lhd->mhd", ds, q[a:b].double()) * scale
            dk[c:d] += dkk.view(d - c, G, R, -1).sum(2)
            dv[c:d] += dvv.view(d - c, G, R, -1).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
