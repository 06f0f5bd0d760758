"""SLURM jobs on a real local 3-node cluster (tests/slurm/cluster.py): `sbatch --nodes=2
launch/slurm/pretrain.sbatch` trains the debug model with one rank per node (CPU, gloo),
evaluates and checkpoints; interrupted in each way SLURM has (an operator's USR1, preemption's
TERM, an operator's `scontrol requeue`, SLURM's own time-limit warning; each time a checkpoint and
a requeue) it ends with the same weights, step count and sample accounting as an uninterrupted
job, in one wandb run; a killed task ends the job step at once with the failed rank named, and the
requeued job resumes; a node whose task fails in two attempts in a row is excluded from the
requeued job, which then finishes on the other two; a warning lead longer than the time limit is
reported when the job starts.

Skipped, with the reason, only where the cluster cannot be started (not root)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coatnet_scale import checkpoint
from tests.data.conftest import shard_set
from tests.slurm.cluster import LocalCluster, unavailable_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"), nodes=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """Overrides naming small train and validation shard sets."""
    tmp = tmp_path_factory.mktemp("slurmdata")
    train, val = shard_set(tmp, [20, 7, 13]), shard_set(tmp, [9], name="val")
    return [f"data.train_shards={train}", f"data.val_shards={val}"]


def submit(
    cluster: LocalCluster,
    name: str,
    run: Path,
    data: list[str],
    *overrides: str,
    minutes: int = 20,
    env: dict[str, str] | None = None,
) -> str:
    run.mkdir(parents=True, exist_ok=True)
    args = [
        "sbatch",
        "--parsable",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--cpus-per-task=1",
        f"--time={minutes}",
        f"--job-name={name}",
        f"--output={run}/slurm-%j.out",
        "launch/slurm/pretrain.sbatch",
        "--model",
        "coatnet_debug",
        "--config",
        "configs/debug.yaml",
        *data,
        "model.image_size=32",
        "model.num_classes=3",
        "precision.dtype=fp32",
        f"train.total_steps={STEPS}",
        "train.eval_every=0",
        "logging.wandb_mode=offline",
        "logging.log_every=1",
        "checkpoint.every_steps=4",
        "checkpoint.every_minutes=0",
        "distributed.timeout_minutes=1",
        f"train.run_dir={run}",
        *overrides,
    ]
    env = {**cluster.env(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job(cluster: LocalCluster, job_id: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def release(cluster: LocalCluster, job_id: str) -> None:
    """SLURM holds a requeued batch job for two minutes (its begin time, set once the old batch
    step has ended); the tests shorten that wait once the job is back in the queue. Nothing else
    about the requeue changes."""
    wait_for(lambda: job(cluster, job_id).get("JobState") == "PENDING", "the requeued job", 300)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            steps.append(json.loads(line).get("step", 0))
    return max(steps, default=0)


def wait_for(condition, what: str, timeout: float = 600, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def finished(cluster: LocalCluster, job_id: str) -> bool:
    return job(cluster, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")


def job_log(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run.glob("slurm-*.out")))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.consolidated_state_dict(run / "checkpoints" / checkpoint.step_name(STEPS))


def training_pids(job_id: str, rank: int | None = None) -> list[int]:
    """The training processes of job `job_id` (`python launch/pretrain.py`, not srun), or the
    one of `rank` (its SLURM_PROCID)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        python = Path(argv[0].decode(errors="ignore")).name.startswith("python")
        script = any(arg.endswith(b"launch/pretrain.py") for arg in argv)
        ours = f"SLURM_JOB_ID={job_id}".encode() in env
        if rank is not None:
            ours = ours and f"SLURM_PROCID={rank}".encode() in env
        if python and script and ours:
            pids.append(int(proc.name))
    return pids


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits for delivery to process `pid` (its /proc status masks)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing left to wait for
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)", status, re.MULTILINE)
    return any(int(mask, 16) >> (signum - 1) & 1 for mask in masks)


def interrupt_paused_tasks(cluster: LocalCluster, job_id: str, how: str) -> None:
    """Interrupt the job the way `how` names while its training tasks are stopped (SIGSTOP), then
    let them go on: the signal reaches them mid-run, however fast the machine trains the
    remaining steps (without the pause, a fast machine finished all steps before SLURM
    delivered it).

    USR1: an operator's `scancel --signal=USR1` (a signal only); TERM: what SLURM sends every task
    when it preempts a job (PreemptMode=REQUEUE); requeue: an operator's `scontrol requeue`;
    timelimit: SLURM's own time-limit warning (`--signal=USR1@300`), due at once when the time
    limit is cut to 5 minutes."""
    pids = training_pids(job_id)
    assert len(pids) == 2, f"training processes of job {job_id}: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        if how in ("USR1", "TERM"):
            cluster.run("scancel", f"--signal={how}", job_id)
        elif how == "requeue":
            cluster.run("scontrol", "requeue", job_id)
        else:
            cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=5")
        sig = {"USR1": "USR1", "TERM": "TERM", "requeue": "TERM", "timelimit": "USR1"}[how]
        signum = signal.Signals[f"SIG{sig}"].value
        wait_for(
            lambda: all(pending(pid, signum) for pid in pids), f"{how} to reach the tasks", 300
        )
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # slurmd's SIGCONT+SIGTERM ended it
                os.kill(pid, signal.SIGCONT)


INTERRUPTIONS = ("USR1", "TERM", "requeue", "timelimit")


def test_every_way_slurm_interrupts_a_job_ends_like_an_uninterrupted_one(
    cluster, data, tmp_path
) -> None:
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    ref_job = submit(cluster, "reference", reference, data)
    job_id = submit(cluster, "interrupted", interrupted, data)
    # The two jobs share the 2 nodes: the second starts when the first ends.
    wait_for(lambda: finished(cluster, ref_job), "the reference job")
    assert job(cluster, ref_job)["JobState"] == "COMPLETED", job_log(reference)

    # Each time two steps into the attempt: the debug model trains a step in tens of
    # milliseconds here, so the steps are watched closely and the tasks paused for the signal.
    for restart, how in enumerate(INTERRUPTIONS):
        wait_for(lambda r=restart: job(cluster, job_id).get("Restarts") == str(r), "the restart")
        begun = logged_step(interrupted)
        wait_for(lambda b=begun: logged_step(interrupted) >= b + 2, "two steps", poll=0.005)
        interrupt_paused_tasks(cluster, job_id, how)
        wait_for(lambda r=restart: job(cluster, job_id).get("Restarts") == str(r + 1), "requeue")
        if how == "timelimit":  # the next attempt gets its 20 minutes back
            cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=20")
        release(cluster, job_id)
    wait_for(lambda: finished(cluster, job_id), "the interrupted job")
    log = job_log(interrupted)
    assert job(cluster, job_id)["JobState"] == "COMPLETED", log[-3000:]

    assert log.count("stop requested (SIGUSR1)") == 2  # the operator's, the time limit's
    assert log.count("stop requested (SIGTERM)") == 2  # preemption, scontrol requeue
    assert log.count("the tasks stopped after a checkpoint at step") == 4
    assert len(re.findall(r"requeueing \(step \d+ -> \d+\)", log)) == 4  # each made progress
    assert log.count("resumed from") == 4
    # Same final step, same samples, bitwise the same weights as the uninterrupted job.
    last = interrupted / "checkpoints" / checkpoint.step_name(STEPS)
    state = checkpoint.TrainerState.read(last)
    ref_state = checkpoint.TrainerState.read(reference / "checkpoints" / last.name)
    assert state.data == ref_state.data and state.data["samples_consumed"] == STEPS * 8
    got, want = final_weights(interrupted), final_weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # One wandb run: five offline segments carrying the same id.
    run_id = (interrupted / "wandb_run_id").read_text().strip()
    segments = sorted((interrupted / "wandb").glob("offline-run-*"))
    assert len(segments) == 5 and all(s.name.endswith(run_id) for s in segments)
    assert state.wandb_run_id == run_id
    # Evaluated at the end, and one metrics record per step despite the restarts.
    records = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, STEPS + 1))
    assert any("val_top1" in r for r in records)
    assert not (interrupted / "owner.json").exists()  # every attempt released its folder


