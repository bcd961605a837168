"""Triton lightning attention under the CPU interpreter, against the torch references (SPEC §2).

The kernel module reads TRITON_INTERPRET lazily at call time, so each test sets it with
monkeypatch (undone after the test) and nothing leaks into other test folders of the same
pytest process.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmtrain.kernels.lightning import (lightning_attn, lightning_attn_block,  # noqa: E402
                                       lightning_attn_qkv, lightning_attn_recurrent)

CU = [0, 50, 150, 207]  # 3 packed sequences of unequal lengths, none a multiple of the block (64)


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, K, V, dtype, n_state, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, K, generator=g) * 0.5).to(dtype)
    k = (torch.randn(B, T, H, K, generator=g) * 0.5).to(dtype)
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    s0 = torch.randn(n_state, H, K, V, generator=g) if with_state else None
    slopes = torch.tensor([0.02, 0.15, 0.7, 1.5][:H], dtype=torch.float32)
    w_o = torch.randn(B, T, H, V, generator=g)
    w_f = torch.randn(n_state, H, K, V, generator=g)
    return q, k, v, s0, slopes, w_o, w_f


def _run(fn, q, k, v, slopes, cu, s0, w_o, w_f, dtype_compute=None):
    """Forward, then grads of sum(o*w_o) + sum(final*w_f) w.r.t. q, k, v, s0."""
    leaves = [x.detach().clone().to(dtype_compute or x.dtype).requires_grad_()
              for x in (q, k, v)]
    s0l = None
    if s0 is not None:
        s0l = s0.detach().clone().to(dtype_compute or torch.float32).requires_grad_()
    sl = slopes.to(dtype_compute or torch.float32)
    o, f = fn(*leaves, sl, cu, s0l, True)
    loss = (o.to(w_o.dtype) * w_o.to(o.device)).sum().double() \
        + (f.to(w_f.dtype) * w_f.to(f.device)).sum().double()
    loss.backward()
    grads = [x.grad for x in leaves] + ([s0l.grad] if s0l is not None else [])
    return o.detach(), f.detach(), grads


@pytest.mark.parametrize("dtype,seg", [(torch.float32, 0), (torch.float32, 64),
                                       (torch.bfloat16, 0), (torch.bfloat16, 64)])
def test_packed_with_states(interp, dtype, seg):
    """Packed varlen, initial and final states, all gradients; single pass and sequence-split."""
    H, K, V = 2, 32, 32
    cu = torch.tensor(CU, dtype=torch.int32)
    T = CU[-1]
    q, k, v, s0, slopes, w_o, w_f = _inputs(1, T, H, K, V, dtype, len(CU) - 1)

    def kern(*a):
        return lightning_attn(*a, seg_len=seg)

    o, f, g = _run(kern, q, k, v, slopes, cu, s0, w_o, w_f)
    ro, rf, rg = _run(lightning_attn_recurrent, q, k, v, slopes, cu, s0, w_o, w_f,
                      dtype_compute=torch.float64)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert o.dtype == dtype and f.dtype == torch.float32
    assert rel(o, ro) < tol
    assert rel(f, rf) < tol
    for name, a, b in zip(["dq", "dk", "dv", "ds0"], g, rg):
        assert a.dtype == (dtype if name != "ds0" else torch.float32)
        assert rel(a, b) < tol, (name, rel(a, b))
    if dtype == torch.float32:  # and the block reference (the model's CPU path) agrees as well
        bo, bf, bg = _run(lightning_attn_block, q, k, v, slopes, cu, s0, w_o, w_f)
        assert rel(o, bo) < tol and rel(f, bf) < tol
        for a, b in zip(g, bg):
            assert rel(a, b) < tol


@pytest.mark.parametrize("dtype,seg", [(torch.float32, 0), (torch.bfloat16, 64)])
def test_qkv_packed_read_in_place(interp, dtype, seg):
    """lightning_attn_qkv on the per-head packed qkv [1, T, H, 3K] (the model's layout): the
    kernels read the strided q, k, v views in place and write one [1, T, H, 3K] gradient; output,
    final state and every gradient equal, bit for bit, lightning_attn on contiguous copies of the
    three (the copies the op made before); and the unpacked op on the strided views equals them
    too."""
    H, K = 2, 32
    cu = torch.tensor(CU, dtype=torch.int32)
    T = CU[-1]
    q, k, v, s0, slopes, w_o, w_f = _inputs(1, T, H, K, K, dtype, len(CU) - 1, seed=5)
    qkv = torch.cat([q, k, v], dim=-1).requires_grad_()
    s0p = s0.clone().requires_grad_()
    o, f = lightning_attn_qkv(qkv, slopes, cu, s0p, True, seg_len=seg)
    ((o.float() * w_o).sum() + (f * w_f).sum()).backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    ro, rf, rg = _run(lambda *a: lightning_attn(*a, seg_len=seg), q, k, v, slopes, cu, s0, w_o,
                      w_f)
    assert torch.equal(o, ro) and torch.equal(f, rf)
    for a, b in zip(list(qkv.grad.split(K, dim=-1)) + [s0p.grad], rg):
        assert torch.equal(a, b)
    vo, vf = lightning_attn(*qkv.detach().split(K, dim=-1), slopes, cu, s0, True, seg_len=seg)
    assert torch.equal(vo, o) and torch.equal(vf, f)
    with pytest.raises(ValueError, match="divide by 3"):
        lightning_attn_qkv(qkv[..., 1:], slopes, cu)


def test_qkv_packed_batched(interp):
    """Batched packed qkv [2, T, H, 3K] without cu_seqlens: each row its own sequence, the same
    numbers as the op on contiguous copies."""
    B, T, H, K = 2, 70, 2, 16
    q, k, v, _, slopes, w_o, _ = _inputs(B, T, H, K, K, torch.float32, B, seed=6,
                                         with_state=False)
    qkv = torch.cat([q, k, v], dim=-1).requires_grad_()
    o, _ = lightning_attn_qkv(qkv, slopes, seg_len=32)
    (o * w_o).sum().backward()
    cp = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, _ = lightning_attn(*cp, slopes, seg_len=32)
    (ro * w_o).sum().backward()
    assert torch.equal(o, ro)
    for a, b in zip(qkv.grad.split(K, dim=-1), cp):
        assert torch.equal(a, b.grad)


@pytest.mark.parametrize("seg", [0, 64])
def test_batched_no_state_d96(interp, seg):
    """Batched [B, T, H, d], head dim 96 (not a power of two, K != V), no initial state."""
    B, T, H, K, V = 2, 90, 1, 96, 64
    q, k, v, _, slopes, w_o, w_f = _inputs(B, T, H, K, V, torch.float32, B, seed=1,
                                           with_state=False)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, f = lightning_attn(*leaves, slopes, None, None, False, seg_len=seg)
    assert f is None
    (o * w_o).sum().backward()
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    ro, _ = lightning_attn_recurrent(*ref, slopes.double())
    (ro * w_o.double()).sum().backward()
    assert rel(o, ro) < 1e-4
    for a, b in zip(leaves, ref):
        assert rel(a.grad, b.grad) < 1e-4


def test_final_state_only_gradient(interp):
    """Gradient that flows only through the final state (the LASP+ path)."""
    H, K, V = 1, 16, 16
    cu = torch.tensor([0, 70, 100], dtype=torch.int32)
    q, k, v, s0, slopes, _, w_f = _inputs(1, 100, H, K, V, torch.float32, 2, seed=2)
    w_o = torch.zeros(1, 100, H, V)
    o, f, g = _run(lambda *a: lightning_attn(*a, seg_len=32), q, k, v, slopes, cu, s0, w_o, w_f)
    ro, rf, rg = _run(lightning_attn_block, q, k, v, slopes, cu, s0, w_o, w_f)
    assert g[0].abs().max() == 0  # q does not reach the final state
    for a, b in zip(g[1:], rg[1:]):
        assert rel(a, b) < 1e-4


def test_chain_fused_into_out_pass(interp, monkeypatch):
    """Sequence-split with a few items a sequence: the out pass chains its own incoming states
    (one launch less) and gives the separate chain kernel's outputs and gradients exactly (the
    same recursion); final states and dS0 agree to rounding. Above ``CHAIN_FUSE_WORK``
    token-heads the same plan launches the chain kernel and gives its results exactly."""
    from mmtrain.kernels.lightning import triton_scan as ts

    H, K, V = 2, 16, 16
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v, s0, slopes, w_o, w_f = _inputs(1, CU[-1], H, K, V, torch.float32, len(CU) - 1,
                                            seed=5)
    runs = {}
    for fuse in (0, 8):
        monkeypatch.setattr(ts, "CHAIN_FUSE_MAX", fuse)
        ts._PLAN_CACHE.clear()
        runs[fuse] = _run(lambda *a: lightning_attn(*a, seg_len=32), q, k, v, slopes, cu, s0,
                          w_o, w_f)
        bounds = [(a, b) for a, b in zip(CU, CU[1:])]
        assert ts.get_plan(bounds, 32, torch.device("cpu")).fuse_chain == (fuse > 0)
    ts._PLAN_CACHE.clear()
    # above CHAIN_FUSE_WORK token-heads a plan that could fuse launches the chain kernel
    launched = []
    jit = ts._jit
    monkeypatch.setattr(ts, "_jit", lambda fn, *a: launched.append(fn.__name__) or jit(fn, *a))
    monkeypatch.setattr(ts, "CHAIN_FUSE_WORK", CU[-1] * H - 1)
    runs["big"] = _run(lambda *a: lightning_attn(*a, seg_len=32), q, k, v, slopes, cu, s0, w_o,
                       w_f)
    assert "_scan_chain" in launched
    for a, b in zip((runs["big"][0], runs["big"][1], *runs["big"][2]),
                    (runs[0][0], runs[0][1], *runs[0][2])):
        assert torch.equal(a, b)
    ts._PLAN_CACHE.clear()
    (o0, f0, g0), (o1, f1, g1) = runs[0], runs[8]
    assert torch.equal(o0, o1)
    assert torch.allclose(f0, f1, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["dq", "dk", "dv"], g0[:3], g1[:3]):
        assert torch.equal(a, b), name
    assert torch.allclose(g0[3], g1[3], rtol=1e-5, atol=1e-6)
    ro, rf, rg = _run(lightning_attn_recurrent, q, k, v, slopes, cu, s0, w_o, w_f,
                      dtype_compute=torch.float64)
    assert rel(f1, rf) < 1e-4 and rel(g1[3], rg[3]) < 1e-4


def test_deterministic(interp):
    H, K, V = 1, 16, 16
    cu = torch.tensor([0, 33, 100], dtype=torch.int32)
    q, k, v, s0, slopes, w_o, w_f = _inputs(1, 100, H, K, V, torch.bfloat16, 2, seed=3)
    a = _run(lambda *x: lightning_attn(*x, seg_len=32), q, k, v, slopes, cu, s0, w_o, w_f)
    b = _run(lambda *x: lightning_attn(*x, seg_len=32), q, k, v, slopes, cu, s0, w_o, w_f)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)


def test_cpu_fallback_is_reference(monkeypatch):
    """Without the interpreter, CPU tensors take the torch block reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, s0, slopes, _, _ = _inputs(1, 40, 2, 8, 8, torch.float32, 2, seed=4)
    cu = torch.tensor([0, 15, 40])
    o, f = lightning_attn(q, k, v, slopes, cu, s0, True)
    bo, bf = lightning_attn_block(q, k, v, slopes, cu, s0, True)
    assert torch.equal(o, bo) and torch.equal(f, bf)


