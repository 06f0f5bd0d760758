"""One owner per run folder, through the real entry point: the default folder is found again by
the same command; a second run on a live folder refuses at once naming the owner; after a
SIGKILL the next start takes the folder over and resumes (the same folder also for a command that
only extends the run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coatnet_scale.checkpoint import list_checkpoints
from tests.data.conftest import shard_set
from tests.processes import run_bounded, stop_tree

pytestmark = pytest.mark.distributed  # several processes

REPO = Path(__file__).resolve().parents[2]


def command(manifest: Path, total_steps: int) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--model",
        "coatnet_debug",
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        f"data.train_shards={manifest}",
        "data.num_workers=0",
        "model.image_size=32",
        "model.num_classes=3",
        "precision.dtype=fp32",
        f"train.total_steps={total_steps}",
        "train.eval_every=0",
        "logging.wandb_mode=disabled",
        "logging.log_every=1",
        "checkpoint.every_steps=5",
        "checkpoint.every_minutes=0",
    ]


def test_a_live_folder_is_refused_and_a_killed_owners_folder_is_taken_over(tmp_path: Path) -> None:
    manifest = shard_set(tmp_path / "data", [20, 12])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    work = tmp_path / "work"  # the runs/ folder is relative to where the command runs
    work.mkdir()
    first = subprocess.Popen(
        command(manifest, 100_000),
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not list((work / "runs").glob("*/checkpoints/step*")):
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "no checkpoint from the first run"
            time.sleep(0.2)
        (run,) = (work / "runs").iterdir()
        assert run.name.startswith("coatnet_debug-") and (run / "owner.json").exists()

        second = run_bounded(command(manifest, 100_000), work, env)
        assert second.returncode == 6, second.stderr[-3000:]  # EXIT_FOLDER_BUSY
        assert first.poll() is None  # refused while the owner runs, not after it
        refusal = [line for line in second.stderr.splitlines() if "run folder in use" in line]
        assert refusal and f"is in use by another run (pid {first.pid} on " in refusal[0]
        assert "leave train.run_dir at auto" in refusal[0]
        assert not (run / "exit_reason.json").exists()  # wrote nothing into the owner's folder

        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        stop_tree(first)
    newest = int(list_checkpoints(run / "checkpoints")[-1].name[4:])
    # The same experiment, extended to two steps past its newest checkpoint: same folder.
    third = run_bounded(command(manifest, newest + 2), work, env)
    assert third.returncode == 0, third.stderr[-3000:]
    log = third.stdout + third.stderr
    assert f"taking over the run folder from pid {first.pid} on " in log
    assert f"its process {first.pid} on " in log and "is gone" in log
    assert "resumed from" in log
    assert [p.name for p in (work / "runs").iterdir()] == [run.name]
    assert not (run / "owner.json").exists()  # released at the end
