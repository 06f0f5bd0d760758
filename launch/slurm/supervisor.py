"""The batch side of a SLURM job: one `srun` of one training task per GPU, then the decision what
the job does when that step ends: finished, stopped on request (requeue), or failed (requeue).

`launch/slurm/pretrain.sbatch` holds resources only and runs
`python launch/slurm/supervisor.py [--model M] [--config F] [key=value ...]`, which

1. validates the config before anything starts (a typo fails in seconds, not after a queue wait);
2. finds the run folder (`coatnet_scale/run_folder.py`: `train.run_dir`, or by default
   `runs/<model>-<fingerprint>`, the same for every requeue and every new sbatch of the same
   command), so every restart finds its checkpoints (and resumes: `checkpoint.resume` is `auto`
   by default) and its wandb run id; a folder another live run owns (`coatnet_scale/lease.py`)
   fails the job at once, naming that run;
3. runs `srun --kill-on-bad-exit=1 python launch/pretrain.py ...`: ranks, local ranks and world size
   come from SLURM's variables, the master is the first host of the allocation and the port is
   derived from the job id (`distributed/env.py`); a task that dies takes the step down at once,
   and a hung collective ends after `distributed.timeout_minutes`;
4. compares the run's newest complete checkpoint before and after the attempt (`decide`):
   finished at `train.total_steps`; otherwise (the tasks got the time-limit/preemption warning
   signal, agreed to stop after the same step and committed a checkpoint; or a task failed) it
   requeues the job with `scontrol requeue` as long as attempts make progress, and stops after
   `distributed.max_requeues` attempts in a row without a new checkpoint, or at once when the
   tasks' exit code says a requeue cannot help (`coatnet_scale.exits`). Stopped tasks exit 0
   under srun, so `--kill-on-bad-exit` does not cut the others' shutdown short.

The warning signal comes from `#SBATCH --signal=USR1@SECONDS` without `B:`, so SLURM sends it to
the job steps (every training task), not to this process; this process ignores USR1 and SIGTERM
and waits for srun, which forwards them to the tasks.

`python launch/slurm/supervisor.py --hostfile` prints a DeepSpeed hostfile for the allocation
instead (the second way to launch, see launch/slurm/pretrain.sbatch).

This is a launcher, like `launch/pretrain.py`: the library (`coatnet_scale.distributed.slurm`)
keeps only what both ways of launching use, reading the allocation and the run's progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.distributed.env import slurm_tasks_per_node
from coatnet_scale.distributed.slurm import allocation_tasks, hostfile, newest_step
from coatnet_scale.exits import (
    EXIT_FINISHED,
    EXIT_FOLDER_BUSY,
    EXIT_REASON_FILE,
    EXIT_SETUP,
    EXIT_STOPPED,
    NOT_REQUEUED,
    recorded_exit,
)
from coatnet_scale.files import atomic_write_text
from coatnet_scale.lease import busy_message, live_owner
from coatnet_scale.preflight import setup_problems
from coatnet_scale.run_folder import run_folder
from launch.slurm import warning

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain.py"


def srun_command(python: str, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
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
    ]


@dataclass(frozen=True)
class Decision:
    """What the job does after the training step: done, requeue itself, or end unfinished;
    `stalled`: attempts in a row that ended without a new checkpoint."""

    action: Literal["finished", "requeue", "stop"]
    message: str
    stalled: int = 0

    @property
    def requeue(self) -> bool:
        return self.action == "requeue"


def decide(
    returncode: int, before: int, after: int, total_steps: int, stalled: int, max_stalled: int
) -> Decision:
    """What the job does after the training step ended with `returncode`; the run's newest valid
    checkpoint was at step `before` when the attempt began and is at `after` now, and `stalled`
    attempts before this one in a row made no progress.

    Progress, not restarts, decides: a run that checkpoints new steps in every attempt is
    requeued however many time limits and preemptions it takes; one that ends `max_stalled`
    attempts in a row without a new checkpoint (a failure that recurs, a warning signal that
    leaves no time to train) stops, and so do the exit codes a requeue cannot fix."""
    if after >= total_steps:
        return Decision("finished", f"training finished (checkpoint at step {after})")
    if returncode in NOT_REQUEUED:
        return Decision(
            "stop",
            f"the training step {NOT_REQUEUED[returncode]}; exit code {returncode}, newest "
            f"checkpoint: step {after}; not requeueing: the same job would fail the same way",
        )
    if returncode in (0, EXIT_STOPPED):
        why = f"the tasks stopped after a checkpoint at step {after} (a stop signal)"
    else:
        why = (
            f"the training step failed (exit code {returncode}; srun's 'task N' error lines "
            f"above name the failed rank N and its node); newest checkpoint: step {after}"
        )
    stalled = 0 if after > before else stalled + 1
    if stalled >= max_stalled:
        return Decision(
            "stop",
            f"{why}; not requeueing: {stalled} attempt(s) in a row ended without a new "
            f"checkpoint (distributed.max_requeues={max_stalled}); the step-{before} "
            "checkpoint is where a new job resumes once the cause is fixed",
            stalled,
        )
    progress = f"step {before} -> {after}" if after > before else f"no new checkpoint ({stalled})"
    return Decision("requeue", f"{why}; requeueing ({progress})", stalled)


STALLED_FILE = "stalled_attempts.json"


def read_stalled(run_dir: Path, job: str) -> int:
    """Attempts in a row without a new checkpoint, as the previous attempt of this job left it
    (a new job, after the cause was fixed, starts from 0)."""
    try:
        record = json.loads((run_dir / STALLED_FILE).read_text())
        return int(record["stalled"]) if record.get("job") == job else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def log(message: str) -> None:
    print(f"[coatnet-scale slurm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    if argv[:1] == ["--hostfile"]:
        print(hostfile(env["SLURM_JOB_NODELIST"], slurm_tasks_per_node(env, 1)), end="")
        return 0
    try:
        cfg, _ = parse_config_args(argv, config_parser("SLURM job"))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if "SLURM_JOB_ID" not in env:
        log("not inside a SLURM job: submit launch/slurm/pretrain.sbatch with sbatch")
        return EXIT_SETUP
    problems = setup_problems(cfg, allocation_tasks(env), on_rank_host=False)
    if problems:  # a setup error without srun: nothing to requeue, the job fails at once
        for problem in problems:
            log(f"config error: {problem}")
        return EXIT_SETUP
    # SLURM's warning and preemption signals are for the tasks; this process waits for srun.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    run_dir = run_folder(cfg)
    owner = live_owner(run_dir)
    if owner is not None:  # before srun: seconds, not a multi-node start
        log(f"run folder in use: {busy_message(run_dir, owner, time.time())}")
        return EXIT_FOLDER_BUSY
    times = warning.job_times(env["SLURM_JOB_ID"])
    for problem in warning.check(run_dir, env["SLURM_JOB_ID"], times):
        log(f"WARNING: {problem}")
    command = srun_command(sys.executable, argv, env)
    log(
        f"job {env['SLURM_JOB_ID']} ({env.get('SLURM_JOB_NAME', '')}), restart {restarts}, "
        f"{env.get('SLURM_JOB_NUM_NODES', '?')} node(s): {' '.join(command)}"
    )
    (run_dir / EXIT_REASON_FILE).unlink(missing_ok=True)  # only this attempt's counts
    before, attempt_start = newest_step(run_dir), time.time()
    returncode = subprocess.run(command).returncode
    if returncode == EXIT_FOLDER_BUSY:  # another run owns the folder: leave it alone
        log(f"the training step {NOT_REQUEUED[returncode]}; not requeueing")
        return returncode
    warning.record_measured_lead(run_dir, times, attempt_start)
    recorded = recorded_exit(run_dir)
    if recorded is not None and returncode not in (0, EXIT_STOPPED):
        # a rank failed first and srun killed the rest: its own code, not srun's "killed"
        log(f"srun exit code {returncode}; the first failure: {recorded[1]}")
        returncode = recorded[0]
    decision = decide(
        returncode,
        before,
        newest_step(run_dir),
        cfg.train.total_steps,
        read_stalled(run_dir, env["SLURM_JOB_ID"]),
        cfg.distributed.max_requeues,
    )
    log(decision.message)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"job": env["SLURM_JOB_ID"], "stalled": decision.stalled}
    atomic_write_text(run_dir / STALLED_FILE, json.dumps(record))
    if decision.requeue:
        requeue = subprocess.run(
            ["scontrol", "requeue", env["SLURM_JOB_ID"]], capture_output=True, text=True
        )
        if requeue.returncode != 0:  # e.g. SLURM is already requeueing it (preemption)
            log(f"scontrol requeue: {requeue.stderr.strip() or requeue.returncode}")
    return EXIT_FINISHED if decision.action == "finished" else returncode or 1


if __name__ == "__main__":
    raise SystemExit(main())
