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
   under srun, so `--kill-on-bad-exit` does not cut the others' shutdown short;
5. blames a failed attempt on one node: the node of the first task srun reports as failed (its
   `srun: error: NODE: task N: ...` line; srun's stderr passes through this process to the job
   log), or the node of the rank the watchdog found stalled (RUN/exit_reason.json). Each
   attempt's node goes into RUN/node_failures.json; when the same node failed the previous
   attempt of this job too, the requeued job excludes it (`ExcNodeList`, added to the job's
   own), which comes before the no-progress stop. A node is not excluded when the job's
   partitions would keep fewer nodes than the job needs (it could never start again).

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
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.distributed.env import expand_nodelist, slurm_tasks_per_node
from coatnet_scale.distributed.slurm import allocation_tasks, hostfile, job_fields, newest_step
from coatnet_scale.exits import (
    EXIT_FINISHED,
    EXIT_FOLDER_BUSY,
    EXIT_REASON_FILE,
    EXIT_SETUP,
    EXIT_STALLED,
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
class BadNode:
    """A node to exclude from the requeued job: `why` names the two attempts and what failed on
    it; `exclude` is the job's whole new ExcNodeList (its own exclusions kept)."""

    node: str
    why: str
    exclude: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """What the job does after the training step: done, requeue itself, or end unfinished;
    `stalled`: attempts in a row that ended without a new checkpoint; `exclude`: the ExcNodeList
    the requeued job gets (empty: unchanged)."""

    action: Literal["finished", "requeue", "stop"]
    message: str
    stalled: int = 0
    exclude: tuple[str, ...] = ()

    @property
    def requeue(self) -> bool:
        return self.action == "requeue"


def decide(
    returncode: int,
    before: int,
    after: int,
    total_steps: int,
    stalled: int,
    max_stalled: int,
    bad_node: BadNode | None = None,
) -> Decision:
    """What the job does after the training step ended with `returncode`; the run's newest valid
    checkpoint was at step `before` when the attempt began and is at `after` now, and `stalled`
    attempts before this one in a row made no progress; `bad_node`: a node that failed this
    attempt and the one before, which the job can do without.

    Progress, not restarts, decides: a run that checkpoints new steps in every attempt is
    requeued however many time limits and preemptions it takes; one that ends `max_stalled`
    attempts in a row without a new checkpoint (a failure that recurs, a warning signal that
    leaves no time to train) stops, and so do the exit codes a requeue cannot fix. A bad node
    comes before the no-progress stop: attempts that failed on the same node say nothing yet
    about attempts without it, so the job is requeued without it once more (the count goes on:
    a failure that follows the job to other nodes still stops it)."""
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
        bad_node = None  # nothing failed in this attempt
    else:
        why = (
            f"the training step failed (exit code {returncode}; srun's 'task N' error lines "
            f"above name the failed rank N and its node); newest checkpoint: step {after}"
        )
    stalled = 0 if after > before else stalled + 1
    progress = f"step {before} -> {after}" if after > before else f"no new checkpoint ({stalled})"
    if bad_node is not None:
        first = (
            f"; before the no-progress stop ({stalled} attempt(s) in a row without a new "
            f"checkpoint, distributed.max_requeues={max_stalled})"
            if stalled >= max_stalled
            else ""
        )
        return Decision(
            "requeue",
            f"{why}; node {bad_node.node} is excluded from the requeued job (ExcNodeList="
            f"{','.join(bad_node.exclude)}): {bad_node.why}{first}; requeueing ({progress})",
            stalled,
            bad_node.exclude,
        )
    if stalled >= max_stalled:
        return Decision(
            "stop",
            f"{why}; not requeueing: {stalled} attempt(s) in a row ended without a new "
            f"checkpoint (distributed.max_requeues={max_stalled}); the step-{before} "
            "checkpoint is where a new job resumes once the cause is fixed",
            stalled,
        )
    return Decision("requeue", f"{why}; requeueing ({progress})", stalled)


# srun's line for tasks that failed (SLURM's launch plugin, _task_finish): "srun: error: NODE:
# task 1: Exited with exit code 1", "...: tasks 0-3: Killed", "...: task 2: Out Of Memory".
TASK_FAILED = re.compile(r"srun: error: (?P<hosts>[^\s:]+): (?P<what>tasks? [\d,-]+: .+)")
EXITED = re.compile(r": Exited with exit code (\d+)$")


@dataclass(frozen=True)
class NodeFailure:
    """The node an attempt's training step failed on, and what failed there."""

    node: str
    what: str


def first_task_failure(lines: Iterable[str]) -> NodeFailure | None:
    """The node of the first task srun reports as failed, from srun's error lines in order.

    Only the first counts: with --kill-on-bad-exit, srun kills every other task once one has
    failed and may report those too ("Terminated", "Killed", or an error of their own when a
    collective broke under them first); none of that is about their nodes. Blamed on no node:
    a first line that names several nodes, and a failure that tasks on other nodes report with
    the same exit code of their own (the same error everywhere, a bug or bad input, reaches srun
    in whichever order: seen on the local cluster, where the same exception ended both ranks and
    srun reported n1 first in one attempt and n2 in the next)."""
    failures = [m for m in map(TASK_FAILED.fullmatch, (x.strip() for x in lines)) if m]
    if not failures:
        return None
    first, hosts = failures[0], expand_nodelist(failures[0]["hosts"])
    code = _exit_code(first["what"])
    everywhere = code is not None and any(
        m["hosts"] != first["hosts"] and _exit_code(m["what"]) == code for m in failures[1:]
    )
    return NodeFailure(hosts[0], first["what"]) if len(hosts) == 1 and not everywhere else None


def _exit_code(what: str) -> int | None:
    """The code of srun's "Exited with exit code N" (a task that ended by itself), else None."""
    match = EXITED.search(what)
    return int(match[1]) if match else None


def tasks_per_node(value: str) -> list[int]:
    """SLURM's SLURM_TASKS_PER_NODE ("2(x3),1") as a count per node ([2, 2, 2, 1])."""
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            return []
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def stall_failure(record: Mapping[str, object], env: Mapping[str, str]) -> NodeFailure | None:
    """The node of the rank the watchdog found stalled (its RUN/exit_reason.json record).

    The record names the rank's host as the rank saw it (its hostname: on some clusters a fully
    qualified name, on a test cluster the same for every node); when that is no node of the
    allocation, the rank's node follows from srun's default block layout (ranks fill the first
    node, then the next)."""
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", ""))
    host, rank = str(record.get("host") or ""), record.get("rank")
    what = f"rank {rank} stalled"
    for name in (host, host.split(".")[0]):
        if name and name in nodes:
            return NodeFailure(name, what)
    block = env.get("SLURM_DISTRIBUTION", "block").startswith("block")
    counts = tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""))
    if not isinstance(rank, int) or not block or len(counts) != len(nodes):
        return None
    for node, count in zip(nodes, counts, strict=True):
        if rank < count:
            return NodeFailure(node, what)
        rank -= count
    return None


