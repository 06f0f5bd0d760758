"""Forward+backward time of our CoAtNet-0 against timm's `coatnet_0_224`, same process, CPU.

    python bench/model_step.py [--batch-size 8] [--image-size 224] [--repeats 5] [--threads 2]
    python bench/model_step.py --device cuda --dtype bf16 --batch-size 64   # on a GPU

Three models, each timed for `repeats` steps after one warm-up step, in the order A B C then
C B A; the median over both passes is reported:
- baseline: timm `coatnet_0_224` (strided depthwise conv, 2x2 average pools, LN + pre-logits head);
- ours at timm's switches (`mbconv_stride=dwconv`, `mbconv_pool=avg`, `attn_pool=avg`): the same
  architecture, checked here to have the same parameter count and the same MACs;
- ours at the paper's defaults (Eq. (5) stride on the 1x1 expansion, max pool in attention).

A training step is zero_grad + forward + cross-entropy + backward, train mode, in fp32 or with
every model cast to bf16/fp16 (what DeepSpeed's bf16/fp16 modes run). Inference is a no_grad
forward in eval mode. Prints ratios (ours / timm; the goal is <= 0.85 for training) and merges
them into bench/results.json under "model_step" (CPU fp32) or "model_step_<device>_<dtype>".
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
from torch.nn.attention import sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.common import cpu_name, record_result
from coatnet_scale.models import ModelConfig, build_model
from coatnet_scale.models.layers import BIAS_GRAD_KERNELS


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
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
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
    models = {name: build().to(device=device, dtype=dtype) for name, build in builders.items()}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    macs = {n: forward_macs(build(), args.image_size) for n, build in builders.items()}
    baseline, same = "timm coatnet_0_224", "ours, timm switches"
    if params[baseline] != params[same] or macs[baseline] != macs[same]:
        raise SystemExit(f"not the same architecture: params {params}, MACs {macs}")

    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.to(dtype)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step(model: torch.nn.Module) -> float:
        sync()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        # timm's attention also passes a bias that needs a gradient: give it the kernels ours
        # uses (left alone, PyTorch may choose cuDNN, which returns no bias gradient)
        with sdpa_kernel(BIAS_GRAD_KERNELS):
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        sync()
        return time.perf_counter() - start

    def infer_step(model: torch.nn.Module) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad(), sdpa_kernel(BIAS_GRAD_KERNELS):
            model(x)
        sync()
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

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {args.threads} threads"
    )
    result = {
        "date": date.today().isoformat(),
        "machine": f"{where}, torch {torch.__version__}, timm {timm.__version__}",
        "setup": f"batch {args.batch_size}, {args.image_size}px, {args.dtype}, "
        f"median of 2x{args.repeats}",
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

    cpu_fp32 = device.type == "cpu" and args.dtype == "fp32"
    record_result("model_step" if cpu_fp32 else f"model_step_{device.type}_{args.dtype}", result)


if __name__ == "__main__":
    main()
