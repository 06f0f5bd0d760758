"""The planner's predicted peak memory of a training step against the measured peak, on CPU.

    python bench/planner_accuracy.py [--threads 2]

For CoAtNet-0, CoAtNet-1 and the debug model, each at two resolutions, without checkpointing and
with every block checkpointed: one fp32 AdamW training step in this process, its peak measured
with `coatnet_scale.memory.track_allocations` (model states at the start of the step plus the
peak of what the step allocates) and predicted by `plan.memory.step_peak` from
`models/footprint.py`. The ratio predicted / measured is the figure; goal (issue 7): within
0.85-1.15. The same check runs on any machine with `python -m coatnet_scale.plan --check B`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import cpu_name, record_result
from coatnet_scale.models import STAGE_NAMES, ModelConfig
from coatnet_scale.plan.check import measure_step_peak

CASES = [
    ("coatnet_debug", 128, 16),
    ("coatnet_debug", 224, 16),
    ("coatnet0", 128, 4),
    ("coatnet0", 224, 4),
    ("coatnet1", 128, 4),
    ("coatnet1", 224, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    print(f"{'case':<36}{'measured MiB':>14}{'predicted MiB':>15}{'ratio':>8}  peak during")
    for name, size, batch in CASES:
        for policy, stages in (("none", ()), ("all", STAGE_NAMES)):
            r = measure_step_peak(ModelConfig(name=name, image_size=size), batch, stages)
            key = f"{name} {size}px b{batch} ckpt={policy}"
            rows[key] = {
                "measured_mib": round(r.measured_peak / 2**20, 1),
                "predicted_mib": round(r.predicted_peak / 2**20, 1),
                "predicted_vs_measured": round(r.ratio, 3),
            }
            print(
                f"{key:<36}{r.measured_peak / 2**20:>14.1f}{r.predicted_peak / 2**20:>15.1f}"
                f"{r.ratio:>8.3f}  {r.predicted_at}",
                flush=True,
            )
    ratios = [row["predicted_vs_measured"] for row in rows.values()]
    record_result(
        "planner_accuracy",
        {
            "date": date.today().isoformat(),
            "machine": f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}",
            "setup": "fp32 AdamW training step, math attention (CPU), one process",
            "cases": rows,
            "worst_ratio": max(ratios, key=lambda x: abs(x - 1)),
        },
    )


if __name__ == "__main__":
    main()
