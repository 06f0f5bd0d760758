"""Checkpoint/resume scenarios run inside one multi-rank job (`deepspeed --num_gpus N
resume_scenarios.py OUT DATA NAMES`), so the process start-up is paid once per world size.

Each scenario trains the debug model with train(); a scenario may stop itself with a real stop
signal (SIGUSR1 to rank 0 only: the ranks must agree) and may be followed by a resume in the same
run folder. Every rank records the (slot, key) of every sample it consumed to
OUT/NAME.rank{R}.slots.json; rank 0 writes the logged losses and final metrics to OUT/NAME.json,
or the error message to OUT/NAME.error when train() raised.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist
from timm.layers import DropPath

import coatnet_scale.train as training
from coatnet_scale.checkpoint import CheckpointError
from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.data.pipeline import TrainLoader
from tests.distributed.scenarios import debug_run

STEPS = 6
# Mixup, stochastic depth and EMA on: the exact-resume comparison covers every random stream.
RANDOM = ["data.mixup_alpha=0.8", "model.drop_path_rate=0.2", "train.ema_decay=0.9"]
# No run-level randomness that depends on the rank layout: runs on different world sizes see the
# same micro-batches (micro-batch 2 everywhere), so their losses must agree. EMA on: it must
# survive every resume, also re-partitioned for another world size.
PLAIN = [
    "data.mixup_alpha=0.0",
    "model.drop_path_rate=0.0",
    "checkpoint.every_steps=3",
    "train.ema_decay=0.9",
]
FINETUNE = [
    *PLAIN,
    "model.image_size=64",
    "model.num_classes=5",
    "optim.lr=1e-20",
    "schedule.min_lr=0",
]
# name -> (run folder name, overrides, stop after this many steps or None)
SCENARIOS: dict[str, tuple[str, list[str], int | None]] = {
    "straight": ("straight", [*RANDOM, "checkpoint.every_steps=3"], None),
    "stop": ("stop_resume", [*RANDOM, "logging.wandb_mode=offline"], 3),
    "resume": ("stop_resume", [*RANDOM, "logging.wandb_mode=offline"], None),
    # ZeRO-3 (parameters partitioned too): exact as well.
    "stop_z3": ("stop_resume_z3", [*PLAIN, "zero.stage=3"], 3),
    "resume_z3": ("stop_resume_z3", [*PLAIN, "zero.stage=3"], None),
    "plain": ("plain", PLAIN, None),
    # The global sample order (every sample of an epoch permuted): exact and elastic too.
    "plain_global": ("plain_global", [*PLAIN, "data.order=global"], None),
    "stop_global": ("stop_resume_global", [*PLAIN, "data.order=global"], 3),
    "resume_global": ("stop_resume_global", [*PLAIN, "data.order=global"], None),
    "to1_global": ("to1_global", [*PLAIN, "data.order=global"], None),
    "plain_z0": ("plain_z0", [*PLAIN, "zero.stage=0"], None),
    "plain_z1": ("plain_z1", [*PLAIN, "zero.stage=1"], None),
    "plain_z3": ("plain_z3", [*PLAIN, "zero.stage=3"], None),
    # bf16 ZeRO-1: DeepSpeed's BF16_Optimizer (fp32 gradient accumulation) and its own files
    "plain_z1_bf16": ("plain_z1_bf16", [*PLAIN, "zero.stage=1", "precision.dtype=bf16"], None),
    "to1_z1_bf16": ("to1_z1_bf16", [*PLAIN, "zero.stage=1", "precision.dtype=bf16"], None),
    # Elastic resumes: pytest copies a 2-rank run folder cut back to its step-3 checkpoint.
    "to1": ("to1", PLAIN, None),
    "to1_z0": ("to1_z0", [*PLAIN, "zero.stage=0"], None),
    "to1_z1": ("to1_z1", [*PLAIN, "zero.stage=1"], None),
    "to1_z3": ("to1_z3", [*PLAIN, "zero.stage=3"], None),
    "to4": ("to4", PLAIN, None),
    "single": ("single", PLAIN, 3),
    "to2": ("single_to2", PLAIN, None),
    # A copy of `straight` whose newest checkpoint pytest damaged.
    "damaged": ("damaged", [*RANDOM, "checkpoint.every_steps=3"], None),
    # Resuming `plain` with another model must be refused.
    "incompatible": ("incompatible", [*PLAIN, "model.num_classes=4"], None),
    # Fine-tuning from an export of `plain` at another resolution and class count; the tiny LR
    # keeps the parameters at their initial values for the test to inspect.
    "finetune": ("finetune", [*FINETUNE], None),
    "finetune_z3": ("finetune_z3", [*FINETUNE, "zero.stage=3"], None),
}


class RecordingLoader(TrainLoader):
    """Records which samples this rank consumed, in order."""

    record: list[tuple[int, str]]

    def __iter__(self):
        for batch in super().__iter__():
            self.record.extend(zip(batch["slot"].tolist(), batch["key"], strict=True))
            yield batch


def stop_after(steps: int | None):
    """Send rank 0 (only) a real SIGUSR1 during step `steps`: all ranks must stop after it."""
    original = training.lr_at

    def lr_at(step, *args):
        if steps is not None and step == steps - 1 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(step, *args)

    return lr_at


def record_drop_path_masks(masks: list[list[bool]]):
    """A build_engine that records, per stochastic-depth call in training, which samples of the
    micro-batch the block dropped (the branch output is exactly zero for them)."""
    original = training.build_engine

    def build(model, cfg, ds_config):
        engine = original(model, cfg, ds_config)
        for module in engine.module.modules():
            if isinstance(module, DropPath):
                module.register_forward_hook(
                    lambda m, _, out: (
                        masks.append((out.flatten(1) == 0).all(1).tolist()) if m.training else None
                    )
                )
        return engine

    return build


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's flag
    out, data, names = Path(args[0]), args[1], args[2].split(",")
    originals = (training.build_train_loader, training.lr_at, training.build_engine)
    for name in names:
        run, extra, stop = SCENARIOS[name]
        record: list[tuple[int, str]] = []
        masks: list[list[bool]] = []

        def build(*a, record=record, **k):
            loader = originals[0](*a, **k)
            loader.__class__ = RecordingLoader
            loader.record = record
            return loader

        training.build_train_loader, training.lr_at = build, stop_after(stop)
        training.build_engine = record_drop_path_masks(masks)
        overrides = [
            *debug_run(data, out / run, STEPS, micro_batch=2),
            "zero.stage=2",
            "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0",
        ]
        init = out / "export_plain"
        if name.startswith("finetune"):
            overrides.append(f"checkpoint.init_from={init}")
        cfg, _ = parse_config_args(
            ["--model", "coatnet_debug", *overrides, *extra], config_parser("t")
        )
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        try:
            final = training.train(cfg)
        except CheckpointError as err:
            if rank == 0:
                (out / f"{name}.error").write_text(str(err))
            continue
        finally:
            training.build_train_loader, training.lr_at, training.build_engine = originals
        (out / f"{name}.rank{dist.get_rank()}.slots.json").write_text(json.dumps(record))
        (out / f"{name}.rank{dist.get_rank()}.masks.json").write_text(json.dumps(masks))
        if dist.get_rank() == 0:
            lines = (out / run / "metrics.jsonl").read_text().splitlines()
            losses = {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}
            (out / f"{name}.json").write_text(json.dumps({"losses": losses, "final": final}))


if __name__ == "__main__":
    main()
