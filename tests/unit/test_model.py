"""The model: packing isolation, layouts, slopes, parameter accounting, DeepNorm."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmtrain.config import ModelConfig
from mmtrain.model import MiniMaxModel, account
from mmtrain.model.attention import LightningAttention, SoftmaxAttention
from mmtrain.model.layers import lightning_slopes
from mmtrain.model.ops import LightningOp


def tiny(**kw):
    base = dict(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, head_dim=8,
                num_kv_heads=2, softmax_every=2, num_experts=4, top_k=2, ffn_hidden_size=16,
                lightning_block_size=4)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


DOCS = [5, 11, 1, 7]  # lengths of the packed documents, not multiples of the block


def _packed_vs_alone(module_fn, dim):
    torch.manual_seed(0)
    T = sum(DOCS)
    x = torch.randn(T, dim, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(DOCS).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in DOCS])
    mod = module_fn()
    packed = mod(x, cu, pos)
    start = 0
    for n in DOCS:
        alone = mod(x[start:start + n], torch.tensor([0, n], dtype=torch.int32), torch.arange(n))
        torch.testing.assert_close(packed[start:start + n], alone, rtol=0, atol=1e-12)
        start += n


def test_lightning_layer_packed_equals_each_document_alone():
    cfg = tiny()
    _packed_vs_alone(lambda: LightningAttention(cfg, 1).double(), cfg.hidden_size)


def test_softmax_layer_packed_equals_each_document_alone():
    cfg = tiny()
    _packed_vs_alone(lambda: SoftmaxAttention(cfg, 1).double(), cfg.hidden_size)


@pytest.mark.parametrize("layout", [dict(softmax_every=2), dict(softmax_every=0),
                                    dict(softmax_every=1), dict(softmax_layers=[0, 3])])
def test_whole_model_packed_row_equals_documents_alone(layout):
    cfg = tiny(**layout)
    model = MiniMaxModel(cfg).double()
    model.reset_parameters(3)
    T = sum(DOCS)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0] + torch.tensor(DOCS).cumsum(0).tolist(), dtype=torch.int32)
    logits = model(tokens, cu).logits
    start = 0
    for n in DOCS:
        alone = model(tokens[:, start:start + n]).logits
        torch.testing.assert_close(logits[:, start:start + n], alone, rtol=0, atol=1e-10)
        start += n


def test_rows_are_sequence_boundaries_and_positions_restart():
    cfg = tiny()
    model = MiniMaxModel(cfg).double()
    model.reset_parameters(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 9))
    batched = model(tokens).logits
    for b in range(3):
        torch.testing.assert_close(batched[b], model(tokens[b:b + 1]).logits[0], rtol=0,
                                   atol=1e-10)


def test_layer_layouts():
    assert tiny(softmax_every=2).layer_types() == ["lightning", "softmax"] * 2
    assert tiny(softmax_every=0).layer_types() == ["lightning"] * 4
    assert tiny(softmax_every=1).layer_types() == ["softmax"] * 4
    assert tiny(softmax_layers=[0, 2]).layer_types() == ["softmax", "lightning"] * 2
    m = MiniMaxModel(tiny(softmax_layers=[1]))
    assert [type(l.attn).__name__ for l in m.layers] == [
        "LightningAttention", "SoftmaxAttention", "LightningAttention", "LightningAttention"]


@pytest.mark.parametrize("layer,head", [(0, 0), (0, 63), (7, 5), (40, 31), (79, 0), (79, 63)])
def test_slopes_follow_spec(layer, head):
    L, H = 80, 64
    want = 2 ** (-8 * (head + 1) / H) * (1 - layer / (L - 1) + 1e-5)
    assert lightning_slopes(layer, L, H)[head].item() == pytest.approx(want, rel=1e-15)


def test_lightning_module_uses_its_layer_slopes_and_per_head_qkv_layout():
    cfg = tiny(num_layers=8, softmax_every=0)
    mod = LightningAttention(cfg, 5)
    torch.testing.assert_close(mod.slopes, lightning_slopes(5, 8, 4).float())
    # per-head layout: head h's q, k, v are consecutive head_dim slices of the qkv output
    x = torch.randn(3, cfg.hidden_size)
    with torch.no_grad():
        mod.qkv_proj.weight.zero_()
        mod.qkv_proj.weight[2 * 8:3 * 8] = 1.0  # only head 0's v rows
    captured = {}

    def core(q, k, v, slopes, cu, initial_state=None, output_final_state=False):
        captured.update(q=q, k=k, v=v)
        return v, None

    mod.core = core
    mod(x, torch.tensor([0, 3], dtype=torch.int32))
    assert captured["v"][0, :, 0].abs().sum() > 0 and captured["v"][0, :, 1:].abs().sum() == 0
    assert captured["q"].abs().sum() == 0 and captured["k"].abs().sum() == 0


def test_lightning_module_hands_the_packed_qkv_to_an_op_that_takes_it():
    """An op with ``packed`` (LightningOp, the CP op) gets the per-head packed qkv [1, T, H, 3K]
    (read in place on CUDA), and the layer's output equals the three-view call's."""
    cfg = tiny(num_layers=8, softmax_every=0)
    torch.manual_seed(0)
    mod = LightningAttention(cfg, 5)
    x = torch.randn(7, cfg.hidden_size)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    K = cfg.head_dim
    seen = {}

    class Packed(LightningOp):
        def packed(self, qkv, slopes, cu_seqlens=None):
            seen["qkv"] = qkv
            return super().packed(qkv, slopes, cu_seqlens)

    mod.core = Packed(cfg.lightning_block_size)
    y = mod(x, cu)
    qkv = seen["qkv"]
    assert qkv.shape == (1, 7, cfg.num_heads, 3 * K)
    ref = F.silu(mod.qkv_proj(x)).view(7, cfg.num_heads, 3 * K)
    torch.testing.assert_close(qkv[0], ref, rtol=0, atol=0)
    mod.core = lambda q, k, v, *a: LightningOp(cfg.lightning_block_size)(q, k, v, *a)
    torch.testing.assert_close(mod(x, cu), y, rtol=0, atol=0)


def test_deepnorm_constants_and_minimax_alpha():
    cfg = ModelConfig(num_layers=80)
    assert cfg.deepnorm_alpha == pytest.approx(3.5565588200778455, rel=1e-15)
    assert cfg.deepnorm_beta == pytest.approx((8 * 80) ** -0.25)


def test_prenorm_option_runs_and_differs():
    cfg_d, cfg_p = tiny(), tiny(norm_scheme="prenorm")
    md, mp = MiniMaxModel(cfg_d), MiniMaxModel(cfg_p)
    md.reset_parameters(0)
    mp.load_state_dict(md.state_dict())
    tokens = torch.randint(0, 50, (1, 10))
    assert not torch.allclose(md(tokens).logits, mp(tokens).logits)


def test_minimax_text_01_info_json():
    out = subprocess.run([sys.executable, "-m", "mmtrain", "info", "model=minimax_text_01",
                          "--json"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert abs(info["params_total"] - 456.09e9) <= 0.01e9
    assert abs(info["params_active"] - 45.945e9) <= 0.01e9
    soft = [i for i, t in enumerate(info["layer_types"]) if t == "softmax"]
    assert soft == list(range(7, 80, 8))
    assert info["flops_per_token"] > 6 * info["params_active"]


def test_accounting_matches_counted_parameters_on_a_small_model():
    cfg = tiny()
    acct = account(cfg, seq_len=16)
    model = MiniMaxModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert acct.params_total == total
    per_expert = 3 * cfg.hidden_size * cfg.ffn_hidden_size
    emb = 2 * cfg.vocab_size * cfg.hidden_size
    inactive = cfg.num_layers * (cfg.num_experts - cfg.top_k) * per_expert
    assert acct.params_active == total - emb - inactive
