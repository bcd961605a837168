"""AdamW and the learning-rate schedules.

The schedule is a pure function of the step (nothing to checkpoint but the step itself).
Weight decay applies to matrices only (norm gains are not decayed).
"""

from __future__ import annotations

import math

import torch

from mmtrain.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac))
    # exp_decay
    start = max(cfg.decay_start, cfg.warmup_steps)
    if step < start:
        return cfg.lr
    span = max(cfg.max_steps - 1 - start, 1)
    frac = min((step - start) / span, 1.0)
    floor = cfg.min_lr if cfg.min_lr > 0 else cfg.lr * 1e-3
    return cfg.lr * (floor / cfg.lr) ** frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
