"""Which device a rank computes on, chosen and made current before the process group starts.

Why this is ours to do: `deepspeed.init_distributed` hands a device to the process group but does
not make it current, so without `torch.cuda.set_device` every rank's
`get_accelerator().current_device_name()` is `cuda:0`. DeepSpeed itself reads the `LOCAL_RANK`
variable as the CUDA device index (the engine's device in `_set_distributed_vars`, `zero.Init`'s
local device, the process group's `device_id` in `comm/torch.py`), so the index chosen here is
also what `LOCAL_RANK` must say (`DistEnv.export(device_index=...)`).

The local rank is mapped through the devices this process can see: launchers that show every GPU
of the node to every rank (deepspeed, torchrun, srun without GPU binding) give index = local rank;
SLURM's per-task binding (`--gpus-per-task=1`, `--gpu-bind=single:1`, site defaults) leaves one
visible GPU, index 0. Anything else (2 of 8 GPUs visible to each of 4 ranks) cannot be mapped
without guessing and is an error.

A machine whose GPUs torch cannot use (a driver older than the build needs, a CPU-only torch) must
not quietly train on the CPU with gloo: with `distributed.device=auto` that is an error as soon as
GPU device files or `nvidia-smi` show GPUs; `distributed.device=cpu` asks for the CPU on purpose.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from coatnet_scale.memory import host_memory_free

DeviceChoice = Literal["auto", "cuda", "cpu"]
GIB = 2**30


class DeviceError(RuntimeError):
    """A rank cannot get the device it needs; the message is one line saying what to change."""


@dataclass(frozen=True)
class DeviceBinding:
    """The device this rank computes on."""

    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def index(self) -> int | None:
        return self.device.index if self.is_cuda else None


def visible_device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The index, among the devices this process sees, of the GPU for `local_rank`."""
    if visible == 1:
        return 0  # the scheduler bound one GPU to this task (or the node has one)
    if local_rank < visible and local_world_size <= visible:
        return local_rank  # every rank of the node sees every GPU
    raise DeviceError(
        f"local rank {local_rank} of {local_world_size} on this node sees {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give every "
        "rank either all of the node's GPUs or exactly one (srun --gpus-per-task=1)"
    )


def gpus_present(dev: Path = Path("/dev")) -> list[str]:
    """NVIDIA GPUs the machine has, whatever torch thinks: device files, else `nvidia-smi -L`."""
    files = sorted(p.name for p in dev.glob("nvidia[0-9]*"))
    if files:
        return [str(dev / name) for name in files]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(" (")[0] for line in out.splitlines() if line.startswith("GPU ")]


