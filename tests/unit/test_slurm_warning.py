"""The time-limit warning check (launch/slurm/warning.py): a lead as long as the time limit (every
attempt stops right after start-up) or shorter than a step plus a save (the checkpoint is cut) is
reported with the fix; SLURM's durations and the batch script's --signal line are read right."""

from __future__ import annotations

import json
from pathlib import Path

from launch.slurm import warning


def test_slurm_durations() -> None:
    assert warning.parse_duration("30") == 1800
    assert warning.parse_duration("02:00") == 120
    assert warning.parse_duration("1:00:00") == 3600
    assert warning.parse_duration("2-00:00:00") == 2 * 86400
    assert warning.parse_duration("1-12") == 36 * 3600
    assert warning.parse_duration("UNLIMITED") is None


def test_the_batch_scripts_signal_line() -> None:
    script = "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --signal=USR1@300\nexec python x.py\n"
    assert warning.declared_lead(script) == ("USR1", 300.0)
    assert warning.declared_lead("#SBATCH --signal=B:USR2@90\n") == ("USR2", 90.0)
    assert warning.declared_lead("#SBATCH --signal=USR1\n") == ("USR1", 60.0)  # sbatch's default
    assert warning.declared_lead("#!/bin/bash\n") is None
    ours = (Path(__file__).resolve().parents[2] / "launch/slurm/pretrain.sbatch").read_text()
    assert warning.declared_lead(ours) == ("USR1", 300.0)


def test_a_lead_longer_than_the_time_limit_is_reported_with_the_fix() -> None:
    """The measured case: --time=2 with USR1@300 stopped every attempt ~20 s after start-up."""
    (problem,) = warning.lead_problems(120, 300, "the batch script", step_save_s=4.0)
    assert "every attempt is told to stop 0 s after it starts" in problem
    assert "--signal=USR1@60" in problem and "longer --time" in problem
    assert warning.lead_problems(24 * 3600, 300, "x", step_save_s=4.0) == []  # the usual case
    (short,) = warning.lead_problems(60, 300, "the batch script", step_save_s=None)
    assert "Fix: a longer --time (well above 120 s), with --signal=USR1@60" in short


def test_a_lead_shorter_than_a_step_and_a_save_is_reported_with_the_fix() -> None:
    (problem,) = warning.lead_problems(24 * 3600, 60, "measured", step_save_s=95.0)
    assert "before their checkpoint is committed" in problem and "--signal=USR1@220" in problem


def test_step_and_save_times_come_from_the_runs_metrics(tmp_path: Path) -> None:
    assert warning.step_and_save_s(tmp_path) is None
    records = [
        {"step": 20, "loss": 1.0, "step_time_s": 2.5},
        {"step": 20, "checkpoint_s": 40.0},
        {"step": 40, "loss": 1.0, "step_time_s": 3.0},
        {"step": 40, "checkpoint_s": 35.0},
    ]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"step": 41, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert warning.step_and_save_s(tmp_path) == 43.0  # the last step time, the longest save


def test_a_lead_measured_twice_in_a_row_is_checked(tmp_path: Path, monkeypatch) -> None:
    """Attempts stopped on USR1 20 s after they started, 100 s before their 120 s limit: the
    next attempt's check reports it once two attempts agree (one could be an operator's USR1)."""
    monkeypatch.setattr(warning, "batch_script", lambda job_id: "")  # nothing declared
    times = warning.JobTimes(start=1000.0, limit_s=120.0)
    stop = {"signal": "SIGUSR1", "received_at": 1020.0, "step": 3}
    (tmp_path / "stop_signal.json").write_text(json.dumps(stop))
    warning.record_measured_lead(tmp_path, times, attempt_start=999.0)
    (lead,) = warning.measured_leads(tmp_path)
    assert lead["lead_s"] == 100.0 and lead["ran_s"] == 20.0
    assert warning.check(tmp_path, "1", times) == []  # once: maybe an operator's signal
    warning.record_measured_lead(tmp_path, times, attempt_start=999.0)
    (problem,) = warning.check(tmp_path, "1", times)
    assert "the last 2 attempts got SIGUSR1 after 20 and 20 s" in problem
    assert "every attempt is told to stop 20 s after it starts" in problem
    # an attempt that did not stop on the warning breaks the sequence
    warning.record_measured_lead(tmp_path, times, attempt_start=1021.0)  # an older stop
    assert warning.measured_leads(tmp_path) == []
    (tmp_path / "stop_signal.json").write_text(json.dumps(stop | {"signal": "SIGTERM"}))
    warning.record_measured_lead(tmp_path, times, attempt_start=999.0)  # preemption: no lead
    assert warning.measured_leads(tmp_path) == []
