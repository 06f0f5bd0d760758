"""The few small all-reduces the training loop agrees through. Every tensor lives on the rank's
bound device: NCCL reduces only device tensors, and one on another GPU would run there."""

from __future__ import annotations

import torch
import torch.distributed as dist


def largest(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of `values` over ranks (one tiny all-reduce): a flag any rank raised,
    or the signal any rank received."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def global_mean(value: torch.Tensor, world_size: int) -> float:
    """Mean of a scalar over ranks (one tiny all-reduce, on the value's device)."""
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total.item() / world_size


def global_sum(value: float, device: torch.device) -> float:
    """Sum of a number over ranks (one tiny all-reduce)."""
    total = torch.tensor([float(value)], device=device)
    dist.all_reduce(total)
    return total.item()
