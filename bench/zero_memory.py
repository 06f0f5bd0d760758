"""ZeRO 1/2/3: each rank's resident model-state memory, measured with 2 ranks, against the ZeRO
formulas and DeepSpeed's own estimators.

    python bench/zero_memory.py [--model coatnet0] [--dtype bf16] [--out FILE]

Starts `deepspeed --num_gpus 2` on this script (CPU accelerator, gloo). Each rank, for stages
1, 2 and 3 in turn, builds the model and the engine exactly as training does
(`distributed.engine.build_sharded_model` / `build_engine`, ZeRO-3 under zero.Init), with two
micro-batches per optimizer step, runs one optimizer step and the first micro-batch of the next,
and reports the tensor bytes allocated since just before the model was built and still alive at
that point (`coatnet_scale.memory.track_allocations`): mid-accumulation, when all model states
exist at once (parameters, accumulated gradients or their partitions, fp32 master weights, Adam
moments; the activations are freed by then). Gradient buckets are set small (1e5 elements) so
they do not blur the figure. Compared with `plan.memory.model_states` (the ZeRO paper: 4Ψ+12Ψ/N,
2Ψ+14Ψ/N, 16Ψ/N) and DeepSpeed's
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (DeepSpeed has
none for ZeRO-1). Ratios are measured / predicted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = (1, 2, 3)


def deepspeed_estimate(params: int, largest_layer: int, stage: int, world: int) -> float | None:
    """DeepSpeed's device-memory estimate for model states (no offload), or None (ZeRO-1)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(params, world, 1, cpu_offload=False)[1]
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(
            params, largest_layer, world, 1, cpu_offload=False, cpu_offload_params=False
        )[1]
    return None


def largest_layer_params(model) -> int:
    """DeepSpeed's "largest layer": the module with the most parameters of its own."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def worker(model_name: str, dtype: str, image_size: int, out: Path) -> None:
    """One rank: measure each stage's resident model states."""
    import torch
    import torch.distributed as dist

    from coatnet_scale.cli import config_parser, parse_config_args
    from coatnet_scale.distributed.engine import (
        build_engine,
        build_sharded_model,
        init_process_group,
        to_deepspeed_config,
    )
    from coatnet_scale.distributed.env import dist_env
    from coatnet_scale.memory import track_allocations
    from coatnet_scale.models import build_model
    from coatnet_scale.plan.memory import model_states
    from coatnet_scale.train import DTYPES

    env = dist_env()
    results = {}
    for stage in STAGES:
        overrides = [
            f"zero.stage={stage}",
            f"precision.dtype={dtype}",
            f"model.image_size={image_size}",
            "train.global_batch_size=8",  # 2 micro-batches per step
            "train.micro_batch_size=2",
            "zero.reduce_bucket_size=100000",
        ]
        cfg, _ = parse_config_args(["--model", model_name, *overrides], config_parser("bench"))
        if stage == STAGES[0]:
            device = init_process_group(cfg, env).device
        ds_config = to_deepspeed_config(cfg, env.world_size)
        images = torch.randn(2, 3, image_size, image_size, dtype=DTYPES[dtype])
        labels = torch.randint(0, cfg.model.num_classes, (2,))
        gc.collect()
        with track_allocations() as allocations:
            engine = build_engine(
                build_sharded_model(cfg.model, stage, ds_config, device), cfg, ds_config
            )
            for micro in range(3):  # one optimizer step, then stop after the next micro-batch
                loss = torch.nn.functional.cross_entropy(engine(images).float(), labels)
                engine.backward(loss)
                if micro < 2:
                    engine.step()
            del loss
            gc.collect()
        meta = build_model(cfg.model, "meta")
        params = sum(p.numel() for p in meta.parameters())
        formula = model_states(params, stage, env.world_size, dtype).total
        estimate = deepspeed_estimate(params, largest_layer_params(meta), stage, env.world_size)
        results[stage] = {
            "measured": allocations.net_bytes,
            "formula": formula,
            "deepspeed_estimator": estimate,
            "params": params,
            "largest_alive_mib": [round(x / 2**20, 2) for x in allocations.alive[:8]],
        }
        engine.step()
        engine.destroy()
        del engine
        gc.collect()
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, results)
    if env.rank == 0:
        out.write_text(json.dumps(gathered))


def run(model: str, dtype: str, image_size: int) -> list[dict]:
    """Launch the 2-rank measurement; per rank, per stage: measured / formula / estimator bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero_memory.json"
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", "2", "--master_port", "29517", __file__, "--worker"]
        cmd += ["--model", model, "--dtype", dtype, "--image-size", str(image_size)]
        cmd += ["--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coatnet0")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.dtype, args.image_size, args.out)
        return

    from bench.common import cpu_name, record_result

    ranks = run(args.model, args.dtype, args.image_size)
    mib = 2**20
    rows = {}
    print(f"{args.model}, {args.dtype}, 2 ranks: model states per rank after a backward pass")
    header = ("stage", "rank", "measured MiB", "formula", "ratio", "DS est.")
    print("".join(f"{h:>13}" for h in (*header, "ratio")))
    for rank, stages in enumerate(ranks):
        for stage, r in stages.items():
            est = r["deepspeed_estimator"]
            row = {
                "measured_mib": r["measured"] / mib,
                "formula_mib": r["formula"] / mib,
                "measured_vs_formula": r["measured"] / r["formula"],
                "deepspeed_estimator_mib": est and est / mib,
                "measured_vs_estimator": est and r["measured"] / est,
            }
            rows[f"zero{stage}/rank{rank}"] = {k: v and round(v, 3) for k, v in row.items()}
            cells = [stage, rank, *(f"{v:.3f}" if v else "-" for v in row.values())]
            print("".join(f"{c:>13}" for c in cells))
    record_result(
        "zero_memory",
        {
            "date": date.today().isoformat(),
            "machine": f"{cpu_name()}, 2 ranks (gloo), DeepSpeed CPU accelerator",
            "setup": f"{args.model} ({ranks[0]['1']['params']:,} params), {args.dtype}",
            "per_rank": rows,
        },
    )


if __name__ == "__main__":
    main()
