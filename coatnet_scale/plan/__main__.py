"""`python -m coatnet_scale.plan`: the planner's table, its recommendation and a config overlay.

    python -m coatnet_scale.plan --model coatnet6 --image-size 224 --global-batch 4096 \\
        --nodes 8 --gpus-per-node 8 --gpu h100-80gb [--emit plan.yaml]
    python -m coatnet_scale.plan --model coatnet1 --image-size 224 --check 16

`--emit` writes the recommended configuration as a YAML overlay:
`deepspeed launch/pretrain.py --model coatnet6 --config configs/coatnet6.yaml --config plan.yaml`.
`--check B` measures a training step at micro-batch B on this machine (CPU, or the first GPU)
for each checkpointing policy and prints measured vs predicted peak memory, in `--dtype` (bf16 by
default: on a GPU, the memory-efficient attention kernel a bf16 run uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from coatnet_scale.models import ModelConfig
from coatnet_scale.plan import (
    GIB,
    POLICIES,
    PRESETS,
    Candidate,
    Cluster,
    overlay,
    plan,
    recommend,
)
from coatnet_scale.plan.input import input_line

STAGE_COLUMNS = ("stem", "s1", "s2", "s3", "s4")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m coatnet_scale.plan", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="coatnet0", help="coatnet0..coatnet7 or coatnet_debug")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--global-batch", type=int, default=4096, help="images per optimizer step")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(PRESETS), help="device preset")
    p.add_argument("--gpu-memory-gb", type=float, help="override: device memory (GB)")
    p.add_argument("--peak-tflops", type=float, help="override: dense bf16 TFLOP/s per device")
    p.add_argument("--memory-bandwidth-tbs", type=float, help="override: HBM TB/s per device")
    p.add_argument("--intra-node-gbs", type=float, help="override: NVLink GB/s per device")
    p.add_argument("--inter-node-gbs", type=float, help="override: network GB/s per device")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--zero-stages", default="1,2,3", help="ZeRO stages to compare")
    p.add_argument("--offload-optimizer", action="store_true", help="ZeRO-Offload (CPU Adam)")
    p.add_argument("--reduce-bucket", type=int, default=500_000_000, help="zero.reduce_bucket_size")
    p.add_argument("--top", type=int, default=15, help="rows to print (0: all)")
    p.add_argument("--emit", type=Path, help="write the recommended configuration as YAML overlay")
    p.add_argument("--check", type=int, metavar="B", help="measure peaks at micro-batch B here")
    p.add_argument(
        "--images-per-core",
        type=float,
        help="input pipeline img/s per CPU core with data.decode=cpu (bench/data_pipeline.py)",
    )
    return p.parse_args(argv)


def cluster_from(args: argparse.Namespace) -> Cluster:
    hw = PRESETS[args.gpu]
    overrides = {
        "memory_bytes": args.gpu_memory_gb and int(args.gpu_memory_gb * 1e9),
        "peak_flops": args.peak_tflops and args.peak_tflops * 1e12,
        "memory_bandwidth": args.memory_bandwidth_tbs and args.memory_bandwidth_tbs * 1e12,
        "intra_node_bandwidth": args.intra_node_gbs and args.intra_node_gbs * 1e9,
        "inter_node_bandwidth": args.inter_node_gbs and args.inter_node_gbs * 1e9,
    }
    hw = dataclasses.replace(hw, **{k: v for k, v in overrides.items() if v})
    return Cluster(args.nodes, args.gpus_per_node, hw)


def table(candidates: Sequence[Candidate], top: int) -> str:
    """The candidates as a markdown table (GiB per device, seconds, images/s per device)."""
    head = (
        "| ZeRO | checkpointing | micro | accum | params GiB | grads GiB | optimizer GiB | "
        "buffers GiB | activations GiB (stem/s1/s2/s3/s4/head) | peak GiB | fits | TMACs/step | "
        "comm GB/step | step s | img/s/GPU | MFU | limited by |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in candidates[: top or None]:
        acts = "/".join(
            f"{c.memory.activations_by_stage.get(s, 0) / GIB:.1f}" for s in (*STAGE_COLUMNS, "head")
        )
        rows.append(
            f"| {c.zero_stage} | {c.policy} | {c.micro_batch} | {c.micro_steps} | "
            f"{c.states.params / GIB:.2f} | {c.states.grads / GIB:.2f} | "
            f"{c.states.optimizer / GIB:.2f} | {c.buffers / GIB:.2f} | {acts} | "
            f"{c.memory_bytes / GIB:.1f} | {'yes' if c.fits else 'no'} | "
            f"{c.macs_per_step / 1e12:.1f} | {c.time.comm_bytes / 1e9:.1f} | {c.time.step_s:.3f} | "
            f"{c.images_per_s:.0f} | {c.mfu:.0%} | {c.time.bound} |"
        )
    return "\n".join(rows)


def check(model: ModelConfig, batch: int, dtype: str) -> str:
    import torch

    from coatnet_scale.plan.check import measure_step_peak

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"measured vs predicted peak of one {dtype} training step, {model.name} at "
        f"{model.image_size}px, batch {batch}, on {device}",
        "| checkpointing | measured MiB | predicted MiB | predicted / measured |",
        "|---|---|---|---|",
    ]
    for name, stages in POLICIES.items():
        r = measure_step_peak(model, batch, stages, device, dtype)
        lines.append(
            f"| {name} | {r.measured_peak / 2**20:.0f} | {r.predicted_peak / 2**20:.0f} | "
            f"{r.ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Candidate | None:
    args = parse_args(argv)
    model = ModelConfig(name=args.model, image_size=args.image_size)
    model.validate()
    if args.check:
        print(check(model, args.check, args.dtype))
        return None
    cluster = cluster_from(args)
    try:
        candidates = plan(
            model,
            cluster,
            args.global_batch,
            args.dtype,
            zero_stages=[int(s) for s in args.zero_stages.split(",")],
            offload_optimizer=args.offload_optimizer,
            reduce_bucket=args.reduce_bucket,
        )
    except ValueError as err:
        print(f"plan error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    hw = cluster.hardware
    print(
        f"{model.name} at {model.image_size}px, global batch {args.global_batch}, "
        f"{cluster.nodes} x {cluster.gpus_per_node} {hw.name} ({hw.memory_bytes / 1e9:.0f} GB, "
        f"{hw.peak_flops / 1e12:.0f} TFLOP/s, {hw.memory_bandwidth / 1e12:.2f} TB/s, "
        f"network {hw.inter_node_bandwidth / 1e9:.0f} GB/s per GPU), {args.dtype}"
    )
    print(table(candidates, args.top))
    best = recommend(candidates)
    if best is None:
        print("nothing fits: add devices, lower the resolution or enable --offload-optimizer")
        return None
    print(
        f"recommended: ZeRO-{best.zero_stage}, checkpointing {best.policy}, micro-batch "
        f"{best.micro_batch} x {best.micro_steps} accumulation steps: "
        f"{best.memory_bytes / GIB:.1f} GiB per GPU, {best.images_per_s:.0f} img/s per GPU, "
        f"MFU {best.mfu:.0%}, limited by {best.time.bound}"
    )
    print(input_line(best.images_per_s, args.images_per_core))
    if args.emit:
        text = yaml.safe_dump(overlay(best, model, args.global_batch, args.dtype), sort_keys=False)
        args.emit.write_text(
            f"# python -m coatnet_scale.plan {' '.join(argv or sys.argv[1:])}\n{text}"
        )
        print(f"wrote {args.emit}")
    return best


if __name__ == "__main__":
    main()
