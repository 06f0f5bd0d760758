"""Forward+backward time of our CoAtNet-0 against timm's `coatnet_0_224`, same process, CPU.

    python bench/model_step.py [--batch-size 8] [--image-size 224] [--repeats 5] [--threads 2]

Three models, each timed for `repeats` steps after one warm-up step, in the order A B C then
C B A; the median over both passes is reported:
- baseline: timm `coatnet_0_224` (strided depthwise conv, 2x2 average pools, LN + pre-logits head);
- ours at timm's switches (`mbconv_stride=dwconv`, `mbconv_pool=avg`, `attn_pool=avg`): the same
  architecture, checked here to have the same parameter count and the same MACs;
- ours at the paper's defaults (Eq. (5) stride on the 1x1 expansion, max pool in attention).

A training step is zero_grad + forward + cross-entropy + backward in fp32, train mode. Inference
is a no_grad forward in eval mode. Prints ratios (ours / timm; the goal is <= 0.85 for training)
and merges them into bench/results.json under "model_step".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import cpu_name, record_result
from coatnet_scale.models import ModelConfig, build_model


def forward_macs(model: torch.nn.Module, image_size: int) -> int:
    with torch.device("meta"):
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.to("meta")(x)
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    timm_switches = dict(mbconv_stride="dwconv", mbconv_pool="avg", attn_pool="avg")
    builders = {
        "timm coatnet_0_224": lambda: timm.create_model("coatnet_0_224", img_size=args.image_size),
        "ours, timm switches": lambda: build_model(
            ModelConfig(name="coatnet0", image_size=args.image_size, **timm_switches)
        ),
        "ours, paper Eq. 5": lambda: build_model(
            ModelConfig(name="coatnet0", image_size=args.image_size)
        ),
    }
    models = {name: build() for name, build in builders.items()}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    macs = {n: forward_macs(build(), args.image_size) for n, build in builders.items()}
    baseline, same = "timm coatnet_0_224", "ours, timm switches"
    if params[baseline] != params[same] or macs[baseline] != macs[same]:
        raise SystemExit(f"not the same architecture: params {params}, MACs {macs}")

    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def train_step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - start

    def infer_step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        return time.perf_counter() - start

    # Each model runs its steps back to back (interleaving models step by step makes the
    # allocator hand every model memory freshly returned by another, which adds page faults that
    # belong to no model); the order is then reversed, so slow drift of the machine hits all alike.
    timings: dict[str, dict[str, list[float]]] = {"train": {}, "infer": {}}
    order = list(models)
    for mode, step in (("train", train_step), ("infer", infer_step)):
        for names in (order, order[::-1]):
            for name in names:
                model = models[name].train(mode == "train")
                step(model)  # warm-up
                timings[mode].setdefault(name, []).extend(step(model) for _ in range(args.repeats))

    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
        f"timm {timm.__version__}",
        "setup": f"batch {args.batch_size}, {args.image_size}px, fp32, median of 2x{args.repeats}",
        "params": params,
        "gmacs_per_image": {n: round(m / 1e9, 3) for n, m in macs.items()},
        "seconds": {},
        "ratio_vs_timm": {},
    }
    print(f"{result['machine']}; {result['setup']}")
    print(
        f"{'model':<22}{'params':>12}{'GMACs':>8}{'train s':>9}{'ratio':>7}"
        f"{'infer s':>9}{'ratio':>7}"
    )
    for name in models:
        row = {}
        for mode in ("train", "infer"):
            median = statistics.median(timings[mode][name])
            row[mode] = median
            result["seconds"][f"{mode}/{name}"] = round(median, 4)
        base = {mode: statistics.median(timings[mode][baseline]) for mode in ("train", "infer")}
        ratios = {mode: row[mode] / base[mode] for mode in row}
        for mode, ratio in ratios.items():
            result["ratio_vs_timm"][f"{mode}/{name}"] = round(ratio, 3)
        print(
            f"{name:<22}{params[name]:>12,}{macs[name] / 1e9:>8.2f}{row['train']:>9.3f}"
            f"{ratios['train']:>7.2f}{row['infer']:>9.3f}{ratios['infer']:>7.2f}"
        )

    record_result("model_step", result)


if __name__ == "__main__":
    main()
