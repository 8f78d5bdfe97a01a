"""AdamW with Gemma-appropriate parameter groups, and the learning-rate schedules.

Where it sits: `train.loop` builds the optimizer from an `OptimSection` and sets the learning rate
of every step from `lr_at(step)`. The schedule is a pure function of the step, so resuming needs
only the step number (no scheduler object whose state could drift from the optimizer's).

Key trade-off: weight decay applies to matrices only. Norm weights are (1 + w) offsets around 0
and the embedding is also the tied output head: decaying them pulls the norms to unit scale and
shrinks rare tokens' rows, which is why GPT-2-style recipes exempt them (nanoGPT, litgpt).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gemmakit.train.recipe import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over trainable parameters: matrices (decayed), norms and embedding (not)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or name.endswith("norm.weight") or "embed" in name.split(".")
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters (foreach kernels; fused where the device has them)."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, total: int, cfg: OptimSection) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup_steps` (step 0 gets lr / warmup, never 0, so the first step moves);
    then cosine from lr to lr * min_lr_ratio at the last step, or WSD: constant until the last
    `decay_fraction` of steps, then linear to lr * min_lr_ratio; or constant.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    last = max(total - 1, 1)
    if cfg.schedule == "cosine":
        span = max(last - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = max(cfg.warmup_steps, total - max(1, round(cfg.decay_fraction * total)))
    if step < decay_start:
        return peak
    progress = min((step - decay_start) / max(last - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress
