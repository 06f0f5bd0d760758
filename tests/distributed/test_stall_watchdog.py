"""A stalled rank ends the job, named, with every rank's stacks: SIGSTOP one of two DeepSpeed
ranks mid-run; the launcher exits with code 7 well before the collective timeout, one line names
the rank, its host and its phase, RUN/stall/ holds both ranks' stacks (the stopped one's taken
from outside with py-spy) and RUN/exit_reason.json names the rank for the SLURM supervisor.
Three ranks, one stuck but alive: it is named, not the ranks that wait for it, and every rank's
stacks are in before the job ends."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from coatnet_scale.exits import EXIT_STALLED
from tests.data.conftest import shard_set
from tests.distributed.test_checkpoint_faults import rank_pids
from tests.distributed.test_training_2ranks import BIN, REPO
from tests.processes import DEBUG_PRETRAIN, stop_tree

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STALL_S = 30


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def heard_phase(run: Path, rank: int) -> str | None:
    """The phase rank `rank`'s heartbeat file last reported (written every few seconds)."""
    try:
        return json.loads((run / "heartbeat" / f"rank-{rank:05d}.json").read_text())["phase"]
    except (OSError, ValueError, KeyError):
        return None


def endless_run(data: Path, run: Path, ranks: int) -> list[str]:
    """`ranks` DeepSpeed ranks training the debug model until stopped, logging every step, with
    the watchdog at STALL_S."""
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        *DEBUG_PRETRAIN,
        f"data.train_shards={data}",
        "train.total_steps=100000",
        "logging.log_every=1",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0",
        f"distributed.stall_timeout_s={STALL_S}",
        f"train.run_dir={run}",
    ]


def test_a_stopped_rank_ends_the_job_named_with_every_ranks_stacks(tmp_path) -> None:
    run = tmp_path / "run"
    args = endless_run(shard_set(tmp_path, [20, 12]), run, ranks=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 600
        while logged_step(run) < 3 or heard_phase(run, 1) in (None, "setup"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.5)
        stopped_pid = rank_pids(run)[1]
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = proc.communicate(timeout=STALL_S + 120)
        took = time.monotonic() - stopped_at
    finally:
        stop_tree(proc)
    assert proc.returncode == EXIT_STALLED, out[-3000:]
    # DeepSpeed's launcher ends the other rank on the first non-zero exit (up to 30 s for the
    # stopped one, which only SIGKILL reaches); the collective timeout would have been 30 min.
    assert took < STALL_S + 60, (took, out[-3000:])
    host = socket.gethostname()
    named = [line for line in out.splitlines() if "stall: rank 1 " in line]
    assert named, out[-3000:]
    assert f"host {host}, pid {stopped_pid}" in named[0] and "phase '" in named[0], named[0]
    stall = run / "stall"
    report = json.loads((stall / "report.json").read_text())
    assert (report["rank"], report["pid"], report["frozen"]) == (1, stopped_pid, True)
    # stopped mid-run: its last heartbeat was a training phase
    assert report["phase"] in ("data", "forward", "backward", "optimizer", "collective")
    own = (stall / "stacks-rank-00000.txt").read_text()
    assert "coatnet-watchdog" in own or "Thread" in own, own[:2000]
    assert "train.py" in own, own[:2000]  # rank 0's training thread, waiting for rank 1
    theirs = (stall / "stacks-rank-00001.txt").read_text()
    assert f"py-spy dump of pid {stopped_pid}" in theirs and "train.py" in theirs, theirs[:2000]
    reason = json.loads((run / "exit_reason.json").read_text())
    assert (reason["code"], reason["rank"], reason["host"]) == (EXIT_STALLED, 1, host)


def test_a_stuck_but_live_rank_of_three_is_named_after_every_rank_left_its_stacks(
    tmp_path,
) -> None:
    """Rank 1's training thread blocks in step 5's forward (tests/faults: a deadlock, not a
    frozen process: its watchdog thread still writes). Ranks 0 and 2 wait for it in the gradient
    reduction. One watcher names rank 1 (not the ranks that wait), every rank's stacks are
    written before the job ends (rank 1's own show where it blocks), and the exit code is 7."""
    run = tmp_path / "run"
    args = endless_run(shard_set(tmp_path, [20, 12]), run, ranks=3)
    args += ["train.global_batch_size=12", "train.micro_batch_size=4"]
    faults = {"PYTHONPATH": f"{REPO / 'tests' / 'faults'}:{REPO}", "COATNET_FAULT_STUCK": "1:4"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **faults}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        stop_tree(proc)
    assert proc.returncode == EXIT_STALLED, out[-3000:]
    named = re.findall(r"rank [02]: (stall: rank 1 \(host .*)", out)
    assert len(named) == 1, out[-3000:]  # one watcher names it, the other follows
    assert "stopped making progress" in named[0] and "phase 'forward' of step 5" in named[0]
    stall = run / "stall"
    report = json.loads((stall / "report.json").read_text())
    assert (report["rank"], report["frozen"], report["tied"]) == (1, False, [])
    assert (stall / "done").exists()
    for rank in (0, 2):
        assert "train.py" in (stall / f"stacks-rank-{rank:05d}.txt").read_text()
    own = (stall / "stacks-rank-00001.resumed.txt").read_text()  # written by its watchdog
    assert "hooks.py" in own and "faulty" in own, own[:3000]
    outside = (stall / "stacks-rank-00001.txt").read_text()  # py-spy, from a rank on its host
    assert "py-spy dump of pid" in outside and "faulty" in outside, outside[:3000]
    reason = json.loads((run / "exit_reason.json").read_text())
    assert (reason["code"], reason["rank"]) == (EXIT_STALLED, 1)
