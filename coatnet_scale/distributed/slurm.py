"""What both ways of launching on SLURM use (the supervisor in launch/slurm/supervisor.py, and
DeepSpeed's launcher through a hostfile): the allocation read from SLURM's variables, and the
run's progress read from its checkpoints. Rank, world and master for each task are
`distributed/env.py`'s."""

from __future__ import annotations

import re
import subprocess
import time
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


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict ({} where scontrol is missing or fails)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out))


def slurm_time(text: str) -> float | None:
    """A SLURM timestamp (`2026-11-30T10:20:05`, local time) in epoch seconds."""
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def queue_wait_s(env: Mapping[str, str]) -> float | None:
    """How long this attempt of the SLURM job waited in the queue: its StartTime minus its
    SubmitTime (SLURM resets SubmitTime when it requeues a job); None outside SLURM."""
    if "SLURM_JOB_ID" not in env:
        return None
    fields = job_fields(env["SLURM_JOB_ID"])
    start = slurm_time(fields.get("StartTime", ""))
    submit = slurm_time(fields.get("SubmitTime", ""))
    return max(0.0, start - submit) if start is not None and submit is not None else None


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
