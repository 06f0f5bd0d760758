"""What loss-spike rollback costs a run that never spikes: the in-memory snapshots.

    python bench/snapshot_cost.py [--steps 60] [--every 5]

Trains CoAtNet-0 on the demo digits (single process, CPU, ZeRO-2 fp32, `configs/demo.yaml`)
twice in this script, without and with `spike.rollback` (a snapshot every `--every` steps), and
compares the training throughput the runs log (img/s over the steps after the first log
interval). The snapshot's copy happens inside the step loop, so it shows in img/s; the ratio is
the cost at that cadence, and scales with 1/`every` (the default cadence is 50).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def throughput(run: Path, steps: int, every: int, rollback: bool) -> float:
    command = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--model",
        "coatnet0",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"train.total_steps={steps}",
        "train.eval_every=0",
        "logging.log_every=10",
        "logging.wandb_mode=disabled",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0",
        "data.num_workers=1",
        f"spike.rollback={str(rollback).lower()}",
        f"spike.snapshot_every={every}",
        f"train.run_dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in records if "img_per_s" in r][1:]  # the first: warm-up
    return statistics.fmean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = throughput(Path(tmp) / "off", args.steps, args.every, False)
        on = throughput(Path(tmp) / "on", args.steps, args.every, True)
    ratio = on / off
    print(f"img/s without rollback {off:.1f}, with a snapshot every {args.every} steps {on:.1f}")
    print(f"ratio {ratio:.3f}: about {(1 - ratio) * args.every / 50:.1%} at the default cadence")


if __name__ == "__main__":
    main()
