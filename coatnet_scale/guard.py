"""What an optimizer step's outcome means, and when a run has to stop.

Three outcomes, decided the same way on every rank (the loss is the mean over ranks, DeepSpeed's
overflow check is all-reduced):

- applied: the update happened with a finite loss and gradient norm;
- calibration: fp16's dynamic loss scaler found an overflow and halved its scale. The first steps
  of every fp16 run do this until the scale fits the gradients (one skip per halving, more with
  `precision.hysteresis`); it is the scaler working, not a failing run, so it is counted apart
  (`loss_scale_skips`) and never stops the run;
- non-finite: the loss or the gradient norm is not finite, or the scaler overflowed although its
  scale was already at `precision.min_loss_scale`. DeepSpeed skips such an update where its
  optimizer checks the gradients (ZeRO 1-3, its bf16/fp16 optimizers); where the engine drives
  the torch optimizer directly (fp32 ZeRO-0), `optim.GuardedAdamW` checks them the same way.
  `train.max_nonfinite_steps` of them in a row end the run (`NonFiniteError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Outcome = Literal["applied", "calibration", "nonfinite"]


@torch.no_grad()
def gradient_norm(model: torch.nn.Module) -> float:
    """The global gradient norm at the accumulation boundary (the gradients are averaged over
    ranks there: every rank computes the same), for the path where DeepSpeed reports none (fp32
    ZeRO-0, whose torch optimizer it drives directly)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class StepGuard:
    max_in_a_row: int
    min_loss_scale: float
    skipped: int = 0  # non-finite steps over the whole run (kept in checkpoints)
    loss_scale_skips: int = 0  # fp16 calibration skips over the whole run (kept in checkpoints)
    in_a_row: int = 0

    def observe(
        self,
        loss: float,
        grad_norm: float | None,
        applied: bool,
        loss_scale_before: float | None,
    ) -> Outcome:
        """Classify a finished step. `grad_norm` None: not reported by this optimizer;
        `loss_scale_before`: fp16's loss scale when the step began (None without a scaler)."""
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if applied and finite:
            self.in_a_row = 0
            return "applied"
        if (
            not applied
            and math.isfinite(loss)
            and loss_scale_before is not None
            and loss_scale_before > self.min_loss_scale
        ):
            self.loss_scale_skips += 1
            return "calibration"
        self.skipped += 1
        self.in_a_row += 1
        return "nonfinite"

    def check(self) -> None:
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient norm (limit "
                f"train.max_nonfinite_steps={self.max_in_a_row}); lower optim.lr, raise "
                "optim.grad_clip, or resume from an earlier checkpoint"
            )


def overflow_at_min_scale_skips(engine) -> None:
    """fp16 on ZeRO 1-3: an overflow at `precision.min_loss_scale` is one more skipped step,
    which the step guard counts towards `train.max_nonfinite_steps` (then stops the run with
    what to change), as on ZeRO-0. DeepSpeed's DynamicLossScaler raises a bare Exception there
    instead ("Current loss scale already at minimum", `raise_error_at_min_scale`, which its
    config does not expose; DeepSpeed 0.19.8, runtime/fp16/loss_scaler.py). Called after
    `deepspeed.initialize` and again after a checkpoint load, which replaces the scaler with the
    pickled one."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
        scaler.raise_error_at_min_scale = False
