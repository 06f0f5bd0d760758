"""EMA of the weights and BatchNorm statistics, kept in fp32 on each rank's device (ZeRO 0-2:
every rank holds all weights).

Under ZeRO-3 a rank holds only its partition, so a full-weight EMA would be wrong: that case is
refused up front (`check_ema_supported`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from coatnet_scale.config import Config


class WeightEma:
    """fp32 shadow copies of a model's parameters and floating-point buffers (BatchNorm running
    statistics), on the rank's device.

    Buffers are averaged like the weights (as timm's ModelEmaV2 does): evaluating or exporting
    the EMA weights with the live model's statistics would pair weights with statistics of
    other weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device) -> None:
        self.decay = decay
        self.device = device
        self.shadow = {
            n: t.detach().to(device=device, dtype=torch.float32, copy=True)
            for n, t in _tracked(model)
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, tensor in _tracked(model):
            self.shadow[name].lerp_(tensor.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's weights and statistics with the EMA's (call twice to restore)."""
        for name, tensor in _tracked(model):
            current = tensor.detach().float().clone()
            tensor.copy_(self.shadow[name].to(tensor.dtype))
            self.shadow[name] = current

    def load(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Take saved EMA tensors (read on the CPU) onto the rank's device; tensors an older
        checkpoint lacks (its EMA had no buffers) keep their current values."""
        self.shadow = {
            name: saved[name].to(device=self.device, dtype=torch.float32)
            if name in saved
            else current
            for name, current in self.shadow.items()
        }


def _tracked(model: torch.nn.Module):
    """The parameters and floating-point buffers, by name (not num_batches_tracked)."""
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if b.is_floating_point())


def check_ema_supported(cfg: Config) -> None:
    if cfg.train.ema_decay > 0 and cfg.zero.stage == 3:
        raise ValueError(
            "train.ema_decay needs zero.stage <= 2: under ZeRO-3 each rank holds only a shard of "
            "the weights and a sharded EMA is not implemented yet"
        )
