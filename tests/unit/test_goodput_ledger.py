"""The goodput ledger's arithmetic (coatnet_scale/goodput.py) and SLURM's queue wait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coatnet_scale.distributed import slurm
from coatnet_scale.goodput import GOODPUT_FILE, GoodputLedger
from coatnet_scale.watchdog import PHASES


def phases(**seconds: float) -> dict[str, float]:
    return dict.fromkeys(PHASES, 0.0) | seconds


def test_a_rollback_charges_the_training_time_since_the_snapshot(tmp_path: Path) -> None:
    ledger = GoodputLedger(tmp_path, True, 0, 2)
    ledger.good_state(phases(forward=10.0, backward=20.0))
    ledger.rolled_back(3, phases(forward=12.0, backward=24.0, data=50.0))
    ledger.update(9, phases(forward=14.0, backward=28.0, data=50.0, eval=4.0, checkpoint=1.0))
    saved = json.loads((tmp_path / GOODPUT_FILE).read_text())
    [attempt] = saved["attempts"]
    assert attempt["lost_steps_rollback"] == 3 and attempt["lost_rollback_s"] == 6.0
    assert (attempt["training_s"], attempt["data_stall_s"]) == (42.0, 50.0)
    assert (attempt["eval_s"], attempt["checkpoint_s"]) == (4.0, 1.0)
    totals = saved["totals"]
    assert totals["lost_steps"] == 3 and totals["lost_s"] == 6.0
    assert totals["goodput"] == pytest.approx(36.0 / totals["wall_s"])


def test_a_restart_charges_the_steps_the_previous_attempt_reached(tmp_path: Path) -> None:
    earlier = {
        "first_step": 0,
        "last_step": 10,
        "training_s": 20.0,
        "wall_s": 40.0,
        "queue_wait_s": 100.0,
        "startup_s": 5.0,
        "ended": "running",
    }
    (tmp_path / GOODPUT_FILE).write_text(json.dumps({"attempts": [earlier]}))
    ledger = GoodputLedger(tmp_path, True, 8, 2)  # resumed from the step-8 checkpoint
    assert ledger.attempt["lost_steps_restart"] == 2
    ledger.update(12, phases(forward=4.0))
    totals = ledger.totals()
    assert totals["lost_steps"] == 2 and totals["lost_s"] == pytest.approx(2 * 2.0)
    assert totals["queue_wait_s"] == 100.0
    line, metrics = ledger.summary(flops_per_step=1e12, peak_flops=1e13)
    assert "over 2 attempt(s)" in line and "(2 steps trained twice)" in line
    elapsed = totals["wall_s"] + 100.0
    assert metrics["goodput_mfu"] == pytest.approx(1e12 * 12 / elapsed / 1e13)


def test_the_queue_wait_comes_from_the_attempts_submit_and_start_times(monkeypatch) -> None:
    fields = {"SubmitTime": "2026-11-30T10:00:00", "StartTime": "2026-11-30T10:02:30"}
    monkeypatch.setattr(slurm, "job_fields", lambda job: fields)
    assert slurm.queue_wait_s({"SLURM_JOB_ID": "7"}) == 150.0
    assert slurm.queue_wait_s({}) is None
    monkeypatch.setattr(slurm, "job_fields", lambda job: {})  # no scontrol
    assert slurm.queue_wait_s({"SLURM_JOB_ID": "7"}) is None


def test_a_killed_attempt_is_charged_up_to_its_last_heartbeat(tmp_path: Path) -> None:
    """Its ledger is as old as its last log (step 10); its heartbeat saw step 13 done."""
    killed = {
        "host": "n1",
        "pid": 4242,
        "started": 1000.0,
        "first_step": 0,
        "last_step": 10,
        "training_s": 20.0,
        "wall_s": 30.0,
        "ended": "running",
    }
    (tmp_path / GOODPUT_FILE).write_text(json.dumps({"attempts": [killed]}))
    (tmp_path / "heartbeat").mkdir()
    beat = {"host": "n1", "pid": 4242, "step": 12, "phase": "collective", "alive": 1045.0}
    (tmp_path / "heartbeat" / "rank-00000.json").write_text(json.dumps(beat))
    ledger = GoodputLedger(tmp_path, True, 8, 2)  # resumed from the step-8 checkpoint
    previous = ledger.earlier[0]
    assert previous["last_step"] == 13 and previous["wall_s"] == 45.0
    assert ledger.attempt["lost_steps_restart"] == 5
    assert previous["lost_after_s"] == pytest.approx(5 * 2.0)  # at its logged 2 s per step
    assert previous["training_s"] == pytest.approx(20.0 + 3 * 2.0)  # steps 11-13 trained too
    # so the steps it kept (0-8) count as good time, the 5 trained twice do not
    assert ledger.totals()["training_s"] - ledger.totals()["lost_s"] == pytest.approx(16.0)
    # a heartbeat of another process says nothing about this attempt
    (tmp_path / GOODPUT_FILE).write_text(json.dumps({"attempts": [killed]}))
    beat["pid"] = 1
    (tmp_path / "heartbeat" / "rank-00000.json").write_text(json.dumps(beat))
    assert GoodputLedger(tmp_path, True, 8, 2).attempt["lost_steps_restart"] == 2
