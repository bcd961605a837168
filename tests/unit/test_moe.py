"""Router, aux loss and capacity dropping (SPEC §4)."""

import math

import pytest
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


# ------------------------------------------------------------------ fused experts, gradients
def _dense_reference(moe, x, keep=None):
    """Per-token loop over the chosen experts with plain autograd (w13 halves as W1 / W3)."""
    logits = x @ moe.router.weight.t()
    r = route(logits, moe.top_k, None)
    keep = r.keep_TK if keep is None else keep
    F = moe.experts.w13.shape[1] // 2
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(moe.top_k):
            if not keep[t, j]:
                continue
            i = r.idx_TK[t, j]
            w13, w2 = moe.experts.w13[i], moe.experts.w2[i]
            h = torch.nn.functional.silu(w13[:F] @ x[t]) * (w13[F:] @ x[t])
            acc = acc + r.weight_TK[t, j] * (w2 @ h)
        out.append(acc)
    return torch.stack(out), r


def test_moe_forward_and_gradients_match_dense_loop_with_drops():
    cfg = ModelConfig(hidden_size=12, num_experts=4, top_k=2, ffn_hidden_size=10,
                      capacity_factor=0.75)
    moe = MoE(cfg).double()
    moe.reset_parameters(1.0, torch.Generator().manual_seed(3))
    x = torch.randn(19, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    xa = x.clone().requires_grad_()
    y, aux = moe(xa)
    assert int(moe.last_stats["dropped"]) > 0
    w = torch.randn(19, 12, dtype=torch.float64)
    ((y * w).sum() + 0.3 * aux).backward()
    got = [xa.grad, moe.router.weight.grad, moe.experts.w13.grad, moe.experts.w2.grad]
    moe.zero_grad()
    xb = x.clone().requires_grad_()
    keep = capacity_keep(route(x @ moe.router.weight.t(), 2, None).idx_TK, 4, 0.75)
    ref, r = _dense_reference(moe, xb, keep)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    ((ref * w).sum() + 0.3 * aux_loss(r.probs_TE, r.idx_TK)).backward()
    want = [xb.grad, moe.router.weight.grad, moe.experts.w13.grad, moe.experts.w2.grad]
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_experts_skip_empty_experts_and_zero_rows():
    from mmtrain.model.moe import Experts

    ex = Experts(3, 8, 6).double()
    ex.reset_parameters(1.0, torch.Generator().manual_seed(0))
    x = torch.randn(7, 8, dtype=torch.float64)
    x[5:] = 0  # trailing rows past the kept ones ride with the last expert and give zero
    y = ex(x, torch.tensor([3, 0, 2]))
    F = 6
    for rows, e in ((slice(0, 3), 0), (slice(3, 5), 2)):
        h = torch.nn.functional.silu(x[rows] @ ex.w13[e, :F].t()) * (x[rows] @ ex.w13[e, F:].t())
        torch.testing.assert_close(y[rows], h @ ex.w2[e].t())
    assert (y[5:] == 0).all()


# ---------------------------------------------------------------- global-batch aux, metrics
def test_step_aux_is_exact_over_micro_batches_and_running_counts():
    from mmtrain.model.moe import Balance, step_summary

    torch.manual_seed(0)
    E, K = 4, 2
    probs = [torch.softmax(torch.randn(6, E) * 2, -1) for _ in range(2)]
    idx = [p.topk(K, -1).indices for p in probs]
    bal = Balance()
    bal.begin_step(12)
    terms = []
    for p, i in zip(probs, idx):
        counts = torch.bincount(i.reshape(-1), minlength=E)
        terms.append(bal.aux(0, p, counts))
        bal.record(0, p, counts, torch.tensor(0))
    allp, alli = torch.cat(probs), torch.cat(idx)
    exact = aux_loss(allp, alli)
    assert abs(step_summary(bal.stats[0][None], E, K)["aux_loss"] - float(exact)) < 1e-6
    # the last micro-batch's term uses the step's final (exact) counts; the first only its own
    f_all = torch.bincount(alli.reshape(-1), minlength=E).double() / alli.numel()
    f_0 = torch.bincount(idx[0].reshape(-1), minlength=E).double() / idx[0].numel()
    torch.testing.assert_close(terms[1].double(), E * (f_all * probs[1].sum(0).double()).sum() / 12)
    torch.testing.assert_close(terms[0].double(), E * (f_0 * probs[0].sum(0).double()).sum() / 12)
    # one micro-batch: the sum of the terms is exactly the global-batch aux
    bal.begin_step(12)
    one = bal.aux(0, allp, torch.bincount(alli.reshape(-1), minlength=E))
    torch.testing.assert_close(one, exact)


def test_step_summary_drop_rate_and_imbalance():
    from mmtrain.model.moe import step_summary

    # 2 layers, E=2, top-1: counts, prob sums, dropped, tokens
    stats = torch.tensor([[6.0, 2.0, 4.0, 4.0, 1.0, 8.0],
                          [4.0, 4.0, 4.0, 4.0, 0.0, 8.0]], dtype=torch.float64)
    s = step_summary(stats, 2, 1)
    assert s["drop_rate"] == 1 / 16
    assert s["expert_imbalance"] == 1.5  # 6 of a mean of 4, layer 0
    # aux: layer 0: 2·(0.75·0.5 + 0.25·0.5) = 1; layer 1: 1
    assert abs(s["aux_loss"] - 1.0) < 1e-12


# --------------------------------------------------------------------- checkpoints, legacy
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_with_separate_w1_w3_loads_into_fused_w13(tmp_path):
    """Checkpoints written before the gate/up fusion (w1, w3 [E, F, D]) still load."""
    import torch.distributed.checkpoint as dcp

    from mmtrain.model import MiniMaxModel
    from mmtrain.train import checkpoint as ckpt

    cfg = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, num_kv_heads=1,
                      softmax_every=2, num_experts=3, ffn_hidden_size=10)
    old = MiniMaxModel(cfg)
    old.reset_parameters(seed=5)
    state = {}
    for k, v in old.state_dict().items():
        if k.endswith("experts.w13"):
            state["model." + k.replace("w13", "w1")] = v[:, :10].clone()
            state["model." + k.replace("w13", "w3")] = v[:, 10:].clone()
        else:
            state["model." + k] = v
    path = tmp_path / "step_00000001"
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    (path / "rank_00000.json").write_text("{}")
    new = MiniMaxModel(cfg)
    new.reset_parameters(seed=6)
    ckpt.load(path, new)
    for k, v in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0)
