"""The MiniMax-01 decoder (SPEC §1–5) in plain single-device PyTorch.

Legend: B rows, T row length, P = B·T packed tokens, D hidden, V vocab.

The rows of a batch are flattened into one packed stream of P tokens; ``cu_seqlens`` marks
document (and row) boundaries so neither attention kind crosses one. DeepNorm post-norm (as
released):  ``a = N_in(h); h1 = α·a + Attn(a); m = N_post(h1); h2 = α·m + MoE(m)``; the pre-norm
option is ``h1 = h + Attn(N_in(h)); h2 = h1 + MoE(N_post(h1))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from mmtrain.config import ModelConfig
from mmtrain.model.attention import LightningAttention, SoftmaxAttention
from mmtrain.model.layers import RMSNorm, residual_norm_compiled, rms_args
from mmtrain.model.moe import Balance, MoE
from mmtrain.model.recompute import MODES as RECOMPUTE_MODES
from mmtrain.model.recompute import checkpoint_moe_layer


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # [B, T, V]; None with return_hidden
    aux_loss: torch.Tensor  # mean over layers of E·Σ f·m (1 when balanced)
    # with return_hidden: final_norm(h) [P, D] of the P tokens this rank holds (under sequence
    # parallelism its sequence shard), for a loss that applies lm_head itself (fused_ce)
    hidden: Optional[torch.Tensor] = None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        attn_cls = LightningAttention if kind == "lightning" else SoftmaxAttention
        self.attn = attn_cls(cfg, layer_idx)
        self.moe = MoE(cfg, layer_idx)
        self.deepnorm = cfg.norm_scheme == "deepnorm"
        self.alpha = cfg.deepnorm_alpha if self.deepnorm else 1.0
        self.use_compiled = False  # train.compile (mmtrain.model.compiled)

    def forward(self, h, cu_seqlens, position_ids):
        post = rms_args(self.post_norm) if self.use_compiled else None
        if post is not None:  # the residual add and the post-attention norm: one compiled region
            if self.deepnorm:
                a = self.input_norm(h)
                m = residual_norm_compiled(a, self.attn(a, cu_seqlens, position_ids),
                                           self.alpha, *post, False)
                y, aux = self.moe(m)
                return self.alpha * m + y, aux
            h, m = residual_norm_compiled(h, self.attn(self.input_norm(h), cu_seqlens,
                                                       position_ids), None, *post, True)
            y, aux = self.moe(m)
            return h + y, aux
        if self.deepnorm:
            a = self.input_norm(h)
            h = self.alpha * a + self.attn(a, cu_seqlens, position_ids)
            m = self.post_norm(h)
            y, aux = self.moe(m)
            return self.alpha * m + y, aux
        h = h + self.attn(self.input_norm(h), cu_seqlens, position_ids)
        y, aux = self.moe(self.post_norm(h))
        return h + y, aux


class MiniMaxModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, kind)
                                    for i, kind in enumerate(cfg.layer_types()))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.set_balance(Balance(cfg.global_routing))
        self.recompute = "none"
        self.use_compiled = False

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation: ``none``, ``selective`` or ``full`` (see
        :mod:`mmtrain.model.recompute`). Reads module attributes at forward time, so it may be
        set before or after ``mmtrain.parallel`` swaps modules."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
        self.recompute = mode
        for layer in self.layers:
            if isinstance(layer.attn, LightningAttention):  # softmax: flash saves o and lse only
                layer.attn.recompute_core = mode == "selective"
            layer.moe.recompute_combine = mode == "selective"

    def set_compile(self, on: bool) -> None:
        """``train.compile``: run the small pure-tensor regions of every layer (residual + norm,
        router math, RoPE, lightning output norm + gate) through ``torch.compile``
        (:mod:`mmtrain.model.compiled`); off: the eager code. Read at forward time, like
        :meth:`set_recompute`."""
        self.use_compiled = bool(on)
        for layer in self.layers:
            layer.use_compiled = layer.attn.use_compiled = layer.moe.use_compiled = bool(on)

    # ----------------------------------------------------------------------------------------
    def set_balance(self, balance: Balance) -> None:
        """One :class:`~mmtrain.model.moe.Balance` for every MoE layer (``mmtrain.parallel``
        installs a distributed one)."""
        self.balance = balance
        for layer in self.layers:
            layer.moe.balance = balance

    def begin_step(self, step_tokens: int) -> None:
        """A training step starts whose global batch routes ``step_tokens`` tokens (all ranks):
        the aux loss and the MoE statistics are then those of the whole step."""
        self.balance.begin_step(step_tokens)

    def moe_stats(self) -> torch.Tensor:
        """This rank's MoE statistics of the step so far, [L, 2E + 2] fp64 (counts, probability
        sums, dropped slots, tokens per layer; see ``Balance.record``)."""
        rows = [self.balance.stats[i] for i in range(len(self.layers)) if i in self.balance.stats]
        return torch.stack(rows) if rows else torch.zeros(0, 2 * self.cfg.num_experts + 2,
                                                          dtype=torch.float64)

    # ----------------------------------------------------------------------------------------
    def reset_parameters(self, seed: int = 0):
        """Xavier init with DeepNet's β on FFN (experts), value and output projections
        (:mod:`mmtrain.model.init`: counter-based, so every layout that initialises its shards
        with the same seed gets these weights bitwise)."""
        from mmtrain.model.init import init_weights

        init_weights(self, self.cfg, seed)

    # ----------------------------------------------------------------------------------------
    def forward(self, tokens, cu_seqlens=None, position_ids=None,
                return_hidden: bool = False) -> ModelOutput:
        """tokens [B, T]; cu_seqlens [N+1] over the flattened B·T (default: one sequence a row);
        position_ids [B, T] (default: derived from cu_seqlens). ``return_hidden``: no logits;
        ``hidden`` = final_norm(h) [P, D] for a loss that applies ``lm_head`` itself."""
        B, T = tokens.shape
        P = B * T
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, P + 1, T, dtype=torch.int32, device=tokens.device)
            cu_seqlens.host = list(range(0, P + 1, T))
        if position_ids is None:
            from mmtrain.data.batch import host_cu, position_ids_from_cu_seqlens

            cu = torch.tensor(host_cu(cu_seqlens), dtype=torch.int64)
            position_ids = position_ids_from_cu_seqlens(cu, P).to(tokens.device)
        pos = position_ids.reshape(P)
        h = self.embed(tokens.reshape(P))
        aux_total = h.new_zeros((), dtype=torch.float32)
        full = self.recompute == "full" and torch.is_grad_enabled()
        for layer in self.layers:
            if full:  # keep the layer's input only (mmtrain.model.recompute)
                h, aux = checkpoint_moe_layer(layer, self.balance, h, cu_seqlens, pos)
            else:
                h, aux = layer(h, cu_seqlens, pos)
            aux_total = aux_total + aux
        if return_hidden:
            return ModelOutput(None, aux_total / max(len(self.layers), 1), self.final_norm(h))
        logits = self.lm_head(self.final_norm(h))
        return ModelOutput(logits.view(B, T, -1), aux_total / max(len(self.layers), 1))
