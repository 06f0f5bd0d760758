"""Pretrain a CoAtNet: `deepspeed launch/pretrain.py --model coatnet6 [--config F] [k=v ...]`.

Also runs under `torchrun`, `srun` (rank and world from SLURM's variables) and `accelerate
launch`: rank discovery is `coatnet_scale.distributed.env`'s. `--dry-run` prints the plan (model
size, MACs, per-rank memory, generated DeepSpeed config) without allocating weights.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.config import Config
from coatnet_scale.distributed.env import dist_env


def model_state_bytes(params: int, stage: int, world: int, dtype: str) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer states under ZeRO (Rajbhandari et
    al. 2020, Fig. 1): mixed precision keeps 2-byte params and grads plus 12 bytes of fp32 master
    weights and Adam moments per parameter; fp32 keeps 4 + 4 + 8."""
    p_bytes, g_bytes, o_bytes = (4, 4, 8) if dtype == "fp32" else (2, 2, 12)
    shard = {"params": stage >= 3, "grads": stage >= 2, "optim": stage >= 1}
    return {
        "params": params * p_bytes / (world if shard["params"] else 1),
        "grads": params * g_bytes / (world if shard["grads"] else 1),
        "optim": params * o_bytes / (world if shard["optim"] else 1),
    }


def plan_text(cfg: Config, world: int) -> str:
    """The dry-run report: nothing is allocated (the model is built on the meta device)."""
    from coatnet_scale.distributed.engine import to_deepspeed_config
    from coatnet_scale.models import STAGE_NAMES, build_model
    from coatnet_scale.models.flops import activation_bytes_per_image, stage_macs

    model = build_model(cfg.model, "meta")
    params = sum(p.numel() for p in model.parameters())
    macs = stage_macs(cfg.model)
    states = model_state_bytes(params, cfg.zero.stage, world, cfg.precision.dtype)
    element = 4 if cfg.precision.dtype == "fp32" else 2
    micro = cfg.train.micro_batch_size
    gib = 2**30
    lines = [
        f"model {cfg.model.name} at {cfg.model.image_size}px: {params:,} parameters, "
        f"{sum(r.macs for r in macs) / 1e9:.1f} GMACs per image "
        f"({', '.join(f'{r.name} {r.macs / 1e9:.2f}' for r in macs)})",
        f"world size {world}, ZeRO-{cfg.zero.stage}, {cfg.precision.dtype}: model states per rank "
        + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in states.items())
        + f" = {sum(states.values()) / gib:.2f} GiB",
    ]
    policies = [("no checkpointing", ()), ("all blocks checkpointed", STAGE_NAMES)]
    if cfg.activation_checkpointing.policy == "stages":
        chosen = cfg.activation_checkpointing.stages
        policies.insert(1, (f"stages {', '.join(chosen)} checkpointed", chosen))
    for label, stages in policies:
        act = activation_bytes_per_image(cfg.model, element, stages)
        lines.append(
            f"activations, {label}: {sum(act.values()) * micro / gib:.2f} GiB per rank "
            f"at micro-batch {micro} (estimate)"
        )
    lines.append("DeepSpeed config:")
    lines.append(json.dumps(to_deepspeed_config(cfg, world), indent=2))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, float] | None:
    parser = config_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (memory, MACs, DeepSpeed config) and exit",
    )
    parser.add_argument(
        "--world-size", type=int, help="ranks to plan for with --dry-run (default: the launcher's)"
    )
    cfg, args = parse_config_args(argv, parser)
    env = dist_env()
    if args.dry_run:
        if env.is_main:
            try:
                print(plan_text(cfg, args.world_size or env.world_size))
            except ValueError as err:
                print(f"config error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        return None
    if not cfg.data.train_shards:
        print(
            "config error: data.train_shards: no training data; set it to a shard manifest "
            "(python -m data_tools.make_shards IMAGE_FOLDER OUT, or python -m "
            "data_tools.make_demo for the demo digits)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from coatnet_scale.train import train

    return train(cfg)


if __name__ == "__main__":
    from coatnet_scale.stop import EXIT_STOPPED

    under_srun = dist_env().launcher == "slurm"  # read now: training exports torch's variables
    result = main()
    # Stopped on a signal with a checkpoint committed: tell the launcher to retry (75). Under
    # srun a stopped rank exits 0 instead: srun --kill-on-bad-exit would SIGTERM the ranks still
    # finishing (wandb, process-group teardown), and the SLURM batch step reads the run's progress
    # from its checkpoints (coatnet_scale/distributed/slurm.py).
    stopped = bool(result and result.get("stopped"))
    raise SystemExit(EXIT_STOPPED if stopped and not under_srun else 0)
