"""The torch block form of lightning attention equals the plain recurrence of SPEC §2 (fp64)."""

import pytest
import torch

from mmtrain.kernels.lightning.reference import lightning_attn_block, lightning_attn_recurrent
from mmtrain.model.layers import lightning_slopes


def _inputs(T, H, K, V, n_seq, seed=0, packed=True):
    g = torch.Generator().manual_seed(seed)
    B = 1 if packed else n_seq
    q = torch.randn(B, T, H, K, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(B, T, H, K, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(B, T, H, V, dtype=torch.float64, generator=g).requires_grad_()
    h0 = torch.randn(n_seq, H, K, V, dtype=torch.float64, generator=g).requires_grad_()
    return q, k, v, h0


@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_block_equals_recurrence_varlen_with_states(block):
    T, H, K, V = 53, 3, 8, 6
    q, k, v, h0 = _inputs(T, H, K, V, n_seq=4)
    cu = torch.tensor([0, 7, 7 + 19, 7 + 19 + 1, T], dtype=torch.int32)  # unequal, one of length 1
    s = lightning_slopes(2, 8, H) * 3  # strong decays, so the decay factors really matter
    o_ref, f_ref = lightning_attn_recurrent(q, k, v, s, cu, h0, output_final_state=True)
    o_blk, f_blk = lightning_attn_block(q, k, v, s, cu, h0, output_final_state=True,
                                        block_size=block)
    torch.testing.assert_close(o_blk, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_blk, f_ref, rtol=0, atol=1e-10)
    w_o = torch.randn_like(o_ref)
    w_f = torch.randn_like(f_ref)
    g_ref = torch.autograd.grad((o_ref * w_o).sum() + (f_ref * w_f).sum(), (q, k, v, h0))
    g_blk = torch.autograd.grad((o_blk * w_o).sum() + (f_blk * w_f).sum(), (q, k, v, h0))
    for name, a, b in zip("q k v h0".split(), g_blk, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"grad {name}")


def test_batched_equals_recurrence_and_state_matters():
    T, H, K = 40, 2, 4
    q, k, v, h0 = _inputs(T, H, K, K, n_seq=3, packed=False)
    s = torch.tensor([0.05, 0.7], dtype=torch.float64)
    o_ref, f_ref = lightning_attn_recurrent(q, k, v, s, None, h0, True)
    o_blk, f_blk = lightning_attn_block(q, k, v, s, None, h0, True, block_size=16)
    torch.testing.assert_close(o_blk, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_blk, f_ref, rtol=0, atol=1e-10)
    o_zero, _ = lightning_attn_block(q, k, v, s, None, None, False, block_size=16)
    assert (o_zero - o_blk).abs().max() > 1e-3  # the initial state reaches the output


def test_recurrence_matches_closed_form():
    """o_t = Σ_{u≤t} λ^{t−u} (q_t·k_u) v_u, written out directly."""
    T, H, K = 9, 2, 3
    q, k, v, _ = _inputs(T, H, K, K, n_seq=1, packed=False)
    s = torch.tensor([0.3, 1.1], dtype=torch.float64)
    o, _ = lightning_attn_recurrent(q.detach(), k.detach(), v.detach(), s)
    lam = torch.exp(-s)
    for t in range(T):
        for h in range(H):
            want = sum(lam[h] ** (t - u) * (q[0, t, h] @ k[0, u, h]) * v[0, u, h]
                       for u in range(t + 1))
            torch.testing.assert_close(o[0, t, h], want.detach(), rtol=0, atol=1e-12)


def test_sequences_do_not_leak_across_cu_seqlens():
    T, H, K = 30, 2, 4
    q, k, v, _ = _inputs(T, H, K, K, n_seq=2)
    s = torch.tensor([0.01, 0.02], dtype=torch.float64)
    cu = torch.tensor([0, 12, T])
    o, _ = lightning_attn_block(q, k, v, s, cu, block_size=8)
    o2, _ = lightning_attn_block(q[:, 12:], k[:, 12:], v[:, 12:], s, block_size=8)
    torch.testing.assert_close(o[:, 12:], o2, rtol=0, atol=1e-12)
