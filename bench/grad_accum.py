"""How far bf16 gradient accumulation drifts from fp32 accumulation (debug model, CPU).

    python bench/grad_accum.py [--micro-batches 16] [--micro-batch 8] [--image-size 64]

The per-micro-batch gradients are computed once, by the model cast to bf16 (what DeepSpeed's bf16
mode runs), then summed three ways over the micro-batches: in bf16, as `param.grad` accumulates
them when DeepSpeed keeps bf16 accumulation (ZeRO-0; ZeRO 1-3 without `data_types`); in fp32, as
the bf16 runs of `coatnet_scale` do under ZeRO 1-3 (`engine.fp32_gradient_accumulation`); and in
fp64 as the reference. The same gradients, so the difference is the accumulation alone. For scale,
the error of the bf16 micro-batch gradients themselves (against the fp32 model on the same data)
is reported too. Relative L2 error over all parameters, and the worst parameter tensor.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import cpu_name, record_result
from coatnet_scale.models import ModelConfig, build_model


def gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images).float(), labels).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """(over all parameters, worst tensor) of |got - want| / |want| in L2."""
    diff = sum(float((g.double() - w).pow(2).sum()) for g, w in zip(got, want, strict=True))
    norm = sum(float(w.pow(2).sum()) for w in want)
    worst = max(
        float((g.double() - w).norm() / w.norm().clamp_min(1e-30))
        for g, w in zip(got, want, strict=True)
    )
    return (diff / norm) ** 0.5, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    cfg = ModelConfig(name="coatnet_debug", image_size=args.image_size, num_classes=10)
    fp32 = build_model(cfg).train()
    bf16 = build_model(cfg).train()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    shape = (args.micro_batch, 3, args.image_size, args.image_size)

    sum_bf16 = sum_fp32 = sum_ref = sum_fp32_model = None
    for _ in range(args.micro_batches):
        images, labels = torch.randn(shape), torch.randint(0, 10, (args.micro_batch,))
        low = gradients(bf16, images.to(torch.bfloat16), labels)
        high = gradients(fp32, images, labels)
        if sum_ref is None:
            sum_bf16 = [g.clone() for g in low]
            sum_fp32 = [g.float() for g in low]
            sum_ref = [g.double() for g in low]
            sum_fp32_model = [g.double() for g in high]
        else:
            for acc, g in zip(sum_bf16, low, strict=True):
                acc.add_(g)  # bf16 + bf16, rounded to bf16: `param.grad` accumulation
            for acc, g in zip(sum_fp32, low, strict=True):
                acc.add_(g.float())
            for acc, g in zip(sum_ref, low, strict=True):
                acc.add_(g.double())
            for acc, g in zip(sum_fp32_model, high, strict=True):
                acc.add_(g.double())

    bf16_accum = relative_error(sum_bf16, sum_ref)
    fp32_accum = relative_error(sum_fp32, sum_ref)
    compute = relative_error(sum_ref, sum_fp32_model)
    print(
        f"{args.micro_batches} micro-batches of {args.micro_batch} at {args.image_size} px, "
        "debug model; relative L2 error (all parameters / worst tensor):"
    )
    print(
        f"  bf16 accumulation vs exact sum of the bf16 gradients: {bf16_accum[0]:.2e} / "
        f"{bf16_accum[1]:.2e}"
    )
    print(
        f"  fp32 accumulation vs exact sum of the bf16 gradients: {fp32_accum[0]:.2e} / "
        f"{fp32_accum[1]:.2e}"
    )
    print(
        f"  bf16 gradients (exact sum) vs the fp32 model's:        {compute[0]:.2e} / "
        f"{compute[1]:.2e}"
    )
    print(f"  bf16 accumulation adds {bf16_accum[0] / compute[0]:.2f}x the bf16 compute error")
    record_result(
        "grad_accum",
        {
            "date": date.today().isoformat(),
            "machine": cpu_name(),
            "micro_batches": args.micro_batches,
            "bf16_accumulation_error": bf16_accum[0],
            "bf16_accumulation_worst_tensor": bf16_accum[1],
            "fp32_accumulation_error": fp32_accum[0],
            "bf16_compute_error": compute[0],
        },
    )


if __name__ == "__main__":
    main()
