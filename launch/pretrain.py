"""Pretrain a CoAtNet: `deepspeed launch/pretrain.py --model coatnet6 [--config F] [k=v ...]`.

Also runs under `torchrun`, `srun` (rank and world from SLURM's variables) and `accelerate
launch`: rank discovery is `coatnet_scale.distributed.env`'s. `--dry-run` prints the plan (model
size, MACs, per-rank memory, generated DeepSpeed config) without allocating weights.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.config import Config
from coatnet_scale.distributed.env import dist_env
from coatnet_scale.exits import (
    EXIT_CHECKPOINT,
    EXIT_DATA,
    EXIT_FINISHED,
    EXIT_FOLDER_BUSY,
    EXIT_NONFINITE,
    EXIT_SETUP,
    EXIT_SPIKES,
    EXIT_STOPPED,
    record_exit,
)
from coatnet_scale.logging import redact
from coatnet_scale.preflight import setup_problems


def plan_text(cfg: Config, world: int) -> str:
    """The dry-run report from the planner's models (`coatnet_scale.plan`): nothing is allocated."""
    from coatnet_scale.distributed.engine import to_deepspeed_config
    from coatnet_scale.models import STAGE_NAMES
    from coatnet_scale.models.footprint import unit_footprints
    from coatnet_scale.plan import buffer_bytes
    from coatnet_scale.plan.memory import model_states, step_peak

    act = 4 if cfg.precision.dtype == "fp32" else 2
    units = unit_footprints(cfg.model, act, "fused")
    params = sum(u.params for u in units)
    macs = sum(u.macs for u in units)
    offload = cfg.zero.offload_optimizer == "cpu"
    states = model_states(params, cfg.zero.stage, world, cfg.precision.dtype, offload)
    buffers = buffer_bytes(units, cfg.zero.stage, cfg.zero.reduce_bucket_size, act)
    micro = cfg.train.micro_batch_size
    image = micro * cfg.model.in_chans * cfg.model.image_size**2 * act
    gib = 2**30
    lines = [
        f"model {cfg.model.name} at {cfg.model.image_size}px: {params:,} parameters, "
        f"{macs / 1e9:.1f} GMACs per image",
        f"world size {world}, ZeRO-{cfg.zero.stage}, {cfg.precision.dtype}: model states per rank "
        f"params {states.params / gib:.2f} GiB, grads {states.grads / gib:.2f} GiB, optimizer "
        f"{states.optimizer / gib:.2f} GiB (offloaded {states.offloaded / gib:.2f} GiB); "
        f"gradient buckets {buffers / gib:.2f} GiB",
    ]
    policies = [("no checkpointing", ()), ("all blocks checkpointed", STAGE_NAMES)]
    if cfg.activation_checkpointing.policy == "stages":
        chosen = cfg.activation_checkpointing.stages
        policies.insert(1, (f"stages {', '.join(chosen)} checkpointed", chosen))
    for label, stages in policies:
        step = step_peak(units, micro, stages, states.total + buffers, 0.0, image)
        per_stage = ", ".join(f"{k} {v / gib:.2f}" for k, v in step.activations_by_stage.items())
        lines.append(
            f"{label}, micro-batch {micro}: peak {step.peak / gib:.2f} GiB per rank "
            f"(activations GiB: {per_stage}; peak during {step.peak_at})"
        )
    lines.append("for a whole cluster: python -m coatnet_scale.plan --help")
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
                raise SystemExit(EXIT_SETUP) from None
        return None
    # Before the process group and before any file: every rank checks, rank 0 says what is wrong.
    problems = setup_problems(cfg, env.world_size)
    if problems:
        if env.is_main:
            print("\n".join(f"config error: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(EXIT_SETUP)
    if cfg.distributed.device == "cpu":
        # DeepSpeed picks its accelerator when first asked (CUDA wherever torch sees a GPU):
        # the CPU on purpose means its CPU accelerator, and no GPU for anything else either.
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from coatnet_scale.checkpoint import CheckpointError
    from coatnet_scale.data.pipeline import DataError
    from coatnet_scale.distributed.device import DeviceError
    from coatnet_scale.guard import NonFiniteError
    from coatnet_scale.lease import RunFolderBusy, may_write
    from coatnet_scale.run_folder import run_folder
    from coatnet_scale.spikes import SpikeError
    from coatnet_scale.train import train

    # Errors of the machine, the data or the run, not of the code: one line saying what to
    # change, and the exit code of coatnet_scale.exits (the SLURM job does not requeue them).
    known = (
        (DeviceError, "device error", EXIT_SETUP),
        (RunFolderBusy, "run folder in use", EXIT_FOLDER_BUSY),
        (DataError, "data error", EXIT_DATA),
        (CheckpointError, "checkpoint error", EXIT_CHECKPOINT),
        (NonFiniteError, "non-finite steps", EXIT_NONFINITE),
        (SpikeError, "loss spike", EXIT_SPIKES),
    )
    try:
        return train(cfg)
    except tuple(kind for kind, _, _ in known) as err:
        what, code = next((w, c) for kind, w, c in known if isinstance(err, kind))
        line = redact(f"rank {env.rank}: {what}: {err}")
        print(line, file=sys.stderr)
        if may_write(run_folder(cfg)) and not isinstance(err, RunFolderBusy):
            record_exit(run_folder(cfg), code, line)  # srun reports only the highest code
        raise SystemExit(code) from None


if __name__ == "__main__":
    import torch.distributed as dist

    under_srun = dist_env().launcher == "slurm"  # read now: training exports torch's variables
    try:
        result = main()
    finally:
        # Left to interpreter shutdown, gloo's worker threads can abort the process after a
        # finished run ("terminate called without an active exception", SIGABRT: pytorch
        # issue 190489); torchtitan destroys its process group the same way.
        if dist.is_initialized():
            dist.destroy_process_group()
    # Stopped on a signal with a checkpoint committed: tell the launcher to retry (75). Under
    # srun a stopped rank exits 0 instead: srun --kill-on-bad-exit would SIGTERM the ranks still
    # finishing (wandb, process-group teardown), and the SLURM batch step reads the run's progress
    # from its checkpoints (launch/slurm/supervisor.py).
    stopped = bool(result and result.get("stopped"))
    raise SystemExit(EXIT_STOPPED if stopped and not under_srun else EXIT_FINISHED)
