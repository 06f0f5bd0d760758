"""AdamW parameter groups and the learning-rate schedule [P Table 10].

The model states which parameters must not be decayed (`model.no_weight_decay()`: norms, biases,
relative-position tables); this module applies the policy (timm's `_optim_factory` split, kecam's
+0.3% from excluding the tables, spec section 5). The schedule is a pure function of the step, so
a resumed run needs no scheduler state beyond the step counter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from coatnet_scale.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the names of `model.no_weight_decay()` without decay."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip or param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW over the two groups; DeepSpeed wraps it (zero_allow_untested_optimizer)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
    )


def lr_at(step: int, peak: float, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from 0 to `peak`, then
    cosine or linear decay to `schedule.min_lr` at `total_steps`, or constant."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.decay == "constant" or total_steps <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule.decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return schedule.min_lr + (peak - schedule.min_lr) * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
