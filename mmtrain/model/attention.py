"""The two attention layer kinds of MiniMax-01 (SPEC §2, §3).

Legend: T tokens of the packed micro-batch (rows flattened), D hidden size, H heads, G KV heads,
K head dim. Inputs are ``x_TD`` with ``cu_seqlens`` [N+1] document boundaries over T.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.config import ModelConfig
from mmtrain.model.compiled import Region
from mmtrain.model.layers import (RMSNorm, lightning_slopes, rms_args, rms_norm, rope_qk,
                                  rope_qk_compiled, xavier_normal_)
from mmtrain.model.moe import compute_dtype
from mmtrain.model.ops import LightningOp, SoftmaxOp
from mmtrain.model.recompute import maybe_checkpoint


def norm_gate(o_TW, weight, eps: float, gate_TW, dtype):
    """Lightning attention's output :class:`RMSNorm` (gain ``weight``) of ``o`` in ``dtype``,
    times the sigmoid of the gate projection: the ops of ``LightningAttention._core``
    (``train.compile``: :data:`norm_gate_compiled`)."""
    return rms_norm(o_TW.to(dtype), weight, eps) * torch.sigmoid(gate_TW)


norm_gate_compiled = Region(norm_gate, token_args=(0, 3))


class LightningAttention(nn.Module):
    """SiLU qkv (per-head layout) → decayed linear attention → full-width RMSNorm → sigmoid gate
    → out projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        width = cfg.num_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * width, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.out_proj = nn.Linear(width, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(width, cfg.lightning_norm_eps)
        # Fixed, never learned; not in the state dict (a function of the layer index alone).
        self.register_buffer("slopes", lightning_slopes(layer_idx, cfg.num_layers, cfg.num_heads)
                             .to(torch.float32), persistent=False)
        self.layer_idx = layer_idx
        # the slopes of heads [head_start, head_start + num_heads) of total_heads (TP keeps a
        # slice); recomputed by reset_buffers after a build on the meta device
        self.head_start, self.total_heads, self.num_layers = 0, cfg.num_heads, cfg.num_layers
        self.core = LightningOp(cfg.lightning_block_size)
        self.recompute_core = False  # train.recompute=selective (mmtrain.model.recompute)
        self.use_compiled = False  # train.compile (mmtrain.model.compiled)

    def reset_buffers(self):
        s = lightning_slopes(self.layer_idx, self.num_layers, self.total_heads)
        h0 = self.head_start
        self.slopes = s[h0:h0 + self.num_heads].to(torch.float32).to(self.slopes.device)

    def forward(self, x_TD, cu_seqlens, position_ids=None):
        qkv, gate = self.qkv_proj(x_TD), self.gate_proj(x_TD)
        # The output norm and gate run in the compute dtype (bf16 under autocast: the core's
        # output is not widened to the fp32 residual stream's dtype; fp32 runs are unchanged).
        o = maybe_checkpoint(self.recompute_core, self._core, qkv, gate, cu_seqlens,
                             compute_dtype(x_TD))
        return self.out_proj(o)

    def _core(self, qkv_T3, gate_TW, cu_seqlens, dtype):
        """From the qkv and gate projections to the input of ``out_proj``."""
        T = qkv_T3.shape[0]
        H, K = self.num_heads, self.head_dim
        qkv = F.silu(qkv_T3).view(T, H, 3 * K)  # per-head layout: [q_h | k_h | v_h] per head
        packed = getattr(self.core, "packed", None)
        if packed is not None:  # the op reads q, k, v in place (no copies, one gradient)
            o, _ = packed(qkv[None], self.slopes, cu_seqlens)
        else:
            q, k, v = qkv.split(K, dim=-1)
            o, _ = self.core(q[None], k[None], v[None], self.slopes, cu_seqlens)
        norm = rms_args(self.norm) if self.use_compiled else None
        if norm is not None:
            return norm_gate_compiled(o[0].reshape(T, H * K), *norm, gate_TW, dtype)
        o = self.norm(o[0].reshape(T, H * K).to(dtype))
        return o * torch.sigmoid(gate_TW)

    def reset_parameters(self, beta: float, generator=None):
        xavier_normal_(self.qkv_proj.weight, generator=generator)
        K = self.head_dim
        with torch.no_grad():  # DeepNet's β on the value projection: the v slice of every head
            w = self.qkv_proj.weight.view(self.num_heads, 3 * K, -1)
            w[:, 2 * K:, :] *= beta
        xavier_normal_(self.gate_proj.weight, generator=generator)
        xavier_normal_(self.out_proj.weight, gain=beta, generator=generator)
        self.norm.reset_parameters()


class SoftmaxAttention(nn.Module):
    """GQA softmax attention with partial RoPE (first ``rotary_dim`` dims of each head)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rotary_dim = cfg.rope_dim
        self.rope_theta = cfg.rope_theta
        self.layer_idx = layer_idx
        self.core = SoftmaxOp()
        self.use_compiled = False  # train.compile (mmtrain.model.compiled)

    def forward(self, x_TD, cu_seqlens, position_ids):
        T = x_TD.shape[0]
        q = self.q_proj(x_TD).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x_TD).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_TD).view(T, self.num_kv_heads, self.head_dim)
        rope = rope_qk_compiled if self.use_compiled and self.rotary_dim else rope_qk
        q, k = rope(q, k, position_ids, self.rotary_dim, self.rope_theta)
        o = self.core(q, k, v, cu_seqlens, 1.0 / math.sqrt(self.head_dim))
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))

    def reset_parameters(self, beta: float, generator=None):
        xavier_normal_(self.q_proj.weight, generator=generator)
        xavier_normal_(self.k_proj.weight, generator=generator)
        xavier_normal_(self.v_proj.weight, gain=beta, generator=generator)
        xavier_normal_(self.o_proj.weight, gain=beta, generator=generator)
