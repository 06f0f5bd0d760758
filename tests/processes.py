"""Launching training processes from tests without leaving anything behind.

A timeout is a guard against a hang, never a speed limit: it is generous, and when it fires the
test shows where every process of the launch was stuck. `subprocess.run(timeout=...)` kills only
the launcher; its ranks (torchrun starts them in their own sessions) lived on, held their ports
and CPU, and made the next tests fail too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

HANG_S = 1800  # a launch that takes this long on 2 cores has hung (the largest takes ~80 s)
# `launch/pretrain.py` on the debug model: 32 px, 3 classes, fp32, no evaluation
DEBUG_PRETRAIN = [
    "launch/pretrain.py",
    "--model",
    "coatnet_debug",
    "--config",
    "configs/debug.yaml",
    "model.image_size=32",
    "model.num_classes=3",
    "precision.dtype=fp32",
    "train.eval_every=0",
]


def deepspeed_shm_files() -> set[Path]:
    """DeepSpeed's CPU all-reduce files of this user in /dev/shm (66 MB each, RAM)."""
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


def stop_tree(proc: subprocess.Popen) -> None:
    """Ask `proc` and all its descendants for their Python stacks (faulthandler on SIGABRT),
    then kill them all."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGABRT)
    time.sleep(3)
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def run_bounded(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = HANG_S
) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True)`; a launch still running after
    `timeout` seconds fails the test with the stacks of its processes, and none survive it."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(args[:4])} ... still ran after {timeout:.0f} s; the stacks of its "
            f"processes:\n{err[-12000:]}\n{out[-3000:]}"
        )
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