def cuda_unusable_reason() -> str:
    """Why torch cannot use CUDA here, in torch's own words where it has them."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError/AssertionError with the driver's reason
        return str(err).strip().splitlines()[0]
    return "torch.cuda.is_available() is False"


def bind_device(
    local_rank: int,
    local_world_size: int,
    choice: DeviceChoice,
    find_gpus: Callable[[], Sequence[str]] = gpus_present,
) -> DeviceBinding:
    """Choose this rank's device and make it current (`torch.cuda.set_device`); call it before
    the process group starts. Raises DeviceError instead of falling back to the CPU when GPUs
    are expected or present but unusable."""
    if choice == "cpu":
        return DeviceBinding(torch.device("cpu"))
    if not torch.cuda.is_available():
        # GPUs hidden on purpose (a CPU job on a GPU node) are not a broken driver.
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
        present = list(find_gpus()) if choice == "auto" and not hidden else []
        if choice == "cuda" or present:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            what = f"this machine has GPUs ({shown})" if present else "distributed.device=cuda"
            raise DeviceError(
                f"{what} but torch cannot use CUDA: {cuda_unusable_reason()}; install the torch "
                f"build for this driver (torch {torch.__version__} was built for CUDA "
                f"{torch.version.cuda}), or set distributed.device=cpu to train on the CPU"
            )
        return DeviceBinding(torch.device("cpu"))
    visible = torch.cuda.device_count()
    index = visible_device_index(local_rank, local_world_size, visible)
    torch.cuda.set_device(index)
    return DeviceBinding(torch.device("cuda", index))


def configure_cuda_math(tf32: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN (`precision.tf32`) and cuDNN's autotuner (input shapes are
    fixed for a run, so the first step's search pays off).

    torch refuses to read a flag through one API when it was set through the other, and its
    readers use both (torch 2.14): `set_float32_matmul_precision` sets cuBLAS's flag in both the
    legacy and the new API, so `get_float32_matmul_precision` (inductor's autotuning cache key)
    and `matmul.fp32_precision` (inductor's GEMMs) both read it; setting only
    `matmul.fp32_precision` made the former raise. cuDNN through `allow_tf32` (inductor's
    convolution templates read that)."""
    if not torch.cuda.is_available():
        return
    cpu_matmuls = torch.backends.mkldnn.matmul.fp32_precision
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.mkldnn.matmul.fp32_precision = cpu_matmuls  # it sets oneDNN's (CPU) too
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def rank_report(rank: int, binding: DeviceBinding) -> dict[str, Any]:
    """What a rank logs about itself at start: host, device, CPU affinity, free memory."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    report: dict[str, Any] = {
        "rank": rank,
        "host": socket.gethostname(),
        "device": str(binding.device),
        "cpus": cpus,
        "host_free_gib": round(host_memory_free() / GIB, 1),
    }
    if binding.is_cuda:
        props = torch.cuda.get_device_properties(binding.device)
        free, total = torch.cuda.mem_get_info(binding.device)
        report |= {
            "gpu": props.name,
            "gpu_uuid": str(props.uuid),
            "gpu_free_gib": round(free / GIB, 1),
            "gpu_total_gib": round(total / GIB, 1),
        }
    return report


def cpu_ranges(cpus: Sequence[int]) -> str:
    """`[0, 1, 2, 5]` -> `0-2,5`."""
    parts: list[str] = []
    for cpu in cpus:
        if parts and cpu == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def describe_rank(report: dict[str, Any]) -> str:
    device = report["device"]
    if "gpu" in report:
        device += (
            f" ({report['gpu']}, {report['gpu_free_gib']} of {report['gpu_total_gib']} GiB free)"
        )
    return (
        f"rank {report['rank']} on {report['host']}: {device}, {len(report['cpus'])} CPU(s) "
        f"{cpu_ranges(report['cpus'])}, host memory {report['host_free_gib']} GiB free"
    )


def check_distinct_devices(reports: Sequence[dict[str, Any]]) -> None:
    """Two ranks computing on the same GPU is a binding mistake (a launcher's CUDA_VISIBLE_DEVICES
    against SLURM's binding, say): stop before training at half speed or out of memory."""
    owner: dict[tuple[str, str], int] = {}
    for report in reports:
        if "gpu_uuid" not in report:
            continue
        key = (report["host"], report["gpu_uuid"])
        if key in owner:
            raise DeviceError(
                f"ranks {owner[key]} and {report['rank']} both compute on {report['gpu']} "
                f"{report['gpu_uuid']} of {report['host']}: check CUDA_VISIBLE_DEVICES and the "
                "launcher's GPU binding"
            )
        owner[key] = report["rank"]


def cpu_starvation(reports: Sequence[dict[str, Any]], loader_workers: int) -> str | None:
    """A warning when ranks with loader workers may run on one CPU (srun without
    --cpus-per-task on SLURM >= 22.05 binds each task to one)."""
    starved = [str(r["rank"]) for r in reports if len(r["cpus"]) == 1]
    if not starved or not loader_workers:
        return None
    return (
        f"WARNING: rank(s) {', '.join(starved[:8])}{' ...' if len(starved) > 8 else ''} may use "
        f"1 CPU for themselves and {loader_workers} loader workers: give each task more CPUs "
        "(srun --cpus-per-task; the SLURM supervisor passes the allocation's on)"
    )
