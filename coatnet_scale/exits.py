"""The exit codes of a training process, in one table: what `launch/pretrain.py` exits with, what
the SLURM job (`launch/slurm/supervisor.py`) does on each, and what a user's scripts can rely on.

    code  meaning                                                  the SLURM job
    0     finished; or, under srun, stopped after a checkpoint     finished, or requeued when
          (srun would kill the ranks still finishing on a           the checkpoints show steps
          non-zero code: progress is read from the checkpoints)     remaining
    2     setup error: config, data paths, devices                 never requeued
    3     data error: bad samples above data.max_bad_fraction      never requeued
    4     checkpoint error: nothing loadable, a failed conversion  never requeued
    5     non-finite steps: train.max_nonfinite_steps in a row     never requeued
    6     the run folder belongs to another live run (nothing is   never requeued; nothing
          written there)                                           written into the folder
    7     a rank stalled: its heartbeat stopped for                requeued (its node counts
          distributed.stall_timeout_s; the watchdog named it and   toward the bad-node rule)
          left every rank's stacks in RUN/stall/
    8     loss spikes recurred at the same place after a rollback  never requeued
          (train.spike_*: the data or the recipe needs a look)
    75    stopped on a signal after a checkpoint (EX_TEMPFAIL)     requeued
    other a crash: a bug, a killed task, a lost node               requeued from the newest
                                                                   checkpoint

The codes 2-6 fail the same way when run again (a requeue resumes from the same checkpoint with
the same data order and seeds), so they end the job with the line that says what to change.
srun reports the highest exit code of its tasks, or 128 + the signal of one it killed: when one
rank fails first, srun kills the others and its code says "killed". So a rank that exits with
3-5 or 8 (the watchdog: 7, naming the stalled rank) also writes the code to
RUN/exit_reason.json (`record_exit`), and the supervisor trusts that file, cleared before each
attempt, over srun's code. Setup errors (2) come before the run folder
exists and from every rank alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from coatnet_scale.files import atomic_write_text

EXIT_FINISHED = 0
EXIT_SETUP = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_FOLDER_BUSY = 6
EXIT_STALLED = 7
EXIT_SPIKES = 8
EXIT_STOPPED = 75

# the codes a requeue cannot fix, with what the job says about them
NOT_REQUEUED = {
    EXIT_SETUP: "could not start (a 'config error' or 'device error' line above says what to do)",
    EXIT_DATA: "stopped on bad data (the 'data error' line above names the samples)",
    EXIT_CHECKPOINT: "stopped on a checkpoint it cannot use (the 'checkpoint error' line above)",
    EXIT_NONFINITE: "stopped after too many non-finite steps (train.max_nonfinite_steps)",
    EXIT_FOLDER_BUSY: "found its run folder owned by another run (the 'run folder in use' line)",
    EXIT_SPIKES: "stopped on loss spikes that came back after a rollback (the 'loss spike' line)",
}

EXIT_REASON_FILE = "exit_reason.json"


def record_exit(
    run_dir: Path, code: int, line: str, rank: int | None = None, host: str | None = None
) -> None:
    """Leave the exit code and its line in the run folder for the SLURM supervisor (only in a
    folder that exists: a run that never started writes nothing); `rank` and `host`, when given,
    name the rank the failure is about (a stalled rank: not the one that writes)."""
    if run_dir.is_dir():
        record: dict[str, object] = {"code": code, "line": line}
        if rank is not None:
            record |= {"rank": rank, "host": host}
        atomic_write_text(run_dir / EXIT_REASON_FILE, json.dumps(record))


def recorded_exit(run_dir: Path) -> tuple[int, str] | None:
    """The code and line a rank recorded in this attempt, if any."""
    try:
        data = json.loads((run_dir / EXIT_REASON_FILE).read_text())
        return int(data["code"]), str(data["line"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
