"""Router, aux loss and capacity dropping (SPEC §4)."""

import math

import torch

from mmtrain.config import ModelConfig
from mmtrain.model.moe import MoE, aux_loss, capacity_keep, expert_capacity, route


def test_balanced_routing_gives_aux_one():
    E, K, T = 4, 2, 8
    probs = torch.full((T, E), 1.0 / E)
    # every expert gets exactly T*K/E slots
    idx = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    assert torch.bincount(idx.reshape(-1), minlength=E).tolist() == [4, 4, 4, 4]
    assert aux_loss(probs, idx).item() == 1.0


def test_hand_computed_small_case():
    logits = torch.tensor([[2.0, 1.0, 0.0],
                           [0.0, 0.0, 3.0]])
    r = route(logits, top_k=2, capacity_factor=None)
    p = torch.softmax(logits, -1)
    assert r.idx_TK.tolist() == [[0, 1], [2, 0]]  # torch.topk picks the lower index on ties
    want_w0 = torch.tensor([p[0, 0], p[0, 1]]) / (p[0, 0] + p[0, 1])
    torch.testing.assert_close(r.weight_TK[0], want_w0)
    torch.testing.assert_close(r.weight_TK.sum(-1), torch.ones(2))
    # f = slots per expert / 4 = [2, 1, 1] / 4; m = column means of p
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    m = p.mean(0)
    torch.testing.assert_close(aux_loss(r.probs_TE, r.idx_TK), 3 * (f * m).sum())


def test_capacity_drops_exactly_the_expected_slots():
    # 6 tokens, top-2, 3 experts, capacity_factor 0.5 → C = ceil(0.5*6*2/3) = 2
    assert expert_capacity(6, 2, 3, 0.5) == 2
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [1, 2]])
    keep = capacity_keep(idx, 3, 0.5)
    # first choices in token order: e0: t0,t1,t2 ; e1: t3,t5 ; e2: t4
    # then second choices: e1: t0,t2 ; e2: t1,t5 ; e0: t3,t4
    # capacity 2 → e0 keeps t0,t1 (first choices), drops t2's first and t3/t4's second choices;
    # e1 keeps t3,t5 (first choices) and drops t0's and t2's second choices;
    # e2 keeps t4 (first) and t1 (second), drops t5's second.
    want = torch.tensor([[True, False], [True, True], [False, False],
                         [True, False], [True, False], [True, False]])
    assert keep.tolist() == want.tolist()


def test_dropped_slots_contribute_nothing():
    cfg = ModelConfig(hidden_size=16, num_experts=2, top_k=1, ffn_hidden_size=8,
                      capacity_factor=0.5)
    moe = MoE(cfg)
    moe.reset_parameters(1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # expert 0 wins for inputs with positive sum
    x = torch.rand(8, 16) + 0.1  # all tokens pick expert 0; capacity ceil(0.5*8*1/2)=2
    y, _ = moe(x)
    assert moe.last_stats["dropped"] == 6
    assert (y[2:] == 0).all() and (y[:2] != 0).any()


def test_dropless_moe_matches_dense_loop():
    cfg = ModelConfig(hidden_size=8, num_experts=3, top_k=2, ffn_hidden_size=5)
    moe = MoE(cfg)
    moe.reset_parameters(1.0, torch.Generator().manual_seed(1))
    x = torch.randn(7, 8, dtype=torch.float32)
    y, _ = moe(x)
    r = route(x @ moe.router.weight.t(), 2, None)
    want = torch.zeros_like(x)
    e = moe.experts
    for t in range(7):
        for j in range(2):
            i = r.idx_TK[t, j]
            w1, w3 = e.w13[i, :5], e.w13[i, 5:]  # gate rows, then up rows
            h = torch.nn.functional.silu(w1 @ x[t]) * (w3 @ x[t])
            want[t] += r.weight_TK[t, j] * (e.w2[i] @ h)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert math.isclose(moe.last_stats["slots"], 14)
