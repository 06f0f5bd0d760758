"""EMA of the weights, kept in fp32 on each rank's device (ZeRO 0-2: every rank holds all weights).

Under ZeRO-3 a rank holds only its partition, so a full-weight EMA would be wrong: that case is
refused up front (`check_ema_supported`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from coatnet_scale.config import Config


class WeightEma:
    """fp32 shadow copies of a model's parameters, on the rank's device."""

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device) -> None:
        self.decay = decay
        self.device = device
        self.shadow = {
            n: p.detach().to(device=device, dtype=torch.float32, copy=True)
            for n, p in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's weights with the EMA's (call twice to restore)."""
        for name, param in model.named_parameters():
            current = param.detach().float().clone()
            param.copy_(self.shadow[name].to(param.dtype))
            self.shadow[name] = current

    def load(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Take saved EMA weights (read on the CPU) onto the rank's device."""
        self.shadow = {
            name: saved[name].to(device=self.device, dtype=torch.float32) for name in self.shadow
        }


def check_ema_supported(cfg: Config) -> None:
    if cfg.train.ema_decay > 0 and cfg.zero.stage == 3:
        raise ValueError(
            "train.ema_decay needs zero.stage <= 2: under ZeRO-3 each rank holds only a shard of "
            "the weights and a sharded EMA is not implemented yet"
        )
