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
    """Two groups: decayed weights, and the names of `model.no_weight_decay()` without decay.

    A model without that method gets timm's rule (no decay for 0/1-dimensional parameters),
    applied to the parameter's real shape: DeepSpeed's `ds_shape` under ZeRO-3, where the stored
    tensor is an empty partition."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else None
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if skip is None:
            exempt = len(getattr(param, "ds_shape", param.shape)) <= 1
        else:
            exempt = name in skip
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that leaves parameters and state untouched when the gradients are not
    finite, and says so the way DeepSpeed's own optimizers do (an `overflow` flag the engine reads
    after the step: `was_step_applied()`, its skipped-step count).

    DeepSpeed's ZeRO and mixed-precision optimizers check the gradients before they step the
    optimizer they wrap; with fp32 ZeRO-0 the engine drives the torch optimizer directly, and
    AdamW would turn every weight NaN. Under the other stages this check sees the finite fp32
    partitions the wrapper passes on, and never skips.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        self.overflow = bool(grads) and not all(torch.isfinite(g).all() for g in grads)
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the two groups (`GuardedAdamW`); DeepSpeed wraps it (its config says
    zero_allow_untested_optimizer)."""
    return GuardedAdamW(
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
