"""The SwiGLU activation of the grouped experts, fused: ``a = SiLU(g) ⊙ u`` from the stacked
gate/up GEMM output ``h = [g | u]`` ([n, 2F]), and its backward ``dh = [dg | du]`` together with
the recomputed ``a`` (needed for W2's gradient), each one pass over memory.

Math in fp32 inside the kernel, loads and stores in the tensors' dtype (bf16 in training). On CPU
the same functions run as torch ops (:func:`swiglu_act` / :func:`swiglu_act_backward` pick);
``TRITON_INTERPRET=1`` runs the kernels there for tests.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency of torch on Linux
    triton = None

_BLOCK = 1024


def _jit(fn):
    from mmtrain.kernels.lightning.triton_scan import _jit as jit

    return jit(fn)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# Plain functions, jitted at call time by the lightning module's ``_jit`` (the interpreter can be
# switched per call); only builtins of triton.language (no @jit helpers such as tl.sigmoid).
if triton is not None:
    def _fwd(h_ptr, a_ptr, n_el, F, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n_el
        row = i // F
        col = i - row * F
        g = tl.load(h_ptr + row * 2 * F + col, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F + F + col, mask=m, other=0.0).to(tl.float32)
        a = g / (1.0 + tl.exp(-g)) * u
        tl.store(a_ptr + i, a.to(a_ptr.dtype.element_ty), mask=m)

    def _bwd(h_ptr, da_ptr, dh_ptr, a_ptr, n_el, F, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n_el
        row = i // F
        col = i - row * F
        g = tl.load(h_ptr + row * 2 * F + col, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F + F + col, mask=m, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + i, mask=m, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        silu = g * s
        dg = da * u * (s * (1.0 + g * (1.0 - s)))
        du = da * silu
        tl.store(dh_ptr + row * 2 * F + col, dg.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dh_ptr + row * 2 * F + F + col, du.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(a_ptr + i, (silu * u).to(a_ptr.dtype.element_ty), mask=m)


def _use_kernel(h: torch.Tensor) -> bool:
    return triton is not None and h.is_contiguous() and (h.is_cuda or _interpret()) \
        and h.dtype != torch.float64


def swiglu_act(h_nH: torch.Tensor) -> torch.Tensor:
    """``SiLU(h[:, :F]) ⊙ h[:, F:]`` -> [n, F]."""
    n, H = h_nH.shape
    Fw = H // 2
    if not _use_kernel(h_nH):
        return torch.nn.functional.silu(h_nH[:, :Fw]) * h_nH[:, Fw:]
    a = h_nH.new_empty((n, Fw))
    if n:
        _jit(_fwd)[((n * Fw + _BLOCK - 1) // _BLOCK,)](h_nH, a, n * Fw, Fw, BLOCK=_BLOCK)
    return a


def swiglu_act_backward(h_nH: torch.Tensor, da_nF: torch.Tensor):
    """(dh [n, 2F], a [n, F]) given the upstream ``da``; ``a`` is recomputed."""
    n, H = h_nH.shape
    Fw = H // 2
    if not _use_kernel(h_nH):
        acc = torch.promote_types(h_nH.dtype, torch.float32)
        g, u = h_nH[:, :Fw].to(acc), h_nH[:, Fw:].to(acc)
        silu = torch.nn.functional.silu(g)
        d = da_nF.to(acc)
        dh = torch.empty((n, H), dtype=h_nH.dtype, device=h_nH.device)
        dh[:, :Fw] = torch.ops.aten.silu_backward(d * u, g)
        dh[:, Fw:] = d * silu
        return dh, (silu * u).to(h_nH.dtype)
    dh = torch.empty_like(h_nH)
    a = h_nH.new_empty((n, Fw))
    if n:
        _jit(_bwd)[((n * Fw + _BLOCK - 1) // _BLOCK,)](h_nH, da_nF.contiguous(), dh, a, n * Fw,
                                                       Fw, BLOCK=_BLOCK)
    return dh, a
