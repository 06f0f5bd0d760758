"""The batch side of a SLURM job: one `srun` of one training task per GPU, then the decision what
the job does when that step ends: finished, stopped on request (requeue), or failed (requeue).

`launch/slurm/pretrain.sbatch` holds resources only and runs
`python -m coatnet_scale.distributed.slurm [--model M] [--config F] [key=value ...]`, which

1. validates the config before anything starts (a typo fails in seconds, not after a queue wait);
2. chooses the run folder: `train.run_dir` if set, else `runs/$SLURM_JOB_NAME`, the same on every
   requeue of the job, so every restart finds its checkpoints (and resumes: `checkpoint.resume`
   is `auto` by default) and its wandb run id;
3. runs `srun --kill-on-bad-exit=1 python launch/pretrain.py ...`: ranks, local ranks and world size
   come from SLURM's variables, the master is the first host of the allocation and the port is
   derived from the job id (`distributed/env.py`); a task that dies takes the step down at once,
   and a hung collective ends after `distributed.timeout_minutes`;
4. reads the run's progress from its newest complete checkpoint: short of `train.total_steps`
   (the tasks got the time-limit/preemption warning signal, agreed to stop after the same step and
   committed a checkpoint; or a task failed), it requeues the job with `scontrol requeue` while
   `SLURM_RESTART_COUNT` < `distributed.max_requeues`. Stopped tasks exit 0 under srun, so
   `--kill-on-bad-exit` does not cut the others' shutdown short.

The warning signal comes from `#SBATCH --signal=USR1@SECONDS` without `B:`, so SLURM sends it to
the job steps (every training task), not to this process; this process ignores USR1 and SIGTERM
and waits for srun, which forwards them to the tasks.

`python -m coatnet_scale.distributed.slurm --hostfile` prints a DeepSpeed hostfile for the
allocation instead (the second way to launch, see launch/slurm/pretrain.sbatch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coatnet_scale.checkpoint.layout import (
    checkpoint_root,
    checkpoint_step,
    list_checkpoints,
    verify,
)
from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.config import Config, TrainConfig
from coatnet_scale.distributed.env import expand_nodelist
from coatnet_scale.exits import EXIT_STOPPED, NOT_REQUEUED
from coatnet_scale.preflight import setup_problems

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"


def allocation_tasks(env: Mapping[str, str]) -> int:
    """The tasks srun will start (the world size): SLURM_NTASKS, else nodes x tasks per node."""
    if "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return int(env.get("SLURM_JOB_NUM_NODES", "1")) * per_node


def run_dir_override(cfg: Config, env: Mapping[str, str]) -> list[str]:
    """`train.run_dir=runs/<job name>` when the config leaves the run folder at its default."""
    default = TrainConfig.__dataclass_fields__["run_dir"].default
    if cfg.train.run_dir != default or "SLURM_JOB_NAME" not in env:
        return []
    return [f"train.run_dir=runs/{env['SLURM_JOB_NAME']}"]


def srun_command(
    python: str, argv: Sequence[str], extra: Sequence[str], env: Mapping[str, str]
) -> list[str]:
    """One training task per allocated task slot (the sbatch script asks one per GPU).

    `--cpus-per-task` is passed on explicitly: since SLURM 22.05 srun no longer inherits it from
    the allocation, and a task would get one CPU for its loader workers, pinned-memory copies and
    NCCL threads (https://slurm.schedmd.com/srun.html#OPT_cpus-per-task).
    """
    cpus = env.get("SLURM_CPUS_PER_TASK")
    return [
        "srun",
        "--kill-on-bad-exit=1",  # a task that dies ends the step instead of leaving others hung
        "--wait=120",  # a task that exits early (cleanly) does not wait forever for the rest
        *([f"--cpus-per-task={cpus}"] if cpus else []),
        python,
        "-u",
        str(PRETRAIN),
        *argv,
        *extra,
    ]


@dataclass(frozen=True)
class Decision:
    requeue: bool
    message: str


def decide(
    returncode: int, step: int, total_steps: int, restarts: int, max_requeues: int
) -> Decision:
    """What the job does after the training step ended with `returncode`, the run's newest valid
    checkpoint being at `step`. The checkpoints are the ground truth of progress: exit codes only
    tell a stop (0 or `EXIT_STOPPED`) from a failure for the message."""
    if step >= total_steps:
        return Decision(False, f"training finished (checkpoint at step {step})")
    if returncode in (0, EXIT_STOPPED):
        why = f"the tasks stopped after a checkpoint at step {step} (a stop signal)"
    elif returncode in NOT_REQUEUED:
        return Decision(
            False,
            f"the training step {NOT_REQUEUED[returncode]}; exit code {returncode}, newest "
            f"checkpoint: step {step}; not requeueing: the same job would fail the same way",
        )
    else:
        why = (
            f"the training step failed (exit code {returncode}; srun's 'task N' error lines "
            f"above name the failed rank N and its node); newest checkpoint: step {step}"
        )
    if restarts >= max_requeues:
        return Decision(
            False,
            f"{why}; not requeueing: {restarts} restart(s) reached "
            f"distributed.max_requeues={max_requeues}",
        )
    return Decision(True, f"{why}; requeueing (restart {restarts + 1} of at most {max_requeues})")


def newest_step(run_dir: Path) -> int:
    """Step of the run's newest complete checkpoint (sizes checked; 0 when there is none)."""
    for ckpt in reversed(list_checkpoints(checkpoint_root(run_dir))):
        if not verify(ckpt, checksums=False):
            return checkpoint_step(ckpt) or 0
    return 0


def hostfile(nodelist: str, slots: int) -> str:
    """A DeepSpeed hostfile (`host slots=N` per node) for the allocation's nodes."""
    return "".join(f"{host} slots={slots}\n" for host in expand_nodelist(nodelist))


def log(message: str) -> None:
    print(f"[coatnet-scale slurm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    if argv[:1] == ["--hostfile"]:
        slots = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        print(hostfile(env["SLURM_JOB_NODELIST"], slots), end="")
        return 0
    try:
        cfg, _ = parse_config_args(argv, config_parser("SLURM job"))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if "SLURM_JOB_ID" not in env:
        log("not inside a SLURM job: submit launch/slurm/pretrain.sbatch with sbatch")
        return 2
    problems = setup_problems(cfg, allocation_tasks(env), on_rank_host=False)
    if problems:  # a setup error without srun: nothing to requeue, the job fails at once
        for problem in problems:
            log(f"config error: {problem}")
        return 2
    # SLURM's warning and preemption signals are for the tasks; this process waits for srun.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    extra = run_dir_override(cfg, env)
    run_dir = Path(extra[0].split("=", 1)[1] if extra else cfg.train.run_dir)
    command = srun_command(sys.executable, argv, extra, env)
    log(
        f"job {env['SLURM_JOB_ID']} ({env.get('SLURM_JOB_NAME', '')}), restart {restarts}, "
        f"{env.get('SLURM_JOB_NUM_NODES', '?')} node(s): {' '.join(command)}"
    )
    returncode = subprocess.run(command).returncode
    decision = decide(
        returncode,
        newest_step(run_dir),
        cfg.train.total_steps,
        restarts,
        cfg.distributed.max_requeues,
    )
    log(decision.message)
    if decision.requeue:
        requeue = subprocess.run(
            ["scontrol", "requeue", env["SLURM_JOB_ID"]], capture_output=True, text=True
        )
        if requeue.returncode != 0:  # e.g. SLURM is already requeueing it (preemption)
            log(f"scontrol requeue: {requeue.stderr.strip() or requeue.returncode}")
    return 0 if decision.message.startswith("training finished") else returncode or 1


if __name__ == "__main__":
    raise SystemExit(main())
