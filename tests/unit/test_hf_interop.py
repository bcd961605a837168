"""HF interop: mmtrain <-> transformers' MiniMax (and the released remote-code layout).

Every claim of docs/hf_interop.md is checked here against the installed transformers: export
gives transformers the same logits (fp32, 1e-4 relative), a transformers-initialised model imported
into mmtrain gives transformers' logits, mmtrain -> HF -> mmtrain is bitwise, the legacy layout
imports, greedy decoding agrees, and the settings transformers cannot express are refused.
"""

import json
import math
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402

from mmtrain.config import Config, ModelConfig  # noqa: E402
from mmtrain.hf import InteropError, export_hf, from_pretrained, import_hf  # noqa: E402
from mmtrain.hf.config_map import from_hf_config, longrope_permutation  # noqa: E402
from mmtrain.model import MiniMaxModel  # noqa: E402
from mmtrain.train import checkpoint as ckpt  # noqa: E402

transformers.logging.set_verbosity_error()
QUIET = dict(progress=False, log=lambda m: None)


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, head_dim=8,
                num_kv_heads=2, softmax_every=2, num_experts=4, top_k=2, ffn_hidden_size=24,
                rotary_dim=8, lightning_block_size=16, max_position_embeddings=4096)
    base.update(kw)
    mc = ModelConfig(**base)
    mc.validate()
    return mc


CONFIGS = {
    "hybrid_gqa_e4_top2": _cfg(),
    "all_lightning_e2_top1": _cfg(num_layers=3, softmax_every=0, num_experts=2, top_k=1),
    "irregular_mqa_e8_top2": _cfg(num_layers=5, softmax_every=8, softmax_layers=[0, 3],
                                  hidden_size=48, num_kv_heads=1, num_experts=8, top_k=2,
                                  rope_theta=1e6),
    "all_softmax_e3_top1": _cfg(num_layers=2, softmax_every=1, num_experts=3, top_k=1,
                                num_heads=2, head_dim=16, rotary_dim=16, num_kv_heads=2),
    # partial RoPE (MiniMax-Text-01's half RoPE), exported exactly through the longrope mapping
    "partial_rope_longrope": _cfg(head_dim=16, rotary_dim=8, num_experts=5, top_k=2),
}


def _save_mm(mc, run_dir, seed=1):
    model = MiniMaxModel(mc)
    model.reset_parameters(seed=seed)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save(run_dir, 3, model, opt, {}, {"config": Config(model=mc).validate().to_dict()}, 1)
    return model.eval()


