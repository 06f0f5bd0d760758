"""The few small all-reduces the training loop agrees through. Every tensor lives on the rank's
bound device: NCCL reduces only device tensors, and one on another GPU would run there."""

from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise logical OR of `flags` over ranks (one tiny all-reduce)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def global_mean(value: torch.Tensor, world_size: int) -> float:
    """Mean of a scalar over ranks (one tiny all-reduce, on the value's device)."""
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total.item() / world_size
