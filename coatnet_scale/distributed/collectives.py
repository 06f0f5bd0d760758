"""The small collectives the trainer and the checkpoints agree through.

Tensor reductions (`largest`, `global_mean`, `global_sum`) take tensors on the rank's bound
device: NCCL reduces only device tensors, and one on another GPU would run there. The object
collectives (`barrier`, `from_rank0`, `gather`) also work without a process group (one rank),
as the checkpoint tools run outside training too."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from coatnet_scale.files import atomic_write_text


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


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    world = rank_world()[1]
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def rank0_work_awaited_on_disk(
    work: Callable[[], str | None], done: Callable[[], bool], folder: Path, poll_s: float = 0.5
) -> str | None:
    """Rank 0 runs `work` (it returns an error message or None; an exception is its message);
    the other ranks wait on the filesystem until `done()` or rank 0's failure note in `folder`,
    not in a collective, which would fail after the collective timeout a long work (a CoAtNet-7
    conversion or merge) can outlast. Then one quick barrier. Returns the failure, on every rank.
    `folder` must be visible to every rank (the run folder, shared like the checkpoints)."""
    rank = rank_world()[0]
    note = folder / f".tmp-failed-{from_rank0(secrets.token_hex(4))}"  # this attempt's
    failure = None
    if rank == 0:
        try:
            failure = work()
        except Exception as err:  # the waiting ranks must hear of any failure
            failure = repr(err)
        if failure:
            atomic_write_text(note, failure)
    else:
        while not done() and not note.exists():
            time.sleep(poll_s)
        if note.exists():
            failure = note.read_text() or "failed on rank 0"
    barrier()
    if rank == 0:
        note.unlink(missing_ok=True)
    return failure
