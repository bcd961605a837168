"""The fused SwiGLU activation kernels of the grouped experts under the CPU interpreter,
against torch autograd (fp32 and bf16; a row count that is not a multiple of the block)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmtrain.kernels.swiglu import swiglu_act, swiglu_act_backward  # noqa: E402


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_swiglu_kernels_match_autograd(monkeypatch, dtype, tol):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    n, F = 37, 48  # 37·48 = 1776 elements: two programs, the second partly masked
    h = (torch.randn(n, 2 * F, generator=g) * 3).to(dtype)
    da = torch.randn(n, F, generator=g).to(dtype)
    hr = h.double().requires_grad_()
    a_ref = torch.nn.functional.silu(hr[:, :F]) * hr[:, F:]
    a_ref.backward(da.double())
    a = swiglu_act(h)
    dh, a2 = swiglu_act_backward(h, da)
    assert a.dtype == dh.dtype == a2.dtype == dtype
    for got, want in ((a, a_ref), (a2, a_ref), (dh, hr.grad)):
        err = ((got.double() - want.detach()).norm() / want.detach().norm()).item()
        assert err < tol, err
    # the torch path (what CPU training runs) gives the same numbers as the kernel
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dh_t, a_t = swiglu_act_backward(h, da)
    torch.testing.assert_close(swiglu_act(h).double(), a.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(dh_t.double(), dh.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(a_t.double(), a2.double(), rtol=tol, atol=tol)
