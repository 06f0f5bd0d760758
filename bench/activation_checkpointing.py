"""Activation checkpointing: peak memory and step time per policy, against no checkpointing.

    python bench/activation_checkpointing.py [--model coatnet1] [--image-size 224]
        [--batch-size 16] [--repeats 3] [--threads 2]

One process, fp32, AdamW, a full training step (forward, cross-entropy, backward, update). For
each policy of `coatnet_scale.plan.POLICIES` (none, stem+s1, stem..s2, stem..s3, all blocks):
- peak memory of the step: model states alive at its start plus the peak of the tensors
  allocated during it (`coatnet_scale.memory.track_allocations`, the profiler's CPU allocation
  events), next to the planner's prediction;
- step time: median of `repeats` steps after a warm-up, without the profiler; the policies take
  turns step by step (forward, then reversed order) so that the machine's drift hits all alike.
Ratios are against the no-checkpointing step of the same run. Goal (issue 7): full block
checkpointing <= 0.40x the memory and <= 1.35x the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench.common import cpu_name, record_result
from coatnet_scale.models import ModelConfig, build_model
from coatnet_scale.plan import POLICIES
from coatnet_scale.plan.check import measure_step_peak


def step_seconds(
    cfg: ModelConfig, batch: int, policies: dict[str, tuple[str, ...]], repeats: int
) -> dict[str, float]:
    """Median step time per policy. All models live at once and take turns, one step each, in
    forward then reversed order, so slow drift of this shared machine hits every policy alike."""
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    labels = torch.randint(0, cfg.num_classes, (batch,))
    runs = {}
    for name, stages in policies.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if stages:
            model.set_grad_checkpointing(True, stages)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False))

    def step(name: str) -> float:
        model, optimizer = runs[name]
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    for name in runs:
        step(name)  # warm-up; creates AdamW's moments
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(step(name))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coatnet1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name=args.model, image_size=args.image_size)

    rows = {}
    for name, stages in POLICIES.items():
        peak = measure_step_peak(cfg, args.batch_size, stages)
        rows[name] = {
            "measured_peak_mib": round(peak.measured_peak / 2**20, 1),
            "predicted_peak_mib": round(peak.predicted_peak / 2**20, 1),
        }
        print(f"{name}: {rows[name]}", flush=True)
    for name, seconds in step_seconds(cfg, args.batch_size, POLICIES, args.repeats).items():
        rows[name]["step_s"] = round(seconds, 3)
    base = rows["none"]
    for row in rows.values():
        row["memory_vs_none"] = round(row["measured_peak_mib"] / base["measured_peak_mib"], 3)
        row["time_vs_none"] = round(row["step_s"] / base["step_s"], 3)
        row["predicted_vs_measured"] = round(
            row["predicted_peak_mib"] / row["measured_peak_mib"], 3
        )
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}",
        "setup": f"{args.model} {args.image_size}px, batch {args.batch_size}, fp32 AdamW step, "
        f"median of {args.repeats}",
        "policies": rows,
    }
    print(f"{result['machine']}; {result['setup']}")
    print(f"{'policy':<10}{'peak MiB':>10}{'x none':>8}{'predicted':>11}{'step s':>9}{'x none':>8}")
    for name, row in rows.items():
        print(
            f"{name:<10}{row['measured_peak_mib']:>10.0f}{row['memory_vs_none']:>8.2f}"
            f"{row['predicted_vs_measured']:>11.3f}{row['step_s']:>9.2f}{row['time_vs_none']:>8.2f}"
        )
    record_result("activation_checkpointing", result)


if __name__ == "__main__":
    main()
