"""The goodput ledger: where a run's wall time went, across every attempt (RUN/goodput.json).

A campaign's GPU hours go to more than training: queue waits between requeues, start-up (process
group, engine, resume), evaluation, checkpoint stalls, waiting for data, and work done twice
(steps trained after the last checkpoint of an attempt that was killed, steps a loss-spike
rollback trains again). Per attempt, rank 0 records:

- `queue_wait_s`: from SLURM (the attempt's StartTime minus its SubmitTime, `scontrol`), when
  the run is a SLURM job;
- `startup_s`: from the process's start to the first step;
- `training_s`, `data_stall_s`, `eval_s`, `checkpoint_s`: the heartbeat's phase clocks
  (`watchdog.Heartbeat`: forward, backward, optimizer and the step's collectives are training;
  waiting for a batch is the data stall; a synchronous save or the copy to host memory of an
  asynchronous one is the checkpoint stall);
- `lost_steps` / `lost_s`: steps trained again, with the time they had taken: after a restart,
  the steps the previous attempt reached beyond the checkpoint this one resumed from (at that
  attempt's mean step time); after a rollback, the steps between the snapshot and the spike;
- `first_step`, `last_step`, `wall_s`, and how the attempt ended.

The file is rewritten at every log interval, so a killed attempt leaves its progress, and the
next attempt charges what it lost. Goodput = (training time - lost time) / wall time, over all
attempts, queue waits included; MFU over the same wall time counts only the steps kept. A summary
line ends each attempt, and its figures go to the metrics (and wandb).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from coatnet_scale.distributed.slurm import queue_wait_s
from coatnet_scale.files import atomic_write_text
from coatnet_scale.text import duration
from coatnet_scale.watchdog import HEARTBEAT_DIR

GOODPUT_FILE = "goodput.json"
TRAINING = ("forward", "backward", "optimizer", "collective")


def training_time(phase_s: dict[str, float]) -> float:
    return sum(phase_s[p] for p in TRAINING)


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((run_dir / GOODPUT_FILE).read_text())["attempts"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def last_heard(attempt: dict[str, Any], run_dir: Path, step_s: float) -> float:
    """A killed attempt's ledger is as old as its last log interval; rank 0's heartbeat file
    (`watchdog.py`, rewritten every few seconds) may know a later step and time. A step counts
    as trained once its update is done (the phases after the optimizer). The steps its last
    record did not count are added at its own pace (`step_s`; without one, its wall time per
    step); returns the pace used."""
    try:
        beat = json.loads((run_dir / HEARTBEAT_DIR / "rank-00000.json").read_text())
    except (OSError, ValueError):
        return step_s
    if (beat.get("host"), beat.get("pid")) != (attempt.get("host"), attempt.get("pid")) or (
        beat.get("alive", 0.0) < attempt["started"]
    ):
        return step_s  # another attempt's (pids repeat), or an older ledger without host and pid
    done = int(beat["step"]) + (beat["phase"] in ("collective", "eval", "checkpoint"))
    wall = beat["alive"] - attempt["started"]
    later = done - attempt["last_step"]
    if later > 0:
        if step_s <= 0:
            step_s = wall / max(done - attempt["first_step"], 1)
        attempt["training_s"] = (attempt.get("training_s") or 0.0) + later * step_s
        attempt["last_step"] = done
    attempt["wall_s"] = max(attempt.get("wall_s") or 0.0, wall)
    return step_s


def mean_step_s(attempt: dict[str, Any]) -> float:
    steps = attempt["last_step"] - attempt["first_step"] + attempt.get("lost_steps_rollback", 0)
    return attempt["training_s"] / steps if steps > 0 else 0.0


class GoodputLedger:
    """Rank 0's ledger of this attempt, appended to the run's earlier attempts."""

    def __init__(self, run_dir: Path, is_main: bool, start_step: int, world_size: int) -> None:
        self.run_dir, self.is_main = run_dir, is_main
        self.earlier = read_ledger(run_dir) if is_main else []
        started = psutil.Process(os.getpid()).create_time()
        lost = 0
        if self.earlier:
            previous = self.earlier[-1]
            step_s = mean_step_s(previous)  # over the steps its own last record counted
            if previous.get("ended") == "running":  # killed: its heartbeat saw it last
                step_s = last_heard(previous, run_dir, step_s)
            lost = max(0, previous["last_step"] - start_step)
            previous["lost_after_s"] = lost * step_s
        self.attempt: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID", ""),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "world_size": world_size,
            "started": started,
            "queue_wait_s": queue_wait_s(os.environ) if is_main else None,
            "startup_s": None,
            "first_step": start_step,
            "last_step": start_step,
            "lost_steps_restart": lost,  # trained by the previous attempt, trained again here
            "lost_steps_rollback": 0,
            "lost_rollback_s": 0.0,
            "ended": "running",
            "training_s": 0.0,
            "data_stall_s": 0.0,
            "eval_s": 0.0,
            "checkpoint_s": 0.0,
            "wall_s": 0.0,
        }
        self._training_at_snapshot = 0.0
        self._write()  # an attempt that dies in set-up still has its entry

    def first_step(self) -> None:
        self.attempt["startup_s"] = time.time() - self.attempt["started"]

    def good_state(self, phase_s: dict[str, float]) -> None:
        """A snapshot was kept: a rollback loses the training time after this."""
        self._training_at_snapshot = training_time(phase_s)

    def rolled_back(self, steps: int, phase_s: dict[str, float]) -> None:
        self.attempt["lost_steps_rollback"] += steps
        now = training_time(phase_s)
        self.attempt["lost_rollback_s"] += now - self._training_at_snapshot
        self._training_at_snapshot = now  # a second rollback to it loses only what came after

    def update(self, step: int, phase_s: dict[str, float], ended: str = "running") -> None:
        """Record the attempt's progress (rank 0 writes the file)."""
        a = self.attempt
        a["last_step"], a["ended"] = step, ended
        a["training_s"] = training_time(phase_s)
        a["data_stall_s"] = phase_s["data"]
        a["eval_s"] = phase_s["eval"]
        a["checkpoint_s"] = phase_s["checkpoint"]
        self._write()

    def _write(self) -> None:
        self.attempt["wall_s"] = time.time() - self.attempt["started"]
        if self.is_main:
            record = {"attempts": [*self.earlier, self.attempt], "totals": self.totals()}
            with contextlib.suppress(OSError):  # a ledger, never a reason to stop training
                atomic_write_text(self.run_dir / GOODPUT_FILE, json.dumps(record, indent=1))

    def totals(self) -> dict[str, float]:
        attempts = [*self.earlier, self.attempt]
        keys = ("training_s", "data_stall_s", "eval_s", "checkpoint_s", "wall_s")
        total = {k: sum(a.get(k) or 0.0 for a in attempts) for k in keys}
        total["queue_wait_s"] = sum(a.get("queue_wait_s") or 0.0 for a in attempts)
        total["startup_s"] = sum(a.get("startup_s") or 0.0 for a in attempts)
        total["lost_s"] = sum(
            (a.get("lost_after_s") or 0.0) + a.get("lost_rollback_s", 0.0) for a in attempts
        )
        total["lost_steps"] = sum(
            a.get("lost_steps_restart", 0) + a.get("lost_steps_rollback", 0) for a in attempts
        )
        elapsed = total["wall_s"] + total["queue_wait_s"]
        total["goodput"] = (total["training_s"] - total["lost_s"]) / elapsed if elapsed else 0.0
        return total

    def summary(self, flops_per_step: float, peak_flops: float | None) -> tuple[str, dict]:
        """The line that ends an attempt and the metrics it logs."""
        t = self.totals()
        elapsed = t["wall_s"] + t["queue_wait_s"]
        first = (self.earlier or [self.attempt])[0]["first_step"]
        kept = self.attempt["last_step"] - first  # each step once, however often it was trained
        metrics = {f"goodput_{k}": v for k, v in t.items() if k != "goodput"}
        metrics["goodput"] = t["goodput"]
        mfu = ""
        if peak_flops and elapsed:
            metrics["goodput_mfu"] = flops_per_step * kept / elapsed / peak_flops
            mfu = f", MFU over it {metrics['goodput_mfu']:.1%}"
        parts = ", ".join(
            f"{name} {duration(t[key])}"
            for name, key in (
                ("queue", "queue_wait_s"),
                ("start-up", "startup_s"),
                ("training", "training_s"),
                ("eval", "eval_s"),
                ("checkpoint stalls", "checkpoint_s"),
                ("data stalls", "data_stall_s"),
                ("lost work", "lost_s"),
            )
        )
        attempts = len(self.earlier) + 1
        line = (
            f"goodput {t['goodput']:.1%} over {attempts} attempt(s), {duration(elapsed)}: "
            f"{parts} ({t['lost_steps']} steps trained twice){mfu}; {self.run_dir / GOODPUT_FILE}"
        )
        return line, metrics
