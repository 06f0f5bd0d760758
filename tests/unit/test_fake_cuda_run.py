"""The training loop on a mocked 8-GPU node as local rank 5 (fake_cuda_run.py): the rank binds
GPU 5 before the process group starts, and every tensor the loop asks for on a GPU is asked for
on GPU 5, the restored EMA included."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.data.conftest import debug_data
from tests.processes import run_bounded

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fake_cuda")
    data = debug_data(tmp)
    proc = run_bounded(
        [sys.executable, str(REPO / "tests" / "unit" / "fake_cuda_run.py"), str(tmp), str(data)],
        REPO,
        {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((tmp / "report.json").read_text())


def test_rank_5_binds_gpu_5_before_the_process_group_starts(report) -> None:
    assert report["set_device"] == [5, 5]  # once per run, as the first thing
    assert report["current_at_init"] == [5, 5]  # current when DeepSpeed starts the group
    assert report["local_rank_at_init"] == ["5", "5"]  # what DeepSpeed reads as its device


def test_no_tensor_of_the_loop_is_asked_for_on_another_gpu(report) -> None:
    requested = report["requested"]
    assert set(requested) == {"cuda:5"}, requested  # never cuda:0, the old default
    # per micro-batch at least the images, labels and valid mask go to the device
    assert requested["cuda:5"] >= 3 * report["train_micro_batches"]


def test_a_training_step_copies_its_batches_without_waiting_and_builds_no_constants(
    report,
) -> None:
    """Inside an optimizer step the device is asked for exactly the batch's images, labels and
    valid mask of each micro-batch, each a non-blocking copy; the normalisation constants are
    not rebuilt (`torch.tensor(..., device=)`) and nothing waits on a blocking copy."""
    steps = report["step_calls"]
    assert len(steps) == 3  # 2 steps, then 1 more after the resume
    for calls in steps:
        micro = calls.pop("micro_batches")
        assert calls == {"to non_blocking": 3 * micro}, calls


def test_memory_is_read_on_the_ranks_gpu(report) -> None:
    assert report["memory_asked_on"] and set(report["memory_asked_on"]) == {5}


def test_forward_passes_are_timed_on_the_ranks_gpu(report) -> None:
    """The straggler report's CUDA events (stragglers.DeviceForwardClock)."""
    assert report["events_recorded_on"] and set(report["events_recorded_on"]) == {5}


def test_the_restored_ema_and_rng_land_on_the_ranks_gpu(report) -> None:
    [(moved, tensors)] = report["ema_load_requests"]  # the second run resumed with EMA
    assert tensors > 0 and moved == tensors
    assert report["cuda_rng_restored_on"] == [5]  # the resume, with GPU 5 current


def test_the_rank_reports_its_device(report) -> None:
    [rank] = report["ranks"]
    assert rank["device"] == "cuda:5" and rank["gpu_uuid"] == "GPU-fake-5"
    assert rank["gpu_free_gib"] == 70.0 and rank["cpus"]
