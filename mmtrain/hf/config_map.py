"""mmtrain ``ModelConfig`` <-> transformers' ``MiniMaxConfig`` (and the released remote-code config).

The facts this mapping rests on were established against the installed transformers (see
docs/hf_interop.md and tests/unit/test_hf_interop.py):

* layer layout: mmtrain's lightning/softmax = transformers' ``layer_types`` "linear_attention" /
  "full_attention" = remote code's ``attn_type_list`` 0 / 1.
* residual: transformers is always post-norm, ``h = α·N(h) + β·f(N(h))`` per sub-layer with the
  ``{linear,full}_attn_{alpha,beta}_factor`` and ``mlp_{alpha,beta}_factor``; mmtrain's DeepNorm is
  α = (2N)^¼ and β = 1 for all three. The remote code's ``postnorm: false`` with α = β = 1 is
  mmtrain's pre-norm, which transformers cannot express.
* RoPE: transformers rotates all ``head_dim`` dims and ignores ``partial_rotary_factor``. mmtrain's
  ``rotary_dim == head_dim`` maps exactly; a partial RoPE can be expressed exactly only through the
  ``longrope`` trick (``rope="longrope"``): per-dim frequency factors that switch the extra dims off,
  with q/k head dims permuted so the rotated pairs land where transformers pairs them.
* lightning norm: transformers' lightning ``norm`` has a hard-coded eps of 1e-6 (mmtrain:
  ``lightning_norm_eps``, 1e-6 by default); the layer norms use ``rms_norm_eps``.
* slopes: transformers computes ``2^(-8(h+1)/H) · (1 - l/(L-1+1e-5) + 1e-5)`` (mmtrain: ``L-1``)
  but keeps them (and the decay tables derived from them) as persistent buffers that
  ``from_pretrained`` loads from the file; export writes mmtrain's exact slopes there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mmtrain.config import ModelConfig
from mmtrain.hf.tensor_io import InteropError

FORMAT_VERSION = 1
ALPHA_RTOL = 1e-6
HF_LIGHTNING_NORM_EPS = 1e-6  # MiniMaxLightningAttention.norm = MiniMaxRMSNorm(width) (default eps)
LONGROPE_OFF = 1e20  # frequency divisor that switches a dim pair off (angle < 1e-12 at 10M tokens)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=ALPHA_RTOL, abs_tol=0.0)


def layout_fields(types: list[str]) -> dict:
    """``softmax_every``/``softmax_layers`` reproducing a list of "lightning"/"softmax"."""
    n = len(types)
    soft = {i for i, t in enumerate(types) if t == "softmax"}
    if not soft:
        return {"softmax_every": 0, "softmax_layers": None}
    for k in range(1, n + 1):
        if soft == {l for l in range(n) if (l + 1) % k == 0}:
            return {"softmax_every": k, "softmax_layers": None}
    return {"softmax_every": 8, "softmax_layers": sorted(soft)}


# --------------------------------------------------------------------------------- RoPE trick
def longrope_permutation(head_dim: int, rotary_dim: int) -> list[int]:
    """perm[j] = the mmtrain head dim that goes to transformers' head dim j.

    mmtrain rotates pairs (i, i + R/2), i < R/2, and leaves dims R..K-1 alone; transformers pairs
    (j, j + K/2). Rotated pairs go to j = i and j = i + K/2; the untouched dims fill the rest."""
    K, R = head_dim, rotary_dim
    r, h = R // 2, K // 2
    rest = iter(range(R, K))
    perm = []
    for j in range(K):
        if j < r:
            perm.append(j)
        elif h <= j < h + r:
            perm.append(j - h + r)
        else:
            perm.append(next(rest))
    return perm


def longrope_factors(head_dim: int, rotary_dim: int, theta: float) -> list[float]:
    """Per-pair divisors f_j so that 1 / (f_j · θ^(2j/K)) = θ^(-2j/R) for j < R/2, else ≈ 0."""
    K, R = head_dim, rotary_dim
    out = []
    for j in range(K // 2):
        out.append(theta ** (2.0 * j / R - 2.0 * j / K) if j < R // 2 else LONGROPE_OFF)
    return out


# ----------------------------------------------------------------------------------- export
def to_hf_config(mc: ModelConfig, *, dtype: torch.dtype = torch.float32, rope: str = "strict",
                 eos_id: int | None = None, bos_id: int | None = None, pad_id: int | None = None,
                 aux_loss_coef: float | None = None) -> tuple[dict, list[str]]:
    """transformers-native ``config.json`` content for ``mc``, and warnings (function caveats).

    ``rope``: "strict" refuses a partial RoPE, "longrope" expresses it exactly, "full" exports
    it rotating all dims (a different function: warned)."""
    warns: list[str] = []
    if mc.norm_scheme != "deepnorm":
        raise InteropError(
            "model.norm_scheme=prenorm: transformers' MiniMax port is post-norm only "
            "(h = α·N(h) + β·f(N(h))) and cannot express a pre-norm residual; only "
            "norm_scheme=deepnorm checkpoints can be exported")
    if rope not in ("strict", "longrope", "full"):
        raise InteropError(f"rope='{rope}': use strict, longrope or full")
    K, R = mc.head_dim, mc.rope_dim
    theta = float(mc.rope_theta)
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    qk_perm = None
    if R != K:
        if rope == "strict":
            raise InteropError(
                f"model.rotary_dim={R} (partial RoPE over {R} of head_dim={K} dims): transformers' "
                f"MiniMax port rotates all head dims and ignores partial_rotary_factor, so this "
                f"model is not expressible as a plain transformers config. Re-run with "
                f"--rope longrope (exact: per-dim longrope factors switch the extra dims off and "
                f"q/k head dims are permuted) or --rope full (rotates all dims: NOT the same "
                f"function)")
        if rope == "longrope":
            fac = longrope_factors(K, R, theta)
            rope_params = {"rope_type": "longrope", "rope_theta": theta, "short_factor": fac,
                           "long_factor": list(fac), "factor": 1.0, "attention_factor": 1.0,
                           "original_max_position_embeddings": int(mc.max_position_embeddings)}
            qk_perm = "longrope_partial"
        else:
            warns.append(f"model.rotary_dim={R} < head_dim={K}: exported with RoPE over all {K} "
                         f"dims (--rope full); transformers' logits will differ from mmtrain's")
    if not _close(mc.lightning_norm_eps, HF_LIGHTNING_NORM_EPS) and "lightning" in mc.layer_types():
        warns.append(f"model.lightning_norm_eps={mc.lightning_norm_eps}: transformers hard-codes "
                     f"{HF_LIGHTNING_NORM_EPS} for the lightning output norm; its logits will differ "
                     f"(set model.lightning_norm_eps=1e-6 to match)")
    if mc.capacity_factor is not None:
        warns.append(f"model.capacity_factor={mc.capacity_factor}: transformers routes dropless; "
                     f"outputs differ wherever mmtrain would drop slots")
    # pad_token_id becomes nn.Embedding(padding_idx=...) in transformers (a frozen row when
    # training there), so it is never set; ids outside the vocabulary are dropped.
    del pad_id
    bos_id = bos_id if bos_id is not None and 0 <= bos_id < mc.vocab_size else None
    eos_id = eos_id if eos_id is not None and 0 <= eos_id < mc.vocab_size else None
    a = float(mc.deepnorm_alpha)
    types = ["full_attention" if t == "softmax" else "linear_attention" for t in mc.layer_types()]
    cfg = {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.ffn_hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.num_kv_heads,
        "head_dim": mc.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(mc.max_position_embeddings),
        "initializer_range": 0.02,
        "rms_norm_eps": float(mc.norm_eps),
        "use_cache": True,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_experts_per_tok": mc.top_k,
        "num_local_experts": mc.num_experts,
        "output_router_logits": False,
        # transformers' aux = E·Σ (K·f_i)·m_i = K × mmtrain's E·Σ f_i·m_i
        "router_aux_loss_coef": (float(aux_loss_coef) / mc.top_k) if aux_loss_coef is not None
        else 0.001,
        "router_jitter_noise": 0.0,
        "rope_parameters": rope_params,
        "layer_types": types,
        "block_size": int(mc.lightning_block_size),
        "full_attn_alpha_factor": a, "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": a, "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": a, "mlp_beta_factor": 1.0,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": DTYPE_NAMES[dtype],
        # Everything transformers has no field for, so that import restores the exact config.
        "mmtrain": {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(mc),
                    "qk_permutation": qk_perm},
    }
    return cfg, warns


# ----------------------------------------------------------------------------------- import
def detect_flavor(d: dict) -> str:
    arch = [str(a) for a in (d.get("architectures") or [])]
    mt = str(d.get("model_type", "")).lower()
    if "attn_type_list" in d or any("MiniMaxText01" in a or "MiniMaxM1" in a for a in arch) \
            or mt in ("minimax_text_01", "minimaxtext01", "minimax_m1"):
        return "remote_code"
    if mt == "minimax" or any(a.startswith("MiniMax") for a in arch):
        return "transformers"
    raise InteropError(f"config.json: model_type '{d.get('model_type')}' / architectures {arch} "
                       f"is not a MiniMax(-Text-01) model")


def _residual_scheme(n_layers: int, factors: dict[str, tuple[float, float]], postnorm: bool,
                     where: str) -> str:
    """'deepnorm' or 'prenorm' from the α/β of the sub-layers that exist, else an error."""
    alpha = (2.0 * n_layers) ** 0.25
    if postnorm and all(_close(a, alpha) and _close(b, 1.0) for a, b in factors.values()):
        return "deepnorm"
    if not postnorm and all(_close(a, 1.0) and _close(b, 1.0) for a, b in factors.values()):
        return "prenorm"
    got = ", ".join(f"{k}=({a}, {b})" for k, (a, b) in factors.items())
    raise InteropError(
        f"{where}: residual factors (alpha, beta) {got} with postnorm={postnorm} are not "
        f"expressible in mmtrain, which supports DeepNorm (post-norm, alpha=(2N)^(1/4)="
        f"{alpha:.10g}, beta=1) and plain pre-norm (alpha=beta=1, postnorm false) only")


def from_hf_config(d: dict, name: str = "hf") -> tuple[ModelConfig, dict]:
    """(ModelConfig, info) from a HF ``config.json`` dict; info has flavor, qk_permutation, notes."""
    flavor = detect_flavor(d)
    notes: list[str] = []
    L = int(d["num_hidden_layers"])
    H = int(d["num_attention_heads"])
    K = int(d.get("head_dim") or int(d["hidden_size"]) // H)
    if str(d.get("hidden_act", "silu")) != "silu":
        raise InteropError(f"config.json hidden_act={d.get('hidden_act')}: mmtrain's experts are "
                           f"SwiGLU (silu) only")
    if flavor == "remote_code":
        atl = d.get("attn_type_list")
        if atl is None:
            atl = [int(d.get("attention_type", 1))] * L
        types = ["softmax" if int(t) == 1 else "lightning" for t in atl]
        postnorm = bool(d.get("postnorm", False))
        fac = {"mlp": (d.get("layernorm_mlp_alpha", 1), d.get("layernorm_mlp_beta", 1))}
        if "lightning" in types:
            fac["linear_attention"] = (d.get("layernorm_linear_attention_alpha", 1),
                                       d.get("layernorm_linear_attention_beta", 1))
        if "softmax" in types:
            fac["full_attention"] = (d.get("layernorm_full_attention_alpha", 1),
                                     d.get("layernorm_full_attention_beta", 1))
        scheme = _residual_scheme(L, fac, postnorm, "config.json layernorm_*_alpha/beta")
        if int(d.get("shared_intermediate_size", 0) or 0) > 0:
            raise InteropError(f"config.json shared_intermediate_size="
                               f"{d['shared_intermediate_size']}: a shared expert is not part "
                               f"of mmtrain's MoE (SPEC §4)")
        theta = float(d.get("rope_theta", 10000.0))
        rotary = int(d.get("rotary_dim") or K)
        if d.get("rope_scaling"):
            raise InteropError(f"config.json rope_scaling={d['rope_scaling']}: not supported")
    else:
        types = ["softmax" if t == "full_attention" else "lightning"
                 for t in (d.get("layer_types") or
                           ["full_attention" if (i + 1) % 2 else "linear_attention"
                            for i in range(L)])]
        fac = {"mlp": (d.get("mlp_alpha_factor", 1), d.get("mlp_beta_factor", 1))}
        if "lightning" in types:
            fac["linear_attention"] = (d.get("linear_attn_alpha_factor", 1),
                                       d.get("linear_attn_beta_factor", 1))
        if "softmax" in types:
            fac["full_attention"] = (d.get("full_attn_alpha_factor", 1),
                                     d.get("full_attn_beta_factor", 1))
        scheme = _residual_scheme(L, fac, True, "config.json *_alpha_factor/*_beta_factor")
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = float(rp.get("rope_theta", d.get("rope_theta", 1e6)))  # MiniMaxConfig.default_theta
        rtype = rp.get("rope_type", rp.get("type", "default"))
        rotary = K
        mm = d.get("mmtrain") or {}
        if rtype not in ("default", None) and not (rtype == "longrope" and mm.get("qk_permutation")):
            raise InteropError(f"config.json rope_parameters.rope_type={rtype}: only the default "
                               f"RoPE (or mmtrain's own longrope export) can be imported")
        prf = float(rp.get("partial_rotary_factor", 1.0) or 1.0)
        if prf < 1.0:
            notes.append(f"rope_parameters.partial_rotary_factor={prf} is ignored by transformers' "
                         f"MiniMax port (it rotates all {K} dims); imported with rotary_dim={K} so "
                         f"that mmtrain computes what transformers computes")
        if d.get("sliding_window") not in (None, 0) and "softmax" in types:
            raise InteropError(f"config.json sliding_window={d['sliding_window']}: mmtrain's "
                               f"softmax layers attend to the whole causal context")
    if d.get("tie_word_embeddings"):
        notes.append("tie_word_embeddings=true: lm_head is imported as a copy of the embedding "
                     "(mmtrain keeps them untied)")
    mc = ModelConfig(
        name=name,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_layers=L,
        num_heads=H,
        head_dim=K,
        num_kv_heads=int(d.get("num_key_value_heads") or H),
        **layout_fields(types),
        num_experts=int(d.get("num_local_experts", d.get("num_experts", 8))),
        top_k=int(d.get("num_experts_per_tok", 2)),
        ffn_hidden_size=int(d["intermediate_size"]),
        capacity_factor=None,
        rope_theta=theta,
        rotary_dim=rotary,
        max_position_embeddings=int(d.get("max_position_embeddings", 10_240_000)),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        lightning_norm_eps=HF_LIGHTNING_NORM_EPS,
        norm_scheme=scheme,
        lightning_block_size=int(d.get("block_size", 256)),
    )
    info = {"flavor": flavor, "qk_permutation": None, "notes": notes}
    mm = d.get("mmtrain") if flavor == "transformers" else None
    if mm and isinstance(mm.get("model"), dict):
        # Written by mmtrain's export: restore the exact config (fields transformers lacks).
        saved = ModelConfig(**mm["model"])
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                  "num_kv_heads", "num_experts", "top_k", "ffn_hidden_size"):
            if getattr(saved, f) != getattr(mc, f):
                raise InteropError(f"config.json: mmtrain.model.{f}={getattr(saved, f)} "
                                   f"disagrees with the transformers fields ({getattr(mc, f)}); "
                                   f"the file was edited by hand — remove the 'mmtrain' entry")
        if saved.layer_types() != mc.layer_types():
            raise InteropError("config.json: mmtrain.model layer layout disagrees with layer_types")
        mc = saved
        info["qk_permutation"] = mm.get("qk_permutation")
    mc.validate("model")
    types_out = mc.layer_types()
    assert types_out == types, (types_out, types)
    return mc, info
