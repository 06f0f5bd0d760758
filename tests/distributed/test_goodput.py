"""The goodput ledger across a preemption (coatnet_scale/goodput.py): a run killed mid-way and
resumed has lost work equal to the steps it trained after its last checkpoint, the same steps
whose metric records the resume moved aside; each attempt's wall time is split into its parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from coatnet_scale import checkpoint
from tests.data.conftest import shard_set
from tests.distributed.test_training_2ranks import BIN, REPO
from tests.processes import DEBUG_PRETRAIN, stop_tree

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 250


def command(data: Path, run: Path) -> list[str]:
    return [
        str(BIN / "python"),
        *DEBUG_PRETRAIN,
        f"data.train_shards={data}",
        f"train.total_steps={STEPS}",
        "train.global_batch_size=32",
        "logging.log_every=25",
        "logging.wandb_mode=disabled",
        "checkpoint.every_steps=100",
        "distributed.stall_timeout_s=12",  # a heartbeat every 2 s
        "checkpoint.every_minutes=0",
        f"train.run_dir={run}",
    ]


def heard_step(run: Path) -> int:
    """Steps trained, as rank 0's heartbeat last said (written every 2 s here)."""
    try:
        beat = json.loads((run / "heartbeat" / "rank-00000.json").read_text())
    except (OSError, ValueError):
        return 0
    return beat["step"] + (beat["phase"] in ("collective", "eval", "checkpoint"))


def test_a_preempted_run_charges_the_steps_since_its_last_checkpoint(tmp_path) -> None:
    data, run = shard_set(tmp_path, [20, 12]), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        command(data, run), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 300
        while heard_step(run) < 105:  # past the step-100 checkpoint
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # freeze, read, then kill: a preemption without warning
        killed_at = json.loads((run / "goodput.json").read_text())["attempts"][0]
        reached = heard_step(run)  # the ledger itself is as old as the last log interval
        kept = checkpoint.checkpoint_step(checkpoint.list_checkpoints(run / "checkpoints")[-1])
        first.kill()
        first.wait()
    finally:
        stop_tree(first)
    assert killed_at["ended"] == "running" and reached > kept
    second = subprocess.run(
        command(data, run), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    ledger = json.loads((run / "goodput.json").read_text())
    before, after = ledger["attempts"]
    lost = reached - kept
    assert after["lost_steps_restart"] == lost and after["first_step"] == kept
    assert before["last_step"] == reached  # from its heartbeat, not its last log
    # what the killed attempt logged after its checkpoint lies among those steps
    rewound = run / "metrics.rewound.jsonl"
    moved = [json.loads(line) for line in rewound.open()] if rewound.exists() else []
    assert {r["step"] for r in moved if "loss" in r} <= set(range(kept + 1, reached + 1))
    # their time is charged at the killed attempt's own mean step time
    step_s = killed_at["training_s"] / (killed_at["last_step"] - killed_at["first_step"])
    assert before["lost_after_s"] == pytest.approx(lost * step_s)
    # the steps after its last record count as trained, at that pace
    unrecorded = reached - killed_at["last_step"]
    assert before["training_s"] == pytest.approx(killed_at["training_s"] + unrecorded * step_s)
    totals = ledger["totals"]
    assert totals["lost_steps"] == lost and totals["lost_s"] == before["lost_after_s"]
    assert (after["last_step"], after["ended"], before["ended"]) == (STEPS, "finished", "running")
    for attempt in (before, after):
        parts = sum(attempt[k] for k in ("startup_s", "training_s", "data_stall_s", "checkpoint_s"))
        assert 0 < parts <= attempt["wall_s"] + 1e-6, attempt
    expected = (totals["training_s"] - totals["lost_s"]) / totals["wall_s"]
    assert totals["goodput"] == pytest.approx(expected) and 0 < totals["goodput"] < 1
    summary = [line for line in second.stdout.splitlines() if "goodput " in line]
    assert summary and "over 2 attempt(s)" in summary[-1]
    assert f"({lost} steps trained twice)" in summary[-1]
