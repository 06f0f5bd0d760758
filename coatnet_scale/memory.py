"""Measuring tensor memory: the CPU counterpart of `torch.cuda.max_memory_allocated`.

The planner's predictions are checked against measurements on CPU, where PyTorch keeps no
allocator statistics. Its profiler, with `profile_memory=True`, does see every CPU allocation and
free (c10's ProfiledCPUMemoryReporter) and records the running total; `track_allocations` reads
that total back. On CUDA it uses the allocator's own peak counter. Either way the figures count
tensor bytes, not what the process's allocator keeps around them.

Only allocations made inside the tracked block are counted: freeing a tensor that existed before
the block does not lower the total (the profiler does not know its size). So the block should
start where the state to measure begins, e.g. before the model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Allocations:
    """Filled in when the `track_allocations` block ends."""

    peak_bytes: int = 0  # most bytes allocated inside the block that were alive at one time
    net_bytes: int = 0  # bytes allocated inside the block and still alive at its end
    alive: list[int] = dataclasses.field(default_factory=list)  # their sizes, largest first


@contextlib.contextmanager
def track_allocations(device: torch.device | str = "cpu") -> Iterator[Allocations]:
    """Peak and net tensor memory allocated inside the block, on `device` (CPU or CUDA)."""
    device = torch.device(device)
    result = Allocations()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
        result.net_bytes = torch.cuda.memory_allocated(device) - start
        return
    if device.type != "cpu":
        raise ValueError(f"cannot track allocations on {device}: only cpu and cuda")
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # "Memory block of unknown size was allocated before the profiling started": expected.
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
    # The reporter's running total also falls when a tensor allocated during an earlier profiling
    # session is freed, so the total is recomputed here from this block's own allocations.
    live: dict[int, int] = {}
    current = 0
    for fields in _allocation_events(prof.profiler.kineto_results.experimental_event_tree()):
        if fields.alloc_size > 0:
            # An address allocated again without a free in between: the free was recorded on
            # another thread with the same timestamp; count it as freed.
            current += fields.alloc_size - live.get(fields.ptr, 0)
            live[fields.ptr] = fields.alloc_size
            result.peak_bytes = max(result.peak_bytes, current)
        elif live.get(fields.ptr) == -fields.alloc_size:
            current -= live.pop(fields.ptr)
    result.net_bytes = current
    result.alive = sorted(live.values(), reverse=True)


def _allocation_events(events: Iterable) -> list:
    """The CPU allocation events of the profiler's tree (they sit under their ops), in time
    order; at equal timestamps frees come first (an address is freed before it is reused)."""
    found: list = []
    stack = list(events)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if (
            event.tag == torch._C._profiler._EventType.Allocation
            and event.extra_fields.device.type == "cpu"
        ):
            found.append((event.start_time_ns, event.extra_fields.alloc_size > 0, event))
    found.sort(key=lambda item: item[:2])
    return [event.extra_fields for _, _, event in found]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a torch optimizer's per-parameter state tensors (Adam's two moments, step)."""
    return tensor_bytes(
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def device_memory_metrics(device: torch.device) -> dict[str, float]:
    """Memory figures for the metrics log, in MiB, since the previous call (peaks are reset).

    CUDA: the allocator's peak allocated and reserved bytes on `device` (the rank's own GPU, not
    the current one), the device's free memory, and what other users of the device hold besides
    the allocator's reservation (CUDA context, NCCL buffers, cuDNN workspaces). CPU: the process's
    peak resident set (never reset) and the host's available memory.
    """
    mib = 2**20
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        metrics = {
            "memory_mb": torch.cuda.max_memory_allocated(device) / mib,
            "memory_reserved_mb": torch.cuda.max_memory_reserved(device) / mib,
            "memory_free_mb": free / mib,
            "memory_other_mb": max(0, total - free - reserved) / mib,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return metrics
    import resource

    return {
        "memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory_free_mb": host_memory_free() / mib,
    }


def host_memory_free() -> int:
    """Bytes of memory the host can still give (MemAvailable), 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
