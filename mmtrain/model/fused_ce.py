"""Chunked ("fused") linear cross-entropy: per-token CE of ``x @ Wᵀ`` without the logits.

Legend: N tokens, D hidden, V vocab, Vl the vocab rows this rank holds (V without TP), c the
tokens of one chunk.

``linear_cross_entropy(x_ND, w_VD, target_N, chunk)`` equals
``F.cross_entropy(x_ND @ w_VD.T, target_N, reduction="none")`` (fp32 softmax, ``ignore_index``
rows give 0 loss and 0 gradient) but never holds more than one chunk of logits: the forward keeps
only the per-token log-sum-exp [N] (fp32), and the backward recomputes each chunk's logits and
turns them into the chunk's gradients of x and of W (W's gradient is accumulated over the chunks
in fp32). Memory: about ``3 · c · Vl · 4`` bytes of temporaries instead of ``N · V`` logits plus
their fp32 copy and softmax; time: one more logits GEMM (the backward's recomputation).

Precision: the GEMMs run in the autocast dtype when autocast is on (bf16, as ``nn.Linear`` would
under autocast; the weight is cast per call, not kept), else in the inputs' dtype; max,
log-sum-exp and softmax in fp32 (fp64 for fp64 inputs). Without autocast the result equals the
plain computation to fp32 rounding (only the summation order of the GEMM blocks and of the
log-sum-exp differs).

Vocab parallelism: W may be one rank's rows ``[vocab_start, vocab_start + Vl)`` of the full
vocabulary; ``reduce(t, op)`` (``op`` ``"max"`` or ``"sum"``, in place over the ranks that hold
the other rows) then makes every chunk's row max, sum of exponentials and target logit global, so
every rank gets the full-vocabulary CE. The gradient of x is this rank's partial sum (its vocab
rows only): the caller sums it over those ranks (the backward of the all-gather that produced x
under sequence parallelism does). ``mmtrain.parallel.tensor.vocab_parallel_linear_cross_entropy``
supplies the group; this file has no collectives (DESIGN.md: the model never imports
``torch.distributed``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Reduce = Callable[[torch.Tensor, str], None]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.bfloat16,
                                                         torch.float16):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_VD, target_N, chunk, vocab_start, ignore_index, reduce):
        cdt = _compute_dtype(x_ND)
        acc = torch.promote_types(cdt, torch.float32)
        N, Vl = x_ND.shape[0], w_VD.shape[0]
        local = target_N - vocab_start
        inside = (local >= 0) & (local < Vl)
        local = torch.where(inside, local, torch.zeros_like(local))
        valid = target_N != ignore_index
        lse = torch.empty(N, dtype=acc, device=x_ND.device)
        picked = torch.empty(N, dtype=acc, device=x_ND.device)
        with torch.autocast(x_ND.device.type, enabled=False):
            wc = w_VD.to(cdt)
            for a in range(0, N, chunk):
                b = min(a + chunk, N)
                lf = torch.mm(x_ND[a:b].to(cdt), wc.t()).to(acc)  # [c, Vl]
                mx = lf.max(dim=-1).values
                if reduce is not None:
                    reduce(mx, "max")
                pk = lf.gather(1, local[a:b, None])[:, 0] * inside[a:b].to(acc)
                se = lf.sub_(mx[:, None]).exp_().sum(dim=-1)
                both = torch.stack([se, pk])
                if reduce is not None:
                    reduce(both, "sum")
                lse[a:b] = mx + both[0].log()
                picked[a:b] = both[1]
                del lf
        loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
        ctx.save_for_backward(x_ND, w_VD, local, inside, valid, lse)
        ctx.chunk, ctx.cdt, ctx.acc = chunk, cdt, acc
        return loss

    @staticmethod
    def backward(ctx, g_N):
        x_ND, w_VD, local, inside, valid, lse = ctx.saved_tensors
        cdt, acc, chunk = ctx.cdt, ctx.acc, ctx.chunk
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = x_ND.shape[0]
        g = torch.where(valid, g_N.to(acc), torch.zeros((), dtype=acc, device=g_N.device))
        dx = torch.empty_like(x_ND) if need_x else None
        dw = torch.zeros(w_VD.shape, dtype=acc, device=w_VD.device) if need_w else None
        with torch.autocast(x_ND.device.type, enabled=False):
            wc = w_VD.to(cdt)
            for a in range(0, N, chunk):
                b = min(a + chunk, N)
                xc = x_ND[a:b].to(cdt)
                p = torch.mm(xc, wc.t()).to(acc)  # the chunk's logits again
                p.sub_(lse[a:b, None]).exp_()  # softmax over the full vocabulary
                rows = torch.arange(b - a, device=p.device)
                p[rows, local[a:b]] -= inside[a:b].to(acc)
                p.mul_(g[a:b, None])
                d = p.to(cdt)  # dlogits [c, Vl]
                del p
                if need_x:
                    dx[a:b] = torch.mm(d, wc)
                if need_w:
                    if cdt == acc:
                        dw.addmm_(d.t(), xc)
                    else:
                        dw.add_(torch.mm(d.t(), xc))
        return (dx, dw.to(w_VD.dtype) if need_w else None, None, None, None, None, None)


def linear_cross_entropy(x_ND: torch.Tensor, w_VD: torch.Tensor, target_N: torch.Tensor,
                         chunk: int = 4096, *, vocab_start: int = 0, ignore_index: int = -100,
                         reduce: Optional[Reduce] = None) -> torch.Tensor:
    """Per-token CE [N] (fp32; fp64 for fp64 inputs) of the logits ``x_ND @ w_VD.T``, computed
    ``chunk`` tokens at a time (see the module docstring)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if x_ND.dim() != 2 or w_VD.dim() != 2 or x_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(f"x [N, D] and w [V, D] expected, got {tuple(x_ND.shape)} and "
                         f"{tuple(w_VD.shape)}")
    if target_N.shape != (x_ND.shape[0],):
        raise ValueError(f"target [N={x_ND.shape[0]}] expected, got {tuple(target_N.shape)}")
    return _LinearCE.apply(x_ND, w_VD, target_N, int(chunk), int(vocab_start), int(ignore_index),
                           reduce)
