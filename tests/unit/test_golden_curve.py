"""The golden loss curve: the debug model on the demo digits, through the real entry point and
DeepSpeed, must learn as it did when the curve was recorded (tests/golden/).

The band. Each window of 10 steps has the mean losses of 5 seeds recorded on one machine
(tests/golden/debug_demo.json, `python tests/golden/make_band.py`). A run passes when every
window's mean lies within [min - spread - 0.02, max + spread + 0.02] of those seeds (spread = max -
min). Another CPU (AMD without AVX-512, Intel with it) rounds differently, and after a few dozen
steps a run on it is like a run with another seed; five seeds plus a margin of the whole spread
again cover that: the same run with PyTorch and oneDNN restricted to AVX2 kernels stays inside
(bench/README.md, golden curve). A changed recipe needs a new recording, on purpose.

What it catches, measured: warm-up dropped, or the schedule ignored (a constant peak LR), leaves
the band within the first 40 steps; both are tested below. A weight-decay group mistake (norms,
biases and relative tables decayed too) does not move this curve measurably in 120 steps (at
lr 1e-3 x 0.05 the extra shrinkage is 0.3%): the optimizer-group tests guard that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.make_demo import make_demo
from tests.golden.make_band import BAND_FILE, run_curve


def band() -> list[tuple[float, float]]:
    """(low, high) per window, from the recorded seeds."""
    by_seed = json.loads(BAND_FILE.read_text())["window_means_by_seed"].values()
    bounds = []
    for values in zip(*by_seed, strict=True):
        spread = max(values) - min(values)
        bounds.append((min(values) - spread - 0.02, max(values) + spread + 0.02))
    return bounds


def outside(curve: list[float]) -> list[str]:
    """The windows of `curve` that leave the band, as readable lines."""
    bounds = band()
    assert len(curve) == len(bounds), "the run's length no longer matches the recording"
    return [
        f"steps {10 * i + 1}-{10 * i + 10}: mean loss {value:.3f} outside [{low:.3f}, {high:.3f}]"
        for i, (value, (low, high)) in enumerate(zip(curve, bounds, strict=True))
        if not low <= value <= high
    ]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("golden") / "demo"
    make_demo(data)
    return data


def test_the_debug_model_learns_the_demo_along_the_golden_curve(
    demo_data: Path, tmp_path: Path
) -> None:
    curve = run_curve(demo_data, tmp_path, seed=0)
    assert not outside(curve), "\n".join(outside(curve))
    assert curve[-1] < 0.5 * curve[0]  # and it does learn: the band is not around chance


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["no_warmup", "constant_lr"])
def test_the_band_catches_a_broken_schedule(demo_data: Path, tmp_path: Path, broken: str) -> None:
    """The negative control: a planted regression (tests/golden/run.py --break) fails the band."""
    assert outside(run_curve(demo_data, tmp_path, seed=0, broken=broken))


def test_bad_samples_of_a_run_are_named_summarised_and_in_the_metrics(
    demo_data: Path, tmp_path: Path
) -> None:
    """One of the six train shards overwritten with garbage (its 256 samples bad): the run
    names the first 20, summarises the rest per log interval, counts them in metrics.jsonl and
    goes on (data.max_bad_fraction=0.5)."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "demo"
    shutil.copytree(demo_data, data)
    (data / "train-000002.tar").write_bytes(b"x" * 4096)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "tests/golden/run.py", str(data), str(out), "--seed", "0"]
        + ["train.total_steps=16", "schedule.warmup_steps=2", "logging.log_every=8"]
        + ["data.max_bad_fraction=0.5"],
        capture_output=True,
        text=True,
        check=True,
    )
    log = proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    counts = [r["bad_samples"] for r in records if "bad_samples" in r]
    assert len(counts) == 2 and 20 < counts[0] <= counts[1] < 16 * 64
    assert "bad sample 20: " in log and "bad sample 21: " not in log
    assert "train-000002.tar" in log and "cannot open the shard" in log
    assert "more bad sample(s) on this rank" in log
