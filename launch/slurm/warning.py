"""Does the job's time-limit warning signal leave each attempt time to train and to save?

`#SBATCH --signal=USR1@300` asks SLURM to signal the tasks 300 s before the time limit; they stop
after the next step and commit a checkpoint. Two settings waste a campaign without failing it:

- a lead as long as the time limit or longer: SLURM signals at once, every attempt stops right
  after start-up with a step or two done (measured: `--time=2` with `@300` stopped each attempt
  about 20 s after start-up; a 900-step debug run took 8 attempts);
- a lead shorter than one step plus one checkpoint save: the time limit kills the tasks before
  the checkpoint is committed, and the attempt's work is lost.

SLURM does not show a job's `--signal` (not in `scontrol show job`, not in the environment), so
the supervisor reads it where it can: the batch script's `#SBATCH --signal` line (an option given
on the sbatch command line overrides it unseen), and, from the second attempt on, the lead the
previous attempts measured (when rank 0 got the signal, RUN/stop_signal.json, against the job's
end time; two attempts in a row at the same lead, as an operator's `scancel --signal=USR1` looks
the same). Step and save times come from the previous attempt's metrics. Problems are reported at
the start of each attempt with the fix; nothing is refused.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coatnet_scale.distributed.slurm import job_fields, slurm_time
from coatnet_scale.stop import STOP_FILE

LEAD_FILE = "warning_lead.json"  # written here after an attempt stopped on the warning
DEFAULT_LEAD_S = 60.0  # sbatch's --signal without @TIME
SIGNAL_LINE = re.compile(r"^#SBATCH\s+--signal[= ](?:[BR]+:)?(\w+)(?:@(\d+))?", re.MULTILINE)
WARNING_SIGNALS = ("USR1", "USR2", "SIGUSR1", "SIGUSR2")  # not TERM: that is preemption


@dataclass(frozen=True)
class JobTimes:
    """The current attempt's start and time limit (wall clock seconds; None: unlimited)."""

    start: float
    limit_s: float | None

    @property
    def end(self) -> float | None:
        return None if self.limit_s is None else self.start + self.limit_s


def parse_duration(text: str) -> float | None:
    """SLURM's TimeLimit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) in seconds; None for none."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NOT_SET", "NONE", ""):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
        hours, minutes, seconds = parts
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = parts
    return float(((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds)


def job_times(job_id: str) -> JobTimes | None:
    fields = job_fields(job_id)
    start = slurm_time(fields.get("StartTime", ""))
    if start is None:
        return None
    return JobTimes(start, parse_duration(fields.get("TimeLimit", "")))


def declared_lead(script: str) -> tuple[str, float] | None:
    """The warning signal and lead of the batch script's `#SBATCH --signal` line."""
    match = SIGNAL_LINE.search(script)
    if match is None:
        return None
    return match.group(1), float(match.group(2)) if match.group(2) else DEFAULT_LEAD_S


def batch_script(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True
    ).stdout


def step_and_save_s(run_dir: Path) -> float | None:
    """One step plus the longest checkpoint save of the run's recent metrics, in seconds."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()[-500:]
    except OSError:
        return None
    step = save = None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step_time_s", step)
        if "checkpoint_s" in record:
            save = max(save or 0.0, record["checkpoint_s"])
    return None if step is None or save is None else step + save


def measured_leads(run_dir: Path) -> list[dict]:
    """The leads measured by the last attempts that stopped on a warning signal (newest last)."""
    try:
        leads = json.loads((run_dir / LEAD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return leads if isinstance(leads, list) else []


def record_measured_lead(run_dir: Path, times: JobTimes | None, attempt_start: float) -> None:
    """After an attempt: if it stopped on a warning signal, keep how long before the time limit
    the signal came (LEAD_FILE, the last three) for the next attempts' check; otherwise forget
    the earlier ones (they were not consecutive)."""
    try:
        stop = json.loads((run_dir / STOP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        stop = {}
    fresh = stop.get("received_at", 0) >= attempt_start
    if not fresh or stop.get("signal") not in WARNING_SIGNALS or times is None or times.end is None:
        (run_dir / LEAD_FILE).unlink(missing_ok=True)
        return
    lead = times.end - stop["received_at"]
    ran = stop["received_at"] - times.start
    record = {"signal": stop["signal"], "lead_s": lead, "ran_s": ran, "limit_s": times.limit_s}
    leads = [*measured_leads(run_dir), record][-3:]
    (run_dir / LEAD_FILE).write_text(json.dumps(leads))


def lead_problems(
    limit_s: float | None, lead_s: float, source: str, step_save_s: float | None
) -> list[str]:
    """What is wrong with a warning `lead_s` seconds before a `limit_s` time limit, with the
    fix; `source` says where the lead was read."""
    problems = []
    # SLURM may send the warning up to a minute early: an attempt trains at most this long
    training_s = None if limit_s is None else max(limit_s - lead_s, 0.0)
    if limit_s is not None and training_s is not None and training_s <= max(60, limit_s / 4):
        want = max(60, math.ceil(3 * step_save_s)) if step_save_s else 60  # a few steps + save
        fix = (
            f"sbatch --signal=USR1@{want} (a few steps plus a save), or a longer --time"
            if want <= limit_s / 2
            else f"a longer --time (well above {2 * want} s), with --signal=USR1@{want}"
        )
        problems.append(
            f"the time-limit warning comes {lead_s:.0f} s before the limit ({source}), but the "
            f"job's time limit is {limit_s:.0f} s: every attempt is told to stop "
            f"{training_s:.0f} s after it starts. Fix: {fix}"
        )
    if step_save_s is not None and lead_s < step_save_s:
        suggest = math.ceil(2 * step_save_s) + 30
        problems.append(
            f"the time-limit warning comes {lead_s:.0f} s before the limit ({source}), but one "
            f"step plus a checkpoint save took {step_save_s:.0f} s in this run: the time limit "
            f"can kill the tasks before their checkpoint is committed. Fix: sbatch "
            f"--signal=USR1@{suggest}"
        )
    return problems


def check(run_dir: Path, job_id: str, times: JobTimes | None) -> list[str]:
    """The problems to report at the start of an attempt (empty when the lead looks right)."""
    step_save = step_and_save_s(run_dir)
    problems = []
    declared = declared_lead(batch_script(job_id))
    if declared is not None and times is not None:
        source = f"#SBATCH --signal={declared[0]}@{declared[1]:.0f} in the batch script"
        problems += lead_problems(times.limit_s, declared[1], source, step_save)
    # An operator's `scancel --signal=USR1` looks the same as the warning: a measured lead counts
    # only when two attempts in a row stopped on it at the same lead (within SLURM's 60 s
    # resolution of the warning).
    leads = measured_leads(run_dir)[-2:]
    if len(leads) == 2 and abs(leads[0]["lead_s"] - leads[1]["lead_s"]) <= 60 and not problems:
        last = leads[-1]
        source = (
            f"measured: the last 2 attempts got {last['signal']} after "
            f"{leads[0]['ran_s']:.0f} and {last['ran_s']:.0f} s of running"
        )
        problems += lead_problems(last["limit_s"], last["lead_s"], source, step_save)
    return problems