def _hf(path):
    model, info = MiniMaxForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_transformers_and_round_trips_bitwise(tmp_path, name):
    mc = CONFIGS[name]
    model = _save_mm(mc, tmp_path / "run")
    rope = "longrope" if mc.rope_dim != mc.head_dim else "strict"
    export_hf(tmp_path / "run", tmp_path / "hf", rope=rope, max_shard_size="40KB", **QUIET)
    idx = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1  # several shards and an index
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "minimax" and len(hf_cfg["layer_types"]) == mc.num_layers
    hf, info = _hf(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, mc.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert _rel(ours, theirs) < 1e-4
    # mmtrain -> HF -> mmtrain: same config, bitwise weights, same logits
    import_hf(tmp_path / "hf", tmp_path / "back", **QUIET)
    back = from_pretrained(tmp_path / "back")
    assert back.config == mc
    sd, sd2 = model.state_dict(), back.model.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert not back.training
    with torch.no_grad():
        assert torch.equal(back(x), ours)  # [B, T, V] logits, like transformers


def _hf_random(num_layers, layer_types, seed=0, **kw):
    alpha = (2.0 * num_layers) ** 0.25
    args = dict(vocab_size=89, hidden_size=32, intermediate_size=40, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                num_experts_per_tok=2, layer_types=layer_types, block_size=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha,
                mlp_alpha_factor=alpha, max_position_embeddings=4096, initializer_range=0.2)
    args.update(kw)
    cfg = MiniMaxConfig(**args)
    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return model


HF_LAYOUTS = {
    "hybrid": (4, ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
               {}),
    "all_linear_top1": (3, ["linear_attention"] * 3, {"num_experts_per_tok": 1,
                                                      "num_local_experts": 2}),
    "gqa_e8": (3, ["full_attention", "linear_attention", "full_attention"],
               {"num_key_value_heads": 1, "num_local_experts": 8}),
}


@pytest.mark.parametrize("name", list(HF_LAYOUTS))
def test_transformers_model_imports_with_its_logits(tmp_path, name):
    n, types, kw = HF_LAYOUTS[name]
    hf = _hf_random(n, types, **kw)
    # (a) transformers' own save_pretrained: per-expert block_sparse_moe names + slope buffers
    hf.save_pretrained(tmp_path / "saved")
    # (b) the in-memory (native, fused) names, as export-hf writes them
    from safetensors.torch import save_file

    (tmp_path / "native").mkdir()
    hf.config.save_pretrained(tmp_path / "native")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "native" / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randint(0, 89, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
    for src in ("saved", "native"):
        out = import_hf(tmp_path / src, tmp_path / f"ck_{src}", **QUIET)
        assert out["config"].norm_scheme == "deepnorm"
        assert out["config"].rotary_dim == 8
        model = from_pretrained(tmp_path / f"ck_{src}")
        with torch.no_grad():
            assert _rel(ref, model(x)) < 1e-4, src
        direct = from_pretrained(tmp_path / src)  # an HF directory directly
        with torch.no_grad():
            assert _rel(ref, direct(x)) < 1e-4, src


def _legacy_dir(hf, path, rotary_dim=None, postnorm=True, alpha=None):
    """The released remote-code layout (MiniMaxText01ForCausalLM), from a transformers model."""
    from safetensors.torch import save_file

    c = hf.config
    a = (2.0 * c.num_hidden_layers) ** 0.25 if alpha is None else alpha
    cfg = {"architectures": ["MiniMaxText01ForCausalLM"], "model_type": "MiniMaxText01",
           "auto_map": {"AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config",
                        "AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM"},
           "attn_type_list": [1 if t == "full_attention" else 0 for t in c.layer_types],
           "head_dim": c.head_dim, "hidden_act": "silu", "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size,
           "layernorm_full_attention_alpha": a, "layernorm_full_attention_beta": 1.0,
           "layernorm_linear_attention_alpha": a, "layernorm_linear_attention_beta": 1.0,
           "layernorm_mlp_alpha": a, "layernorm_mlp_beta": 1.0, "postnorm": postnorm,
           "max_position_embeddings": c.max_position_embeddings,
           "num_attention_heads": c.num_attention_heads, "num_experts_per_tok": c.num_experts_per_tok,
           "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
           "num_local_experts": c.num_local_experts, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_parameters["rope_theta"],
           "rotary_dim": rotary_dim or c.head_dim, "shared_intermediate_size": 0,
           "tie_word_embeddings": False, "vocab_size": c.vocab_size}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    F = c.intermediate_size
    tensors = {}
    for k, v in hf.state_dict().items():
        if k.rsplit(".", 1)[-1] in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"):
            continue
        k = k.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            for e in range(v.shape[0]):
                tensors[f"{pre}{e}.w1.weight"] = v[e, :F].clone()
                tensors[f"{pre}{e}.w3.weight"] = v[e, F:].clone()
            continue
        if k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(v.shape[0]):
                tensors[f"{pre}{e}.w2.weight"] = v[e].clone()
            continue
        tensors[k] = v.contiguous()
    names = sorted(tensors)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fn = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / fn), metadata={"format": "pt"})
        wm.update({k: fn for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def test_legacy_remote_code_layout_imports(tmp_path):
    hf = _hf_random(4, ["linear_attention", "full_attention", "linear_attention",
                        "full_attention"], seed=3)
    _legacy_dir(hf, tmp_path / "legacy")
    out = import_hf(tmp_path / "legacy", tmp_path / "ck", **QUIET)
    assert out["flavor"] == "remote_code"
    mc = out["config"]
    assert mc.layer_types() == ["lightning", "softmax", "lightning", "softmax"]
    assert mc.softmax_every == 2 and mc.norm_scheme == "deepnorm"
    x = torch.randint(0, 89, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(hf(x).logits, from_pretrained(tmp_path / "ck")(x)) < 1e-4
    # the released model's half RoPE is kept (mmtrain computes it natively) ...
    _legacy_dir(hf, tmp_path / "half", rotary_dim=4)
    mc_half, _ = from_hf_config(json.loads((tmp_path / "half" / "config.json").read_text()))
    assert mc_half.rope_dim == 4
    # ... and postnorm=false with alpha=beta=1 is mmtrain's pre-norm
    _legacy_dir(hf, tmp_path / "pre", postnorm=False, alpha=1.0)
    assert from_pretrained(tmp_path / "pre").config.norm_scheme == "prenorm"


def test_greedy_decoding_agrees(tmp_path):
    mc = CONFIGS["hybrid_gqa_e4_top2"]
    _save_mm(mc, tmp_path / "run", seed=7)
    export_hf(tmp_path / "run", tmp_path / "hf", **QUIET)
    hf, _ = _hf(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "run")
    prompt = torch.tensor([[5, 17, 42, 9, 63, 2]])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    mine = ours.generate(prompt, max_new_tokens=20)
    assert theirs.shape == (1, 26) and torch.equal(theirs, mine)


def test_refusals_name_the_setting(tmp_path):
    _save_mm(_cfg(head_dim=16, rotary_dim=8), tmp_path / "partial")
    with pytest.raises(InteropError, match="rotary_dim=8"):
        export_hf(tmp_path / "partial", tmp_path / "o1", **QUIET)
    _save_mm(_cfg(norm_scheme="prenorm"), tmp_path / "pre")
    with pytest.raises(InteropError, match="norm_scheme=prenorm"):
        export_hf(tmp_path / "pre", tmp_path / "o2", **QUIET)
    hf = _hf_random(2, ["linear_attention", "full_attention"], mlp_alpha_factor=1.0)
    hf.save_pretrained(tmp_path / "alpha1")
    with pytest.raises(InteropError, match="mlp=.*alpha"):
        import_hf(tmp_path / "alpha1", tmp_path / "o3", **QUIET)
    warns = export_hf(tmp_path / "partial", tmp_path / "o4", rope="full", **QUIET)["warnings"]
    assert any("rotary_dim=8" in w for w in warns)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_shapes_match_the_model(name):
    from mmtrain.hf.weights import mm_param_shapes

    mc = CONFIGS[name]
    real = {k: tuple(v.shape) for k, v in MiniMaxModel(mc).state_dict().items()}
    assert mm_param_shapes(mc) == real


def test_longrope_permutation_pairs():
    perm = longrope_permutation(16, 8)
    assert sorted(perm) == list(range(16))
    assert [perm[j] for j in range(4)] == [0, 1, 2, 3]  # first rotated halves
    assert [perm[8 + j] for j in range(4)] == [4, 5, 6, 7]  # their partners at j + K/2


def test_init_from_hf_dir_and_cli(tmp_path):
    from mmtrain.cli import main
    from mmtrain.config import config_from_dict
    from mmtrain.train.loop import build_model

    mc = _cfg(vocab_size=258)
    src = _save_mm(mc, tmp_path / "run", seed=11)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--no-progress"]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck"), "--no-progress"]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck"), "--no-progress"]) == 2
    for init in ("hf", "ck"):
        d = Config(model=mc).to_dict()
        d["train"]["init_from"] = str(tmp_path / init)
        d["run"]["dir"] = str(tmp_path / f"train_{init}")
        model = build_model(config_from_dict(d), torch.device("cpu"))
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (init, k)
    d["model"]["hidden_size"] = 64
    from mmtrain.config import ConfigError

    with pytest.raises(ConfigError, match="train.init_from.*hidden_size"):
        build_model(config_from_dict(d), torch.device("cpu"))
