"""AdamW parameter groups and the learning-rate schedule [P Table 10].

The model states which parameters must not be decayed (`model.no_weight_decay()`: norms, biases,
relative-position tables); this module applies the policy (timm's `_optim_factory` split, kecam's
+0.3% from excluding the tables, docs/architecture.md section 2.8). The schedule is a pure
function of the step, so a resumed run needs no scheduler state beyond the step counter.
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


EMA_KEY = "ema"  # the optimizer-state entry holding a parameter's EMA


class MasterWeightEma:
    """Mixin for a torch optimizer: after every applied step, the EMA of each parameter it steps
    is updated in its state (`state[p]["ema"]`, fp32), next to Adam's moments.

    Why in the optimizer: the parameters an optimizer steps are the fp32 master weights on every
    ZeRO stage and precision (DeepSpeed hands the wrapped optimizer each rank's flat fp32
    partition; under ZeRO-0 fp32 the model's own weights). The EMA therefore averages the master
    weights, not their bf16 copies, is partitioned exactly like the optimizer state (each rank
    holds the EMA of its own partition, ZeRO 1-3), and is saved, loaded and re-partitioned on an
    elastic resume by DeepSpeed along with the moments (`coatnet_scale.checkpoint` adds it to the
    universal checkpoint, which DeepSpeed writes for the moments only). No reference trainer
    (timm, open_clip, torchtitan, DeepSpeed) keeps a sharded EMA; timm's ModelEmaV3 keeps a full
    copy per rank.

    The EMA starts at the weights before its first step (a run's initial weights, or the loaded
    ones when a checkpoint without EMA is resumed) and moves as `ema += (1 - decay) (w - ema)`
    after each applied step; a skipped step (`overflow`) leaves it unchanged.
    """

    ema_decay: float = 0.0
    overflow: bool = False

    def _ema_starting(self) -> dict[torch.Tensor, torch.Tensor]:
        """Copies of the parameters whose EMA starts with this step (taken before it)."""
        if not self.ema_decay:
            return {}
        return {
            p: p.detach().to(torch.float32, copy=True)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and EMA_KEY not in self.state.get(p, {})
        }

    @torch.no_grad()
    def _ema_update(self, starting: dict[torch.Tensor, torch.Tensor]) -> None:
        if not self.ema_decay or self.overflow:
            return
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state is None or (EMA_KEY not in state and p not in starting):
                    continue  # not stepped yet (no gradient): its weights are its own EMA
                if EMA_KEY not in state:
                    # after AdamW created its state (it initialises only an empty one)
                    state[EMA_KEY] = starting[p]
                state[EMA_KEY].lerp_(p.detach().to(torch.float32), 1.0 - self.ema_decay)


class GuardedAdamW(MasterWeightEma, torch.optim.AdamW):
    """torch's AdamW that leaves parameters and state untouched when the gradients are not
    finite, and says so the way DeepSpeed's own optimizers do (an `overflow` flag the engine reads
    after the step: `was_step_applied()`, its skipped-step count); with `ema_decay`, it keeps the
    EMA of what it steps (`MasterWeightEma`).

    DeepSpeed's ZeRO and mixed-precision optimizers check the gradients before they step the
    optimizer they wrap; with fp32 ZeRO-0 the engine drives the torch optimizer directly, and
    AdamW would turn every weight NaN. Under the other stages this check sees the finite fp32
    partitions the wrapper passes on, and never skips.
    """

    @torch.no_grad()
    def step(self, closure=None):
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        self.overflow = bool(grads) and not all(torch.isfinite(g).all() for g in grads)
        if self.overflow:
            return None
        starting = self._ema_starting()
        result = super().step(closure)
        self._ema_update(starting)
        return result


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> GuardedAdamW:
    """AdamW over the two groups; DeepSpeed wraps it (its config says
    zero_allow_untested_optimizer). The EMA is off until the caller sets `ema_decay` (after
    DeepSpeed's set-up). ZeRO-Offload needs DeepSpeed's CPU Adam instead
    (`distributed.engine.OffloadAdamW`)."""
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
