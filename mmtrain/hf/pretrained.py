"""``mmtrain.from_pretrained(path)`` and the weight loading behind ``train.init_from``.

``path`` may be an mmtrain checkpoint directory, a run directory (its newest checkpoint), or a HF
directory (transformers-native or remote-code layout, converted on the fly, tensor by tensor).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmtrain.config import ConfigError, ModelConfig
from mmtrain.hf.tensor_io import InteropError, release_memory

# Fields that change the shapes or names of parameters: a mismatch cannot load.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                "num_kv_heads", "num_experts", "ffn_hidden_size")
# Fields that only change the function or the speed, never the tensors.
SOFT_FIELDS = ("top_k", "capacity_factor", "rope_theta", "rotary_dim", "norm_eps",
               "lightning_norm_eps", "norm_scheme")


def source_kind(path) -> str:
    p = Path(path)
    if (p / "meta.json").is_file() and (p / ".metadata").is_file():
        return "mmtrain"
    if (p / "config.json").is_file():
        return "hf"
    if (p / "checkpoints").is_dir():
        return "mmtrain"
    raise InteropError(f"{p}: neither an mmtrain checkpoint / run directory nor a HF model "
                       f"directory (no meta.json, checkpoints/ or config.json)")


def source_config(path) -> tuple[ModelConfig, dict]:
    """The model config stored with ``path`` and {kind, checkpoint/info}."""
    kind = source_kind(path)
    if kind == "mmtrain":
        from mmtrain.hf.export import checkpoint_config, resolve_checkpoint

        ck = resolve_checkpoint(path)
        return checkpoint_config(ck).model, {"kind": kind, "checkpoint": ck}
    from mmtrain.hf.import_ import read_hf_config

    mc, info = read_hf_config(path)
    return mc, {"kind": kind, **info}


def build_empty(cfg: ModelConfig, device="cpu", dtype=None):
    """``MiniMaxModel`` with uninitialised weights (no random init) and correct slope buffers."""
    from mmtrain.model import MiniMaxModel
    from mmtrain.model.attention import LightningAttention
    from mmtrain.model.layers import lightning_slopes

    with torch.device("meta"):
        model = MiniMaxModel(cfg)
    model = model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, LightningAttention):
            m.slopes = lightning_slopes(m.layer_idx, cfg.num_layers, cfg.num_heads).to(
                device=device, dtype=torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_weights(path, model, *, what: str = "train.init_from") -> list[str]:
    """Load ``path``'s weights into ``model`` in place (one tensor at a time); return notes.

    The source config must give the same tensor shapes (else a ConfigError naming ``what``);
    differing functional settings (rope, eps, ...) are reported in the notes: the model keeps
    the recipe's settings."""
    src_cfg, info = source_config(path)
    cfg = model.cfg
    for f in SHAPE_FIELDS:
        if getattr(src_cfg, f) != getattr(cfg, f):
            raise ConfigError(f"{what}: {path} has model.{f}={getattr(src_cfg, f)} but the "
                              f"recipe has {getattr(cfg, f)}; set model.{f}="
                              f"{getattr(src_cfg, f)} (or start from a matching checkpoint)")
    if src_cfg.layer_types() != cfg.layer_types():
        raise ConfigError(f"{what}: {path} has the layer layout {src_cfg.layer_types()}, the "
                          f"recipe {cfg.layer_types()}; set model.softmax_every/softmax_layers "
                          f"to match")
    notes = [f"{what}: {path} has model.{f}={getattr(src_cfg, f)}, the recipe "
             f"{getattr(cfg, f)}; training uses the recipe's value"
             for f in SOFT_FIELDS if getattr(src_cfg, f) != getattr(cfg, f)]
    notes += list(info.get("notes", []))
    state = model.state_dict()
    if info["kind"] == "mmtrain":
        from mmtrain.train.checkpoint import dcp_load

        dcp_load({f"model.{k}": v for k, v in state.items()}, info["checkpoint"],
                 no_dist=True)
        notes.append(f"{what}: loaded model weights from {info['checkpoint']}")
        return notes
    from mmtrain.hf.import_ import open_source

    tensors, _ = open_source(path, src_cfg, info)
    with torch.no_grad():
        for t in tensors:
            x = t.produce()
            state[t.name].copy_(x)
            del x
            release_memory()
    notes.append(f"{what}: loaded model weights from the HF directory {path} "
                 f"({info.get('flavor')} layout)")
    return notes


class MiniMaxForInference(nn.Module):
    """A MiniMaxModel behind a transformers-like call: ``model(input_ids) -> logits [B, T, V]``.

    Each row of ``input_ids`` is one sequence (positions 0..T-1). ``.model`` is the underlying
    :class:`~mmtrain.model.MiniMaxModel`; ``.config`` its ModelConfig."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.cfg

    def forward(self, input_ids: torch.Tensor, position_ids=None, cu_seqlens=None) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        dev = next(self.model.parameters()).device
        return self.model(input_ids.to(dev), cu_seqlens, position_ids).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding (full recompute per token; meant for checks, not serving)."""
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        for _ in range(max_new_tokens):
            nxt = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return ids


def from_pretrained(path, *, device="cpu", dtype=None) -> MiniMaxForInference:
    """An mmtrain checkpoint, run directory or HF directory -> a model in eval mode whose call on
    ``input_ids`` [B, T] returns logits [B, T, V]."""
    cfg, _ = source_config(path)
    model = build_empty(cfg, device=device)
    load_weights(path, model, what="from_pretrained")
    if dtype is not None:
        model = model.to(dtype)
    return MiniMaxForInference(model).eval()


