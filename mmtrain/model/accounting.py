"""Parameter counts and model FLOPs per token, from a model built on the meta device.

* ``params_total``: every parameter, both embedding matrices included.
* ``params_active``: what one token touches, excluding both embedding matrices (SPEC §1):
  attention, norms, routers, and ``top_k`` of the ``num_experts`` experts of each layer.
* ``flops_per_token(seq_len)``: model FLOPs of one training token (forward + backward = 3 ×
  forward), the MFU numerator. Forward counts 2 FLOP per multiply-add of every active matrix
  (the LM head included, the embedding lookup not), plus attention proper:
  softmax layers ``2·H·K·seq_len`` (QKᵀ and AV, causal: on average seq_len/2 keys, 2 matmuls,
  2 FLOP each), lightning layers ``4·H·K²`` (the recurrence's state update kvᵀ and read-out Sᵀq).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtrain.config import ModelConfig


@dataclass
class Accounting:
    params_total: int
    params_active: int
    flops_per_token: float
    layer_types: list

    def as_dict(self) -> dict:
        return {"params_total": self.params_total, "params_active": self.params_active,
                "flops_per_token": self.flops_per_token, "layer_types": self.layer_types}


def build_meta_model(cfg: ModelConfig):
    from mmtrain.model.transformer import MiniMaxModel

    with torch.device("meta"):
        return MiniMaxModel(cfg)


def account(cfg: ModelConfig, seq_len: int) -> Accounting:
    model = build_meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.embed.weight.numel() + model.lm_head.weight.numel()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active_experts = experts * cfg.top_k // cfg.num_experts
    active = total - embeddings - experts + active_experts

    # Matrices that multiply activations (norm weights excluded), per token.
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() >= 2 and ".moe.experts." not in n and n != "embed.weight")
    matmul += active_experts
    types = cfg.layer_types()
    n_soft = types.count("softmax")
    n_light = types.count("lightning")
    H, K = cfg.num_heads, cfg.head_dim
    fwd = 2.0 * matmul + n_soft * 2.0 * H * K * seq_len + n_light * 4.0 * H * K * K
    return Accounting(int(total), int(active), 3.0 * fwd, types)