def attempt_failure(
    run_dir: Path, srun_errors: Sequence[str], env: Mapping[str, str]
) -> NodeFailure | None:
    """The node a failed attempt is blamed on: the stalled rank's when the watchdog recorded a
    stall (srun's first failed task is then only the rank that reported it), else the first
    task srun reports as failed."""
    try:
        record = json.loads((run_dir / EXIT_REASON_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("code") == EXIT_STALLED:
        return stall_failure(record, env)
    return first_task_failure(srun_errors)


NODE_FAILURES_FILE = "node_failures.json"
KEEP_ATTEMPTS = 20


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job (its SLURM_RESTART_COUNT) and the node it failed on, if any."""

    job: str
    restart: int
    node: str | None = None
    what: str = ""


def read_attempts(run_dir: Path) -> list[Attempt]:
    """The run's recent attempts, oldest first, as their supervisors left them."""
    try:
        return [Attempt(**a) for a in json.loads((run_dir / NODE_FAILURES_FILE).read_text())]
    except (OSError, ValueError, TypeError):
        return []


def write_attempts(run_dir: Path, attempts: Sequence[Attempt]) -> None:
    records = [asdict(a) for a in attempts[-KEEP_ATTEMPTS:]]
    atomic_write_text(run_dir / NODE_FAILURES_FILE, json.dumps(records, indent=1))


def repeated_failure(previous: Attempt | None, current: Attempt) -> str | None:
    """The node on which this attempt failed and the one right before it as well.

    "Right before": the same job, the previous restart (an attempt whose supervisor was killed
    before it recorded anything breaks the chain). A new job starts afresh, like the no-progress
    count: it is how a user says the cause was dealt with, and its exclusions are its own."""
    if previous is None or current.node is None or previous.node != current.node:
        return None
    if previous.job != current.job or previous.restart != current.restart - 1:
        return None
    return current.node


def exclusion(
    node: str, excluded: Sequence[str], partition_nodes: Collection[str], needed: int
) -> tuple[tuple[str, ...], str]:
    """The job's new ExcNodeList with `node` added to its own exclusions `excluded`, or () and
    why not: SLURM accepts an exclusion that leaves the job's partitions fewer nodes than it
    needs, and the job then never starts; pending forever helps no one, so the node stays."""
    if not partition_nodes:
        return (), "the nodes of the job's partitions could not be listed (sinfo)"
    new = (*dict.fromkeys([*excluded, node]),)
    left = set(partition_nodes) - set(new)
    if len(left) < needed:
        return (), (
            f"the job needs {needed} node(s) and excluding it would leave {len(left)} of its "
            f"partitions' {len(set(partition_nodes))}, so the job could never start again"
        )
    return new, ""


def plan_exclusion(
    env: Mapping[str, str], node: str, attempts: Sequence[Attempt]
) -> tuple[BadNode | None, str]:
    """The exclusion of `node`, which failed the last two `attempts`, for the requeued job (or
    None and why not), from what SLURM says about the job and its partitions."""
    fields = job_fields(env["SLURM_JOB_ID"])
    own = fields.get("ExcNodeList", "(null)")
    excluded = [] if own in ("", "(null)") else expand_nodelist(own)
    partitions = fields.get("Partition") or env.get("SLURM_JOB_PARTITION", "")
    sinfo = ["sinfo", "-h", "-N", "-o", "%N"]  # named partitions show even when hidden
    sinfo += [f"--partition={partitions}"] if partitions else []
    try:
        listing = subprocess.run(sinfo, capture_output=True, text=True, timeout=60)
        nodes = set(listing.stdout.split()) if listing.returncode == 0 else set()
    except (OSError, subprocess.SubprocessError):
        nodes = set()
    needed = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    new, why_not = exclusion(node, excluded, nodes, needed)
    if not new:
        return None, why_not
    what = "; ".join(f"restart {a.restart}: {a.what}" for a in attempts[-2:])
    return BadNode(node, f"it failed two attempts in a row ({what})", new), ""


def _pass_on(fd: int, errors: list[str]) -> None:
    """Copy srun's stderr (its own messages and the tasks' stderr) to ours as it comes, and keep
    srun's error lines (the first few dozen: the first failure is all that counts)."""
    out = getattr(sys.stderr, "buffer", None)
    pending, skipping = b"", False
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 16):
            if out is not None:
                sys.stderr.flush()
                out.write(chunk)
                out.flush()
            else:  # a text-only stream (tests' capture)
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not skipping and line.startswith(b"srun: error: ") and len(errors) < 64:
                    errors.append(line.decode(errors="replace"))
                skipping = False
            if len(pending) > 4096:  # a long line (a task's output): not one of srun's
                pending, skipping = b"", True


def run_step(command: Sequence[str]) -> tuple[int, list[str]]:
    """Run the training step; its exit code and srun's error lines (stderr passes on to the
    job log as before: a pipe through this process instead of the log file itself)."""
    read_fd, write_fd = os.pipe()
    errors: list[str] = []
    reader = threading.Thread(target=_pass_on, args=(read_fd, errors), daemon=True)
    reader.start()
    try:
        returncode = subprocess.run(command, stderr=write_fd).returncode
    finally:
        os.close(write_fd)
        reader.join(timeout=30)  # srun leaves nothing behind that holds the pipe; just in case
    return returncode, list(errors)


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
    returncode, srun_errors = run_step(command)
    if returncode == EXIT_FOLDER_BUSY:  # another run owns the folder: leave it alone
        log(f"the training step {NOT_REQUEUED[returncode]}; not requeueing")
        return returncode
    warning.record_measured_lead(run_dir, times, attempt_start)
    recorded = recorded_exit(run_dir)
    if recorded is not None and returncode not in (0, EXIT_STOPPED):
        # a rank failed first and srun killed the rest: its own code, not srun's "killed"
        log(f"srun exit code {returncode}; the first failure: {recorded[1]}")
        returncode = recorded[0]
    after, job_id = newest_step(run_dir), env["SLURM_JOB_ID"]
    attempt = Attempt(job_id, restarts)
    if returncode not in (0, EXIT_STOPPED):
        failure = attempt_failure(run_dir, srun_errors, env)
        if failure is not None:
            attempt = Attempt(job_id, restarts, failure.node, failure.what)
    previous = read_attempts(run_dir)
    attempts, bad_node = [*previous, attempt], None
    node = repeated_failure(previous[-1] if previous else None, attempt)
    if node is not None and after < cfg.train.total_steps and returncode not in NOT_REQUEUED:
        bad_node, why_not = plan_exclusion(env, node, attempts)
        if bad_node is None:
            log(f"node {node} failed two attempts in a row but is not excluded: {why_not}")
    decision = decide(
        returncode,
        before,
        after,
        cfg.train.total_steps,
        read_stalled(run_dir, job_id),
        cfg.distributed.max_requeues,
        bad_node,
    )
    log(decision.message)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        run_dir / STALLED_FILE, json.dumps({"job": job_id, "stalled": decision.stalled})
    )
    write_attempts(run_dir, attempts)
    if decision.requeue:
        requeue(job_id, decision.exclude)
    return EXIT_FINISHED if decision.action == "finished" else returncode or 1


def requeue(job_id: str, exclude: Sequence[str]) -> None:
    """`scontrol requeue`, then the job's new ExcNodeList when a node is to be excluded.

    The order, tried on SLURM 22.05 from inside the job's own batch script: an ExcNodeList
    update is refused while the job runs ("Job is no longer pending execution"); after
    `scontrol requeue` the job is pending-and-completing, takes the update, and cannot start
    before this batch script has exited (nor before its requeue begin time), so the update is
    in place for the next attempt. (`requeuehold`, update, `release` works as well, but a
    supervisor killed between hold and release would leave the job held for good.)"""
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:  # e.g. SLURM is already requeueing it (preemption)
        log(f"scontrol requeue: {done.stderr.strip() or done.returncode}")
    if exclude:
        update = ["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(exclude)}"]
        done = subprocess.run(update, capture_output=True, text=True)
        if done.returncode != 0:
            log(
                f"{' '.join(update)} failed ({done.stderr.strip() or done.returncode}): the "
                "requeued job may be placed on that node again"
            )


if __name__ == "__main__":
    raise SystemExit(main())
