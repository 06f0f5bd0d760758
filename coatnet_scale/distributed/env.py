"""The one place that reads rank and world size from the environment.

Launchers and what they set:
- `deepspeed` (and `torchrun`, `accelerate launch`): RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
  MASTER_PORT, and the ranks on this node as LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE
  (deepspeed). The deepspeed launcher also passes `--local_rank=N` on the command line, which the
  CLI accepts and ignores.
- `srun` (one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NTASKS_PER_NODE /
  SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST, SLURM_JOB_ID. DeepSpeed's `init_distributed` does not
  read these (it falls back to MPI discovery, `deepspeed.comm.mpi_discovery`), so they are
  mapped here, as open_clip's and timm's `world_info_from_env` do. The master is the first host
  of the allocation and the port is derived from the job id, so every task computes the same
  address alone.
- nothing: a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from coatnet_scale.text import split_outside


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torch" (deepspeed/torchrun/accelerate), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(1, self.local_world_size)

    def export(self, device_index: int | None = None) -> dict[str, str]:
        """The torch-style variables `torch.distributed`'s env:// initialisation reads.

        `device_index`: the CUDA device this rank was bound to (`distributed/device.py`), which
        DeepSpeed reads from LOCAL_RANK; it differs from the local rank only when the scheduler
        shows each task its own GPU alone.
        """
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank if device_index is None else device_index),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


SIMPLE_HOSTS = re.compile(r"^([^\[\],]+)(?:\[([0-9,\-]+)\])?$")


def _expand_simple(item: str) -> list[str] | None:
    """`n[01-03,7]` -> n01 n02 n03 n7; `gpu5` -> gpu5; None for any other form."""
    match = SIMPLE_HOSTS.match(item)
    if match is None:
        return None
    prefix, ranges = match.groups()
    if ranges is None:
        return [prefix]
    hosts = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        width = len(first)  # SLURM keeps the zero padding of the range's first number
        hosts += [f"{prefix}{i:0{width}d}" for i in range(int(first), int(last or first) + 1)]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a SLURM node list, in order.

    The simple forms (`n[01-04,07],gpu5`: one bracket group at the end of each name) are read
    here, without a process; anything else (`rack[1-2]-n[01-04]`, nested groups) goes to
    `scontrol show hostnames`, which knows every form SLURM writes.
    """
    hosts: list[str] = []
    for item in split_outside(nodelist.strip(), "[", "]"):
        expanded = _expand_simple(item)
        if expanded is None:
            return scontrol_hostnames(nodelist)
        hosts += expanded
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str]:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"cannot expand the SLURM node list {nodelist!r}: `scontrol show hostnames` failed "
            f"({err}); set MASTER_ADDR to the first host"
        ) from None
    return out.stdout.split()


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list (`n[1-3,7],gpu5` -> `n1`)."""
    return expand_nodelist(nodelist)[0]


def slurm_port(job_id: str) -> int:
    """A port in 15000..24999 from the job id: stable across the tasks of a job, different for
    jobs sharing a node."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits[-4:]) % 10000


def slurm_tasks_per_node(env: Mapping[str, str], world_size: int) -> int:
    """The allocation's tasks per node ("8(x2)" reads as 8); `world_size` when SLURM says none."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(key)
        if value:
            return int(re.match(r"\d+", value).group())
    return world_size


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (os.environ by default)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            # torchrun/accelerate say LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE
            local_world_size=int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torch",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world,
            local_world_size=slurm_tasks_per_node(env, world),
            master_addr=env.get("MASTER_ADDR")
            or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0"))),
            launcher="slurm",
        )
    # One process, no launcher: any free port (a fixed one collides with a launcher's job or
    # another single-process run on the same machine: EADDRINUSE)
    port = int(env.get("MASTER_PORT") or free_port())
    return DistEnv(0, 0, 1, 1, "127.0.0.1", port, "single")


def free_port() -> int:
    """A TCP port the OS has free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
