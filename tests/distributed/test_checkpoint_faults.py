"""Fault injection: SIGKILL one rank of a real 2-rank DeepSpeed run at random moments while it
saves a checkpoint every step, again and again, resuming each time.

After every kill the run folder must hold only checkpoints that verify (a reader never sees a
half-written one), at least one of them, never an older newest one than before the kill, and
`latest` must name one of them. The last round runs to the end and must resume from the newest
valid checkpoint. The kill moments come from a seeded generator (printed on failure).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from coatnet_scale import checkpoint
from tests.data.conftest import shard_set
from tests.distributed.test_training_2ranks import BIN, REPO
from tests.processes import DEBUG_PRETRAIN, HANG_S, stop_tree

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROUNDS = 6
SEED = 20261121


def start(run: Path, data: Path, total_steps: int) -> subprocess.Popen:
    args = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        *DEBUG_PRETRAIN,
        f"data.train_shards={data}/train.json",
        f"train.total_steps={total_steps}",
        "logging.log_every=1000",
        "checkpoint.every_steps=1",
        "checkpoint.every_minutes=0",
        "checkpoint.keep_last=2",
        "checkpoint.keep_every=4",
        f"train.run_dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def rank_pids(run: Path) -> dict[int, int]:
    """Training processes of this run by rank (the launcher passes --local_rank=R)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "launch/pretrain.py" in args and f"train.run_dir={run}" in args:
            for a in args:
                if a.startswith("--local_rank="):
                    found[int(a.split("=")[1])] = int(proc.name)
    return found


def newest_step(run: Path) -> int:
    committed = checkpoint.list_checkpoints(run / "checkpoints")
    return checkpoint.checkpoint_step(committed[-1]) if committed else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            stop_tree(proc)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.005)


def assert_consistent(run: Path) -> int:
    """Every published checkpoint verifies, `latest` names one; returns the newest step."""
    root = run / "checkpoints"
    committed = checkpoint.list_checkpoints(root)
    assert committed, "no checkpoint survived"
    for ckpt in committed:
        assert checkpoint.verify(ckpt) == [], ckpt
    assert (root / "latest").read_text() in {c.name for c in committed}
    return newest_step(run)


@pytest.mark.timeout(1200)
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data = shard_set(tmp_path / "data", [20, 7, 13]).parent
    run = tmp_path / "run"
    newest, interrupted_saves = 0, 0
    for round_index in range(ROUNDS):
        proc = start(run, data, total_steps=100_000)
        # Wait for this round's first own commit, so a checkpoint always exists before a kill.
        before = newest
        wait_for(lambda before=before: newest_step(run) > before, proc)
        if round_index % 2 == 0:
            # Kill as soon as the next save has begun writing, plus 0-15 ms: inside the save (a
            # save of this model takes ~20 ms on a 2-core CPU, a step ~40 ms; waiting up to 60 ms
            # missed most saves).
            wait_for(lambda: any((run / "checkpoints").glob(".tmp-*")), proc)
            time.sleep(rng.uniform(0.0, 0.015))
        else:
            time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mostly during saves at this cadence
        victim = rng.choice([0, 1])
        pids = rank_pids(run)
        assert victim in pids, f"rank {victim} not found among {pids}"
        os.kill(pids[victim], signal.SIGKILL)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            raise AssertionError(f"round {round_index}: hung after rank {victim} died") from None
        assert proc.returncode != 0
        interrupted_saves += any((run / "checkpoints").glob(".tmp-*"))  # died inside a save
        step = assert_consistent(run)
        assert step >= newest, f"round {round_index} (seed {SEED}): newest went {newest}->{step}"
        newest = step

    # Not vacuous: the kills did land inside saves (half of them are aimed there).
    assert interrupted_saves >= ROUNDS // 3, f"only {interrupted_saves} kills hit a save"

    # The last round runs to the end from the newest valid checkpoint; it cleans up leftovers.
    proc = start(run, data, total_steps=newest + 3)
    try:
        output, _ = proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        raise
    assert proc.returncode == 0, output[-3000:]
    assert f"resumed from {run / 'checkpoints' / checkpoint.step_name(newest)}" in output
    final = assert_consistent(run)
    assert final == newest + 3
    assert not any((run / "checkpoints").glob(".tmp-*"))
    # Retention (keep_last=2, keep_every=4) held through all the kills.
    steps = [
        checkpoint.checkpoint_step(c) for c in checkpoint.list_checkpoints(run / "checkpoints")
    ]
    assert set(steps) - {s for s in steps if s % 4 == 0} <= {final - 1, final}