def test_rejects_bad_shapes(interp):
    q = torch.randn(2, 10, 1, 16)
    with pytest.raises(ValueError):
        lightning_attn(q, q, q, torch.ones(1), torch.tensor([0, 10]))
    with pytest.raises(ValueError):
        lightning_attn(q, q, q, torch.ones(1), None, torch.zeros(3, 1, 16, 16))


@pytest.mark.parametrize("reverse", [False, True])
def test_state_hook_one_item_per_sequence(interp, reverse):
    """A state hook on a plan whose sequences are one item each (what LASP+ runs at large H):
    the hook sees every sequence's local state from zero, and the outputs, final states and
    kept incoming states are those of the single pass from the hook's initial states, exactly
    (the plain out pass, no chain); the state pass alone (``local_states``) gives the hook's
    states."""
    from mmtrain.kernels.lightning import triton_scan as ts

    H, K, V = 2, 16, 32
    bounds = [(a, b) for a, b in zip(CU, CU[1:])]
    q, k, v, s0, slopes, _, _ = _inputs(1, CU[-1], H, K, V, torch.float32, len(CU) - 1, seed=7)
    q, k, v = (x[0].contiguous() for x in (q, k, v))
    dev = torch.device("cpu")
    P1 = ts.get_plan(bounds, None, dev, False)
    P2 = ts.get_plan(bounds, None, dev, True)
    assert P2.two_pass and P2.n_items == P2.n_seq
    seen = {}

    def hook(s_loc, P):
        seen["s_loc"] = s_loc.clone()
        return s0

    o, fin, kept = ts.scan_attention(q, k, v, slopes, P2, output_final_state=True,
                                     reverse=reverse, state_hook=hook, keep_items_in=True)
    o1, fin1 = ts.scan_attention(q, k, v, slopes, P1, s0, True, reverse=reverse)
    assert torch.equal(o, o1) and torch.equal(fin, fin1) and torch.equal(kept, s0)
    # the hook's states: each sequence's state from zero (its final state from a zero start)
    _, zero_fin = ts.scan_attention(q, k, v, slopes, P1, None, True, reverse=reverse)
    assert rel(seen["s_loc"], zero_fin) < 1e-5
    s_loc = ts.local_states(k, v, (slopes * ts.LOG2E).contiguous(), P2, reverse)
    assert torch.equal(s_loc, seen["s_loc"])
