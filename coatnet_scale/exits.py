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
    75    stopped on a signal after a checkpoint (EX_TEMPFAIL)     requeued
    other a crash: a bug, a killed task, a lost node               requeued from the newest
                                                                   checkpoint

The codes 2-5 fail the same way when run again (a requeue resumes from the same checkpoint with
the same data order and seeds), so they end the job with the line that says what to change.
srun reports the highest exit code of its tasks (or 128 + a signal): a code here reaches the
supervisor when every task exits with it, which is what happens for setup, checkpoint and
non-finite errors (all ranks decide together); a data error on one rank ends the others by
SIGTERM, and the job is then requeued like a crash.
"""

from __future__ import annotations

EXIT_FINISHED = 0
EXIT_SETUP = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_STOPPED = 75

# the codes a requeue cannot fix, with what the job says about them
NOT_REQUEUED = {
    EXIT_SETUP: "could not start (a 'config error' or 'device error' line above says what to do)",
    EXIT_DATA: "stopped on bad data (the 'data error' line above names the samples)",
    EXIT_CHECKPOINT: "stopped on a checkpoint it cannot use (the 'checkpoint error' line above)",
    EXIT_NONFINITE: "stopped after too many non-finite steps (train.max_nonfinite_steps)",
}
