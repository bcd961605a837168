"""Weight names and layouts: mmtrain <-> transformers' MiniMax (fused experts) <-> remote code.

mmtrain (``MiniMaxModel.state_dict()``)        transformers (``MiniMaxForCausalLM``)
  embed.weight                                   model.embed_tokens.weight
  layers.i.input_norm.weight                     model.layers.i.input_layernorm.weight
  layers.i.post_norm.weight                      model.layers.i.post_attention_layernorm.weight
  layers.i.attn.qkv_proj.weight (per-head)       model.layers.i.self_attn.qkv_proj.weight (same)
  layers.i.attn.gate_proj.weight                 model.layers.i.self_attn.output_gate.weight
  layers.i.attn.out_proj.weight                  model.layers.i.self_attn.out_proj.weight
  layers.i.attn.norm.weight                      model.layers.i.self_attn.norm.weight
  layers.i.attn.{q,k,v,o}_proj.weight            model.layers.i.self_attn.{q,k,v,o}_proj.weight
  layers.i.moe.router.weight [E, D]              model.layers.i.mlp.gate.weight
  layers.i.moe.experts.w13 [E, 2F, D]            model.layers.i.mlp.experts.gate_up_proj [E, 2F, D]
                                                   (the same: gate rows W1 first, then up W3)
  layers.i.moe.experts.w2 [E, D, F]              model.layers.i.mlp.experts.down_proj
  final_norm.weight, lm_head.weight              model.norm.weight, lm_head.weight
  (lightning slopes: computed, not saved)        self_attn.{slope_rate, query_decay, key_decay,
                                                   diagonal_decay}: persistent buffers, written
                                                   from mmtrain's slopes
The remote code (and transformers' own ``save_pretrained``) stores experts per expert:
``model.layers.i.block_sparse_moe.experts.e.{w1,w2,w3}.weight`` and the router as
``model.layers.i.block_sparse_moe.gate.weight``.
"""

from __future__ import annotations

import torch

from mmtrain.config import ModelConfig
from mmtrain.hf.config_map import longrope_permutation
from mmtrain.hf.tensor_io import InteropError, OutTensor
from mmtrain.model.layers import lightning_slopes

