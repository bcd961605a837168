"""Small building blocks: RMSNorm, partial rotary embedding, decay slopes, Xavier init helpers.

Legend: T tokens, H heads, K head dim, R rotary dims (the first R of each head's K).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.model.compiled import Region


def rms_norm(x, weight, eps: float):
    """RMSNorm of the last dim with gain ``weight``. A half-precision input (the lightning output
    norm under autocast) meets the gain in its dtype, as autocast does for a GEMM's weight (the
    fused kernel needs equal dtypes; it accumulates in fp32); fp32 inputs are unchanged."""
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rms_args(norm) -> tuple | None:
    """(weight, eps) of a plain :class:`RMSNorm` module, else None: a swapped-in norm (TP's
    full-width one) keeps its own forward, run eagerly (``train.compile``)."""
    return (norm.weight, norm.eps) if type(norm) is RMSNorm else None


def residual_norm(x, y, alpha, weight, eps: float, keep_sum: bool):
    """``N(α·x + y)`` (``alpha`` None: ``N(x + y)``) with N an :class:`RMSNorm` of gain
    ``weight``; with ``keep_sum`` the pair (sum, norm). The decoder layer's residual add and
    post-attention norm, the same ops as its eager code (``train.compile``:
    :data:`residual_norm_compiled`)."""
    h = x + y if alpha is None else alpha * x + y
    m = rms_norm(h, weight, eps)
    return (h, m) if keep_sum else m


residual_norm_compiled = Region(residual_norm, token_args=(0, 1))


def lightning_slopes(layer: int, num_layers: int, num_heads: int) -> torch.Tensor:
    """Decay rates s of SPEC §2: ``2^(-8(h+1)/H) · (1 - l/(L-1) + 1e-5)`` (fp64, [H])."""
    h = torch.arange(num_heads, dtype=torch.float64)
    base = torch.pow(2.0, -8.0 * (h + 1) / num_heads)
    depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
    return base * (1.0 - depth + 1e-5)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype):
    """cos, sin [T, R/2] for NeoX-style rotate-half over the first R dims of a head."""
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64,
                                        device=position_ids.device) / rotary_dim))
    ang = position_ids.to(torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_partial_rope(x_THK: torch.Tensor, cos, sin, rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of each head (rotate-half within them)."""
    if rotary_dim == 0:
        return x_THK
    rot, rest = x_THK[..., :rotary_dim], x_THK[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def rope_qk(q_THK, k_TGK, position_ids, rotary_dim: int, theta: float):
    """Partial RoPE of q and k (:func:`rope_cos_sin` then :func:`apply_partial_rope` on each):
    softmax attention's eager path (``train.compile``: :data:`rope_qk_compiled`)."""
    cos, sin = rope_cos_sin(position_ids, rotary_dim, theta, q_THK.dtype)
    return (apply_partial_rope(q_THK, cos, sin, rotary_dim),
            apply_partial_rope(k_TGK, cos, sin, rotary_dim))


rope_qk_compiled = Region(rope_qk, token_args=(0, 1, 2))


def xavier_normal_(w: torch.Tensor, gain: float = 1.0, generator=None) -> torch.Tensor:
    """Xavier normal over the last two dims (stacked expert weights count per expert)."""
    fan_out, fan_in = w.shape[-2], w.shape[-1]
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    with torch.no_grad():
        return w.normal_(0.0, std, generator=generator)
