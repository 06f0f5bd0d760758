"""`make gpu-check` (bench/gpu_check.py): on a machine without CUDA it stops at once with one line;
its whole sequence rehearsed on the CPU (--rehearse) runs and reports, so the GPU session that
runs it for real does not find a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.processes import run_bounded

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return run_bounded([sys.executable, str(SCRIPT), *args], REPO, env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it would run")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = gpu_check("--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout.strip().startswith("gpu-check: no usable CUDA device here (")
    assert len(proc.stdout.strip().splitlines()) == 1
    assert time.perf_counter() - start < 60  # no model, no DeepSpeed start
    assert not (tmp_path / "report.json").exists()


def test_the_sequence_rehearsed_on_the_cpu_reports_every_check(tmp_path: Path) -> None:
    proc = gpu_check("--rehearse", "--out", str(tmp_path), "--deadline-s", "1100")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert all(s in ("ok", "skipped") for s in status.values()), status
    assert status["debug fp16"] == "skipped"  # DeepSpeed's CPU accelerator has no fp16
    ok = {c["name"]: c["figures"] for c in report["checks"] if c["status"] == "ok"}
    assert {"debug bf16", "coatnet0 bf16", "ema resume", "compile + checkpointing"} <= set(ok)
    init = ok["identical initial weights, ZeRO-2 vs ZeRO-3"]
    assert init["max_abs_diff"] == 0 and init["same_shapes"] and init["tensors"] > 100
    assert all(row["bias_grad_nonzero"] for row in ok["attention bias gradient"]["calls"])
    assert len(ok["coatnet0 bf16"]["losses"]) == 3 and ok["coatnet0 bf16"]["ranks"] == 2
    assert ok["ema resume"]["val_ema_top1"] >= 0
    assert [r["device"] for r in ok["debug bf16"]["rank_report"]] == ["cpu", "cpu"]
    assert len(ok["planner --check bf16"]["policies"]) == 6
    tests = ok["tests marked cuda"]  # run, and skipped here with the reason
    assert tests["skipped"] >= 6 and not tests.get("passed") and not tests.get("failed")
    markdown = (tmp_path / "report.md").read_text()
    assert "| check | status |" in markdown
    assert "losses:" in markdown  # lists of plain values are in the markdown too
    # each rank's device, CPU affinity and free memory on the console
    assert "rank 0 on " in proc.stdout and "rank 1 on " in proc.stdout


def test_checks_that_run_out_of_time_fail_the_run(tmp_path: Path) -> None:
    proc = gpu_check("--rehearse", "--out", str(tmp_path), "--deadline-s", "5")
    assert proc.returncode == 1, proc.stdout[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    not_run = [c for c in report["checks"] if "out of time" in c.get("error", "")]
    assert not_run and all(c["status"] == "failed" for c in not_run)
    assert "gpu-check: FAILED: environment" in proc.stdout