LIGHTNING_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def decay_buffers(cfg: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
    """transformers' four lightning buffers, built from mmtrain's (fp32) slopes."""
    H, B = cfg.num_heads, cfg.lightning_block_size
    s = lightning_slopes(layer, cfg.num_layers, H).to(torch.float32)[:, None, None]  # [H,1,1]
    r = torch.arange(B) + 1
    query = torch.exp(-s * r[:, None])
    key = torch.exp(-s * (B - r[:, None]))
    diag = (r[:, None] - r[None, :])[None, None, :, :]
    sd = s * diag
    diagonal = torch.exp(torch.where(sd >= 0, -sd, float("-inf")))
    return {"slope_rate": s, "query_decay": query, "key_decay": key, "diagonal_decay": diagonal}


def _qk_row_perm(cfg: ModelConfig, heads: int) -> torch.Tensor:
    """Row permutation of q_proj/k_proj (``heads`` heads) for the longrope partial-RoPE mapping."""
    perm = torch.tensor(longrope_permutation(cfg.head_dim, cfg.rope_dim))
    K = cfg.head_dim
    return (torch.arange(heads)[:, None] * K + perm[None, :]).reshape(-1)


def mm_param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every persistent tensor of ``MiniMaxModel(cfg)`` and its shape, in state-dict order.

    Computed from the config (no model, not even on the meta device, whose first use costs
    ~90 MB of RSS); ``tests/unit/test_hf_interop.py`` checks it against the real model."""
    V, D, E, F = cfg.vocab_size, cfg.hidden_size, cfg.num_experts, cfg.ffn_hidden_size
    HK, GK = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, tuple] = {"embed.weight": (V, D)}
    for i, kind in enumerate(cfg.layer_types()):
        p = f"layers.{i}."
        out[p + "input_norm.weight"] = (D,)
        out[p + "post_norm.weight"] = (D,)
        if kind == "lightning":
            out.update({p + "attn.qkv_proj.weight": (3 * HK, D), p + "attn.gate_proj.weight": (HK, D),
                        p + "attn.out_proj.weight": (D, HK), p + "attn.norm.weight": (HK,)})
        else:
            out.update({p + "attn.q_proj.weight": (HK, D), p + "attn.k_proj.weight": (GK, D),
                        p + "attn.v_proj.weight": (GK, D), p + "attn.o_proj.weight": (D, HK)})
        out.update({p + "moe.router.weight": (E, D), p + "moe.experts.w13": (E, 2 * F, D),
                    p + "moe.experts.w2": (E, D, F)})
    out["final_norm.weight"] = (D,)
    out["lm_head.weight"] = (V, D)
    return out


# ----------------------------------------------------------------------------------- export
def export_tensors(cfg: ModelConfig, read, dtype: torch.dtype, qk_perm: str | None) -> list[OutTensor]:
    """The transformers-native tensors, in file order, each produced lazily from ``read(names)``
    (a function returning {mmtrain name: tensor})."""
    shapes = mm_param_shapes(cfg)
    out: list[OutTensor] = []

    def one(hf, mm, fn=None):
        def produce():
            x = read([mm])[mm]
            return fn(x) if fn else x
        shape = shapes[mm]
        out.append(OutTensor(hf, shape, dtype, produce))

    one("model.embed_tokens.weight", "embed.weight")
    for i, kind in enumerate(cfg.layer_types()):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        one(q + "input_layernorm.weight", p + "input_norm.weight")
        if kind == "lightning":
            one(q + "self_attn.qkv_proj.weight", p + "attn.qkv_proj.weight")
            one(q + "self_attn.output_gate.weight", p + "attn.gate_proj.weight")
            one(q + "self_attn.out_proj.weight", p + "attn.out_proj.weight")
            one(q + "self_attn.norm.weight", p + "attn.norm.weight")
            bufs = decay_buffers(cfg, i)
            for b in LIGHTNING_BUFFERS:  # fp32 always: they are constants, not weights
                out.append(OutTensor(q + "self_attn." + b, tuple(bufs[b].shape), torch.float32,
                                     (lambda t=bufs[b]: t)))
        else:
            for n, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
                fn = None
                if qk_perm == "longrope_partial":
                    rows = _qk_row_perm(cfg, heads)
                    fn = (lambda x, rows=rows: x[rows])
                one(q + f"self_attn.{n}.weight", p + f"attn.{n}.weight", fn)
            one(q + "self_attn.v_proj.weight", p + "attn.v_proj.weight")
            one(q + "self_attn.o_proj.weight", p + "attn.o_proj.weight")
        one(q + "post_attention_layernorm.weight", p + "post_norm.weight")
        one(q + "mlp.gate.weight", p + "moe.router.weight")
        one(q + "mlp.experts.gate_up_proj", p + "moe.experts.w13")  # same [E, 2F, D] layout
        one(q + "mlp.experts.down_proj", p + "moe.experts.w2")
    one("model.norm.weight", "final_norm.weight")
    one("lm_head.weight", "lm_head.weight")
    return out


# ----------------------------------------------------------------------------------- import
def import_tensors(cfg: ModelConfig, src, qk_perm: str | None,
                   dtype: torch.dtype | None = None) -> tuple[list[OutTensor], set[str]]:
    """mmtrain's tensors (names without the "model." DCP prefix), each produced from ``src`` (a
    ``WeightSource``) in any of the accepted layouts: fused experts or per-expert w1/w2/w3,
    ``mlp.`` or ``block_sparse_moe.``. Also returns the source names it consumes."""
    shapes = mm_param_shapes(cfg)
    names = set(src.keys())
    out: list[OutTensor] = []

    used: set[str] = set()

    def pick(*cands):
        for c in cands:
            if c in names:
                used.add(c)
                return c
        raise InteropError(f"none of {list(cands)} is in the checkpoint files")

    def add(mm, produce, src_dtype):
        out.append(OutTensor(mm, shapes[mm], dtype or src_dtype, produce))

    def expect(hf, shape):
        got = tuple(src.info(hf).shape)
        if got != tuple(shape):
            raise InteropError(f"{hf}: shape {got} in the checkpoint, but the config implies "
                               f"{tuple(shape)} (config.json and weights disagree)")

    def direct(mm, hf, fn=None):
        expect(hf, shapes[mm])

        def produce():
            x = src.read(hf)
            return fn(x) if fn else x
        add(mm, produce, src.info(hf).dtype)

    direct("embed.weight", pick("model.embed_tokens.weight"))
    for i, kind in enumerate(cfg.layer_types()):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        direct(p + "input_norm.weight", pick(q + "input_layernorm.weight"))
        direct(p + "post_norm.weight", pick(q + "post_attention_layernorm.weight"))
        if kind == "lightning":
            direct(p + "attn.qkv_proj.weight", pick(q + "self_attn.qkv_proj.weight"))
            direct(p + "attn.gate_proj.weight", pick(q + "self_attn.output_gate.weight"))
            direct(p + "attn.out_proj.weight", pick(q + "self_attn.out_proj.weight"))
            direct(p + "attn.norm.weight", pick(q + "self_attn.norm.weight"))
        else:
            for n, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
                fn = None
                if qk_perm == "longrope_partial":
                    inv = torch.argsort(_qk_row_perm(cfg, heads))
                    fn = (lambda x, inv=inv: x[inv])
                direct(p + f"attn.{n}.weight", pick(q + f"self_attn.{n}.weight"), fn)
            direct(p + "attn.v_proj.weight", pick(q + "self_attn.v_proj.weight"))
            direct(p + "attn.o_proj.weight", pick(q + "self_attn.o_proj.weight"))
        direct(p + "moe.router.weight", pick(q + "mlp.gate.weight", q + "block_sparse_moe.gate.weight"))
        E, F2, D = shapes[p + "moe.experts.w13"]
        F = F2 // 2
        fused = q + "mlp.experts.gate_up_proj"
        if fused in names:
            direct(p + "moe.experts.w13", pick(fused))
            direct(p + "moe.experts.w2", pick(q + "mlp.experts.down_proj"))
        else:
            per = {}
            for w in ("w1", "w3", "w2"):
                per[w] = [pick(q + f"block_sparse_moe.experts.{e}.{w}.weight",
                               q + f"mlp.experts.{e}.{w}.weight") for e in range(E)]
                for n in per[w]:
                    expect(n, (D, F) if w == "w2" else (F, D))

            def stacked(names_by_half):
                first = src.read(names_by_half[0][0])
                rows = first.shape[0]
                t = torch.empty((E, rows * len(names_by_half), first.shape[1]), dtype=first.dtype)
                for h, half in enumerate(names_by_half):  # w13 = [w1 rows; w3 rows] per expert
                    for k, n in enumerate(half):
                        t[k, h * rows:(h + 1) * rows] = first if (h, k) == (0, 0) else src.read(n)
                return t
            add(p + "moe.experts.w13", lambda per=per: stacked([per["w1"], per["w3"]]),
                src.info(per["w1"][0]).dtype)
            add(p + "moe.experts.w2", lambda per=per: stacked([per["w2"]]),
                src.info(per["w2"][0]).dtype)
    direct("final_norm.weight", pick("model.norm.weight"))
    direct("lm_head.weight", pick("lm_head.weight", "model.embed_tokens.weight"))
    for t in out:
        if t.name not in shapes:
            raise InteropError(f"internal: {t.name} is not a parameter of MiniMaxModel")
    missing = set(shapes) - {t.name for t in out}
    if missing:
        raise InteropError(f"internal: no source for {sorted(missing)}")
    return out, used