def test_a_killed_task_ends_the_job_quickly_and_the_requeued_job_resumes(
    cluster, data, tmp_path
) -> None:
    run = tmp_path / "killed"
    cluster.wait_idle()  # all three free: SLURM places the job on n1 and n2 (rank 1 on n2)
    job_id = submit(cluster, "killed", run, data)
    # Watched closely: the remaining 18 steps take about a second here.
    wait_for(lambda: logged_step(run) >= 6, "step 6 (after the step-4 checkpoint)", poll=0.005)
    newest = checkpoint.list_checkpoints(run / "checkpoints")[-1]
    (pid,) = training_pids(job_id, rank=1)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # rank 1, on node n2
    wait_for(lambda: job(cluster, job_id).get("Restarts") == "1", "the requeue", timeout=300)
    assert time.monotonic() - killed_at < 60  # bounded: not the job's 20-minute limit
    release(cluster, job_id)
    wait_for(lambda: finished(cluster, job_id), "the requeued job")
    log = job_log(run)
    assert job(cluster, job_id)["JobState"] == "COMPLETED", log[-3000:]
    assert re.search(r"srun: error: n2: task 1: Killed", log), log[-3000:]
    assert "the training step failed (exit code" in log and "requeueing (step" in log
    resumed = re.findall(r"resumed from (\S+) \(step (\d+)", log)
    assert resumed and int(resumed[0][1]) >= checkpoint.checkpoint_step(newest)
    assert checkpoint.verify(run / "checkpoints" / checkpoint.step_name(STEPS)) == []


def test_a_stalled_task_ends_the_job_named_and_the_requeued_job_finishes(
    cluster, data, tmp_path
) -> None:
    """SIGSTOP rank 1 (node n2) mid-run: the watchdog of rank 0 names it within
    stall_timeout_s, with both ranks' stacks, and ends the step (exit 7); the supervisor blames
    n2 and requeues by the progress rule; the requeued job resumes and finishes."""
    run = tmp_path / "stalled"
    cluster.wait_idle()
    job_id = submit(cluster, "stalled", run, data, "distributed.stall_timeout_s=30")
    wait_for(lambda: logged_step(run) >= 6, "step 6 (after the step-4 checkpoint)", poll=0.005)
    (pid,) = training_pids(job_id, rank=1)
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: job(cluster, job_id).get("Restarts") == "1", "the requeue", timeout=300)
    # the collective timeout (distributed.timeout_minutes=1) would have been 60 s plus srun's
    # teardown; the watchdog: 30 s, a heartbeat interval, the stacks
    assert time.monotonic() - stopped_at < 30 + 60
    stall_dir = run / "stall"
    stacks = {p.name: p.read_text() for p in stall_dir.glob("stacks-rank-*.txt")}
    report = json.loads((stall_dir / "report.json").read_text())
    release(cluster, job_id)
    wait_for(lambda: finished(cluster, job_id), "the requeued job")
    log = job_log(run)
    assert job(cluster, job_id)["JobState"] == "COMPLETED", log[-3000:]
    assert re.search(rf"rank 0: stall: rank 1 \(host \S+, pid {pid}\) stopped responding", log)
    assert (report["rank"], report["node"], report["frozen"]) == (1, "n2", True)
    # rank 1's taken from outside while it was stopped (srun's SIGCONT before its kill may
    # also let it write its own, as stacks-rank-00001.resumed.txt)
    assert {"stacks-rank-00000.txt", "stacks-rank-00001.txt"} <= set(stacks)
    assert f"py-spy dump of pid {pid}" in stacks["stacks-rank-00001.txt"]
    assert "train.py" in stacks["stacks-rank-00000.txt"]
    failures = json.loads((run / "node_failures.json").read_text())
    assert failures[0]["node"] == "n2" and "rank 1 stalled" in failures[0]["what"]
    assert "requeueing (step" in log  # progress since the attempt began: requeued
    assert checkpoint.verify(run / "checkpoints" / checkpoint.step_name(STEPS)) == []


