"""Mixture of experts (SPEC §4): router, SwiGLU experts with stacked weights, local dispatcher.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, S routed slots (T·K),
C capacity per expert.

Router: ``p = softmax(x W_g)`` in fp32 over all E, top-K, renormalise the K weights to sum 1.
Aux loss (GShard form, mmtrain's normalisation): ``E · Σ_i f_i · m_i`` with f_i the fraction of the
T·K routed slots that chose expert i (before any drop) and m_i the mean router probability of
expert i; it is 1 under perfectly balanced routing. The paper's ``(1/E)·Σ f·m`` with coefficient
α_paper equals this with coefficient α_paper / E².

Capacity dropping (``capacity_factor`` not null): C = ceil(capacity_factor · T · K / E). Slots are
ranked first-choice before second-choice (all tokens' k=0 slots, then all k=1 slots, …), and by
token order within a choice rank (GShard's priority); an expert keeps its first C slots in that
order and drops the rest: a dropped slot contributes nothing and the residual carries the token.

The dispatcher is the MoE seam: ``LocalDispatcher`` permutes tokens in place; the expert-parallel
one (all-to-all over EP with ETP) replaces it in ``mmtrain.parallel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.config import ModelConfig
from mmtrain.model.layers import xavier_normal_


@dataclass
class Routing:
    idx_TK: torch.Tensor  # chosen experts
    weight_TK: torch.Tensor  # renormalised weights (fp32)
    keep_TK: torch.Tensor  # bool, False where capacity dropped the slot
    probs_TE: torch.Tensor  # full softmax (fp32)


def route(logits_TE: torch.Tensor, top_k: int, capacity_factor: float | None) -> Routing:
    probs = torch.softmax(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    keep = capacity_keep(idx, probs.shape[-1], capacity_factor)
    return Routing(idx, w, keep, probs)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep(idx_TK: torch.Tensor, num_experts: int, capacity_factor: float | None,
                  capacity: int | None = None, prior_counts_E: torch.Tensor | None = None):
    """Which slots survive the capacity limit (see the module docstring for the order).

    ``prior_counts_E`` are slots already taken on each expert by earlier tokens (global routing
    passes the counts of lower ranks of the same expert replica group)."""
    T, K = idx_TK.shape
    if capacity_factor is None and capacity is None:
        return torch.ones_like(idx_TK, dtype=torch.bool)
    cap = capacity if capacity is not None else expert_capacity(T, K, num_experts, capacity_factor)
    order = idx_TK.t().reshape(-1)  # k-major: all first choices, then all second choices
    onehot = F.one_hot(order, num_experts)
    pos = (onehot.cumsum(0) - 1).gather(1, order[:, None])[:, 0]
    if prior_counts_E is not None:
        pos = pos + prior_counts_E.to(pos.dtype)[order]
    return (pos < cap).view(K, T).t()


def aux_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor | None = None,
             num_slots: int | None = None) -> torch.Tensor:
    """``E · Σ f_i m_i``; ``counts_E``/``num_slots`` may come from a global gather."""
    E = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
        num_slots = idx_TK.numel()
    f = counts_E.to(probs_TE.dtype) / max(num_slots, 1)
    m = probs_TE.mean(dim=0)
    return E * (f * m).sum()


class Experts(nn.Module):
    """E SwiGLU experts, weights stacked: ``W2(SiLU(W1 x) ⊙ W3 x)``."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_SD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """x_SD grouped by expert (expert 0's rows first); returns [S, D]."""
        outs = []
        start = 0
        for e, n in enumerate(tokens_per_expert):
            if n == 0:
                continue
            x = x_SD[start:start + n]
            h = F.silu(x @ self.w1[e].t()) * (x @ self.w3[e].t())
            outs.append(h @ self.w2[e].t())
            start += n
        if not outs:
            return x_SD.new_zeros(x_SD.shape)
        return torch.cat(outs, dim=0)

    def reset_parameters(self, beta: float, generator=None):
        for w in (self.w1, self.w3, self.w2):
            xavier_normal_(w, gain=beta, generator=generator)


class LocalDispatcher:
    """Permute kept slots so each expert's tokens are contiguous, then scatter-add back."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, num_experts: int):
        T, K = routing.idx_TK.shape
        flat_e = routing.idx_TK.reshape(-1)
        flat_keep = routing.keep_TK.reshape(-1)
        slot_ids = torch.nonzero(flat_keep, as_tuple=False)[:, 0]
        experts = flat_e[slot_ids]
        order = torch.argsort(experts, stable=True)
        slot_ids = slot_ids[order]
        tokens = slot_ids // K
        counts = torch.bincount(experts, minlength=num_experts).tolist()
        ctx = (tokens, slot_ids, T)
        return x_TD[tokens], counts, ctx

    def combine(self, y_SD: torch.Tensor, routing: Routing, ctx) -> torch.Tensor:
        tokens, slot_ids, T = ctx
        w = routing.weight_TK.reshape(-1)[slot_ids]
        acc = torch.promote_types(y_SD.dtype, w.dtype)  # sum the k experts in fp32 (or fp64)
        out = y_SD.new_zeros((T, y_SD.shape[-1]), dtype=acc)
        out.index_add_(0, tokens, y_SD.to(acc) * w[:, None].to(acc))
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size)
        self.dispatcher = LocalDispatcher()
        self.last_stats: dict = {}

    def forward(self, x_TD: torch.Tensor):
        """Returns (y_TD, aux) with aux the layer's E·Σ f·m over these tokens."""
        rdt = torch.promote_types(x_TD.dtype, torch.float32)  # fp32 routing (fp64 in fp64 tests)
        logits = F.linear(x_TD.to(rdt), self.router.weight.to(rdt))
        routing = route(logits, self.top_k, self.capacity_factor)
        x_SD, counts, ctx = self.dispatcher.dispatch(x_TD, routing, self.num_experts)
        y_SD = self.experts(x_SD, counts)
        y = self.dispatcher.combine(y_SD, routing, ctx)
        aux = aux_loss(routing.probs_TE, routing.idx_TK)
        with torch.no_grad():
            self.last_stats = {
                "dropped": int((~routing.keep_TK).sum()),
                "slots": routing.keep_TK.numel(),
                "load": torch.bincount(routing.idx_TK.reshape(-1), minlength=self.num_experts),
            }
        return y, aux

    def reset_parameters(self, beta: float, generator=None):
        xavier_normal_(self.router.weight, generator=generator)
        self.experts.reset_parameters(beta, generator)
