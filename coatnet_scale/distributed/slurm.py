"""What both ways of launching on SLURM use (the supervisor in launch/slurm/supervisor.py, and
DeepSpeed's launcher through a hostfile): the allocation read from SLURM's variables, and the
run's progress read from its checkpoints. Rank, world and master for each task are
`distributed/env.py`'s."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from coatnet_scale.checkpoint.layout import (
    checkpoint_root,
    checkpoint_step,
    list_checkpoints,
    verify,
)
from coatnet_scale.distributed.env import expand_nodelist, slurm_tasks_per_node


def allocation_tasks(env: Mapping[str, str]) -> int:
    """The tasks srun will start (the world size): SLURM_NTASKS, else nodes x tasks per node."""
    if "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return int(env.get("SLURM_JOB_NUM_NODES", "1")) * slurm_tasks_per_node(env, 1)


def newest_step(run_dir: Path) -> int:
    """Step of the run's newest complete checkpoint (sizes checked; 0 when there is none)."""
    for ckpt in reversed(list_checkpoints(checkpoint_root(run_dir))):
        if not verify(ckpt, checksums=False):
            return checkpoint_step(ckpt) or 0
    return 0


def hostfile(nodelist: str, slots: int) -> str:
    """A DeepSpeed hostfile (`host slots=N` per node) for the allocation's nodes."""
    return "".join(f"{host} slots={slots}\n" for host in expand_nodelist(nodelist))


if __name__ == "__main__":
    # Jobs queued before the supervisor moved to launch/slurm/supervisor.py still run
    # `python -m coatnet_scale.distributed.slurm ...` (SLURM keeps the script as submitted).
    import os
    import sys

    script = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "supervisor.py"
    print(f"coatnet_scale.distributed.slurm is now {script}: running that", file=sys.stderr)
    os.execv(sys.executable, [sys.executable, str(script), *sys.argv[1:]])