# Put on the tasks' PYTHONPATH: the training task on node n2 exits with code 1 as it starts, the
# way a task on a broken node fails (the library has no test-only path for it). Every other
# python of the job (the supervisor, the task on another node) runs as usual.
BAD_NODE_HOOK = """import os, sys
if os.environ.get("SLURMD_NODENAME") == "n2" and any(
    arg.endswith("launch/pretrain.py") for arg in sys.argv
):
    print("test: the training task on n2 fails (a bad node)", file=sys.stderr, flush=True)
    os._exit(1)
"""


def test_a_node_that_fails_two_attempts_in_a_row_is_excluded_and_the_job_finishes_without_it(
    cluster, data, tmp_path
) -> None:
    """The task on n2 fails in restarts 0 and 1 (no checkpoint either time): the second requeue
    adds n2 to the job's ExcNodeList with a line saying why, and restart 2 trains to the end on
    n1 and n3. With the default distributed.max_requeues=3 (two attempts without progress)."""
    run, hook = tmp_path / "badnode", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BAD_NODE_HOOK)
    cluster.wait_idle()  # all three free: SLURM places the job on n1 and n2 (rank 1 on n2)
    job_id = submit(cluster, "badnode", run, data, env={"PYTHONPATH": str(hook)})
    wait_for(lambda: job(cluster, job_id).get("Restarts") == "1", "the first requeue", 300)
    assert job(cluster, job_id).get("ExcNodeList") == "(null)"  # one failure excludes nothing
    release(cluster, job_id)
    wait_for(lambda: job(cluster, job_id).get("Restarts") == "2", "the second requeue", 300)
    release(cluster, job_id)  # pending again: this attempt's supervisor has exited
    assert job(cluster, job_id)["ExcNodeList"] == "n2"
    wait_for(lambda: finished(cluster, job_id), "the job without n2")
    log, info = job_log(run), job(cluster, job_id)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1,3]", log[-3000:]
    assert log.count("srun: error: n2: task 1: Exited with exit code 1") == 2, log[-3000:]
    assert (
        "node n2 is excluded from the requeued job (ExcNodeList=n2): it failed two attempts in "
        "a row (restart 0: task 1: Exited with exit code 1; restart 1: task 1: Exited with exit "
        "code 1); requeueing (no new checkpoint (2))"
    ) in log
    assert log.count("is excluded from the requeued job") == 1
    assert "restart 2, 2 node(s)" in log and "training finished" in log
    assert checkpoint.verify(run / "checkpoints" / checkpoint.step_name(STEPS)) == []
    attempts = json.loads((run / "node_failures.json").read_text())
    assert [(a["restart"], a["node"]) for a in attempts] == [(0, "n2"), (1, "n2"), (2, None)]


def test_a_warning_lead_longer_than_the_time_limit_is_reported_at_start(
    cluster, data, tmp_path
) -> None:
    """The sbatch's USR1@300 against a 1-minute limit: SLURM would tell every attempt to stop
    right after start-up; the supervisor says so, with the fix, before srun starts."""
    run = tmp_path / "short"
    job_id = submit(cluster, "short", run, data, minutes=1)
    try:
        wait_for(lambda: "srun" in job_log(run), "the attempt to start")
    finally:
        cluster.run("scancel", job_id, check=False)
    log = job_log(run)
    assert "WARNING: the time-limit warning comes 300 s before the limit" in log, log[-3000:]
    assert "#SBATCH --signal=USR1@300 in the batch script" in log
    assert "job's time limit is 60 s: every attempt is told to stop 0 s after" in log
    assert "Fix: a longer --time (well above 120 s), with --signal=USR1@60" in log
    assert log.index("WARNING: the time-limit warning") < log.index("srun --kill-on-bad-exit")


def test_the_hostfile_for_deepspeeds_launcher_lists_the_allocation(cluster, tmp_path) -> None:
    out = tmp_path / "hostfile"
    cluster.run(
        "sbatch",
        "--wait",
        "--nodes=2",
        "--nodelist=n1,n3",  # SLURM_JOB_NODELIST=n[1,3]
        "--ntasks-per-node=1",
        f"--output={out}",
        f"--wrap={sys.executable} launch/slurm/supervisor.py --hostfile",
        cwd=REPO,
    )
    assert out.read_text() == "n1 slots=1\nn3 slots=1\n"
