"""Training scenarios run inside one 2-rank job (`deepspeed --num_gpus 2 scenarios.py OUT NAMES`),
so the process start-up is paid once. Each scenario is a short train() of the debug model on the
demo-like shards; the losses per step go to OUT/NAME.json for the pytest side to compare."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

import coatnet_scale.train as training
from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.data.batch_augment import BatchAugment
from coatnet_scale.distributed.engine import (
    build_sharded_model,
    init_process_group,
    to_deepspeed_config,
)
from coatnet_scale.distributed.env import dist_env
from coatnet_scale.optim import param_groups
from coatnet_scale.spikes import ROLLBACKS_FILE
from tests.faults.hooks import plant_bad_samples

STEPS = 4
SCENARIOS = {
    "zero0": ["zero.stage=0"],
    "zero1": ["zero.stage=1"],
    "zero2": ["zero.stage=2", "checkpoint.every_steps=2"],
    "zero3": ["zero.stage=3"],
    "ga1x8": ["zero.stage=2", "train.micro_batch_size=4"],
    "ga2x4": ["zero.stage=2", "train.micro_batch_size=2"],
    "ckpt_on": ["zero.stage=2", "activation_checkpointing.policy=all"],
    "ckpt_off": ["zero.stage=2"],
    "bf16": ["zero.stage=2", "precision.dtype=bf16"],
    # a NaN loss on rank 1 at step 2, every stage x precision, a checkpoint after every step
    **{
        f"nan_z{stage}_{dtype}": [
            f"zero.stage={stage}",
            f"precision.dtype={dtype}",
            "train.max_nonfinite_steps=3",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=5",
            "train.total_steps=3",
        ]
        for stage in (0, 1, 2, 3)
        for dtype in ("fp32", "bf16")
    },
    "offload": ["zero.stage=2", "zero.offload_optimizer=cpu"],
    "offload3": ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_params=cpu"],
    # EMA (decay 0.9): ZeRO-2 and ZeRO-3 on the same run; ZeRO-3 bf16 (the EMA of the fp32
    # master weights); a checkpoint after every step for the tests' own averages
    **{
        name: [
            f"zero.stage={stage}",
            f"precision.dtype={dtype}",
            "train.ema_decay=0.9",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=5",
        ]
        for name, stage, dtype in (
            ("ema", 2, "fp32"),
            ("ema_z3", 3, "fp32"),
            ("ema_bf16", 3, "bf16"),
        )
    },
    "compile": ["zero.stage=2", "train.compile=true"],
    # 3 steps without EMA, then the same run resumed with EMA for a 4th step
    "ema_late_a": ["zero.stage=1", "train.total_steps=3"],
    "ema_late_b": ["zero.stage=1", "train.ema_decay=0.9"],
    # zero gradients (the loss times 0), weight decay 0.5 at lr 0.1, ZeRO-3: one step
    "wd_zero3": [
        "zero.stage=3",
        "optim.lr=0.1",
        "optim.weight_decay=0.5",
        "schedule.min_lr=0",
        "train.total_steps=1",
    ],
    "compile_ckpt_all": [
        "zero.stage=2",
        "train.compile=true",
        "activation_checkpointing.policy=all",
    ],
    "compile_ckpt_stages": [
        "zero.stage=2",
        "train.compile=true",
        "activation_checkpointing.policy=stages",
        "activation_checkpointing.stages=[s1,s3]",
    ],
    # loss-spike rollback: two samples of step 10 with a 1e4 times larger loss
    # (`plant_bad_samples`); _a rolls back past them, _b is told up front (it starts with _a's
    # RUN/rollbacks.json): ZeRO-0 fp32 (our optimizer), ZeRO-2 fp32, ZeRO-3 bf16, with the EMA
    **{
        f"{name}_{run}": [
            f"zero.stage={stage}",
            f"precision.dtype={dtype}",
            "train.total_steps=14",
            "train.ema_decay=0.9",
            "spike.rollback=true",
            "spike.window=20",
            "spike.min_history=5",
            "spike.snapshot_every=4",
            "spike.cooldown_steps=3",
            "spike.rampup_steps=2",
        ]
        for name, stage, dtype in (
            ("spike0", 0, "fp32"),
            ("spike2", 2, "fp32"),
            ("spike3", 3, "bf16"),
        )
        for run in ("a", "b")
    },
}
# rank 1 spends 0.2 s more per micro-batch in forward (`slow_rank1`): a straggler
SCENARIOS["straggler"] = ["zero.stage=2", "train.total_steps=12", "logging.log_every=2"]
SLOW_S = 0.2
BAD_SLOTS = (74, 77)  # of step 10 (slots 72-79 at global batch 8)


def debug_run(data: str, run_dir: Path, steps: int, micro_batch: int) -> list[str]:
    """Overrides of the short debug-model run the scenarios vary: 32 px, 3 classes, global batch
    8, fp32, every step logged, no loader workers, no wandb."""
    return [
        f"data.train_shards={data}/train.json",
        f"data.val_shards={data}/val.json",
        "data.num_workers=0",
        "model.image_size=32",
        "model.num_classes=3",
        f"train.total_steps={steps}",
        "train.global_batch_size=8",
        f"train.micro_batch_size={micro_batch}",
        "schedule.warmup_steps=1",
        "logging.log_every=1",
        "logging.wandb_mode=disabled",
        "precision.dtype=fp32",
        f"train.run_dir={run_dir}",
    ]


def inject_nan_on_rank1_at_step(step_to_poison: int) -> None:
    """Make rank 1's loss NaN at one step: the guard must skip that step on both ranks."""
    original = training.classification_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] == step_to_poison:
            return loss * float("nan")
        return loss

    training.classification_loss = poisoned


def slow_rank1(seconds: float) -> None:
    """Rank 1's forward phase takes `seconds` longer per micro-batch (a slow GPU)."""
    original = BatchAugment.__call__

    def slowed(self, *args):
        if dist.get_rank() == 1:
            time.sleep(seconds)
        return original(self, *args)

    BatchAugment.__call__ = slowed


def freeze_batchnorm_statistics() -> None:
    """BatchNorm in eval mode during training: each micro-batch then sees the same normalisation,
    so accumulating 2 micro-batches must equal one micro-batch of twice the size."""
    original = training.build_engine

    def build(model, cfg, ds_config):
        engine = original(model, cfg, ds_config)
        for module in engine.module.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        return engine

    training.build_engine = build


def zero_gradients() -> None:
    original = training.classification_loss
    training.classification_loss = lambda *args, **kwargs: original(*args, **kwargs) * 0.0


def record_weight_decay_groups(out: Path, data: str) -> None:
    """The decayed / not decayed parameter names our AdamW groups get from the model DeepSpeed
    will hold, for ZeRO 0-3 x fp32/bf16 (ZeRO-3: partitioned by zero.Init)."""
    groups = {}
    for stage in (0, 1, 2, 3):
        for dtype in ("fp32", "bf16"):
            overrides = [*debug_run(data, out / "wd", 1, 4), f"zero.stage={stage}"]
            overrides.append(f"precision.dtype={dtype}")
            cfg, _ = parse_config_args(["--model", "coatnet_debug", *overrides], config_parser("t"))
            device = init_process_group(cfg, dist_env()).device
            model = build_sharded_model(
                cfg.model, stage, to_deepspeed_config(cfg, dist.get_world_size()), device
            )
            names = {id(p): n for n, p in model.named_parameters()}
            decay, no_decay = param_groups(model, cfg.optim.weight_decay)
            groups[f"{stage}/{dtype}"] = {
                "decay": sorted(names[id(p)] for p in decay["params"]),
                "no_decay": sorted(names[id(p)] for p in no_decay["params"]),
            }
    if dist.get_rank() == 0:
        (out / "wd_groups.json").write_text(json.dumps(groups))


def record_gradient_accumulation(out: Path, data: str) -> None:
    """Where DeepSpeed accumulates bf16 gradients over micro-batches, for ZeRO 0-3 as we
    configure it: the wrapper it chose and the dtype of the buffer the gradients add up in,
    after the backward of one micro-batch."""
    found = {}
    for stage in (0, 1, 2, 3):
        overrides = [*debug_run(data, out / "accum", 1, 4), f"zero.stage={stage}"]
        overrides.append("precision.dtype=bf16")
        cfg, _ = parse_config_args(["--model", "coatnet_debug", *overrides], config_parser("t"))
        device = init_process_group(cfg, dist_env()).device
        ds_config = to_deepspeed_config(cfg, dist.get_world_size())
        model = build_sharded_model(cfg.model, stage, ds_config, device)
        engine = training.build_engine(model, cfg, ds_config)
        images = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16, device=device)
        engine.backward(engine(images).float().logsumexp(dim=1).mean())
        optimizer = engine.optimizer
        if hasattr(optimizer, "fp32_groups_gradients_flat"):  # BF16_Optimizer
            dtype = optimizer.fp32_groups_gradients_flat[0].dtype
        elif hasattr(optimizer, "gradient_accumulation_dtype"):  # ZeRO 1-3
            dtype = optimizer.gradient_accumulation_dtype
        else:  # no ZeRO: the parameters' own .grad
            dtype = next(p.grad for p in engine.module.parameters() if p.grad is not None).dtype
        found[str(stage)] = {"optimizer": type(optimizer).__name__, "dtype": str(dtype)}
        engine.destroy()
    if dist.get_rank() == 0:
        (out / "grad_accum.json").write_text(json.dumps(found))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's flag
    out, names, data = Path(args[0]), args[1].split(","), args[2]
    record_weight_decay_groups(out, data)
    record_gradient_accumulation(out, data)
    originals = (training.build_engine, training.classification_loss, BatchAugment.__call__)
    for name in names:
        # undo earlier patches
        training.build_engine, training.classification_loss, BatchAugment.__call__ = originals
        run = out / name
        if name.startswith("ema_late"):
            run = out / name.removesuffix("_a").removesuffix("_b")  # _a and _b share a run
        overrides = [*debug_run(data, run, STEPS, micro_batch=4), *SCENARIOS[name]]
        cfg, _ = parse_config_args(["--model", "coatnet_debug", *overrides], config_parser("t"))
        if name.startswith("nan"):
            inject_nan_on_rank1_at_step(2)
        if name == "wd_zero3":
            zero_gradients()
        if name.startswith("ga"):
            freeze_batchnorm_statistics()
        if name == "straggler":
            slow_rank1(SLOW_S)
        if name.startswith("spike"):
            plant_bad_samples(BAD_SLOTS)
            if name.endswith("_b") and dist.get_rank() == 0:  # told up front
                run.mkdir(parents=True, exist_ok=True)
                told = (out / name.replace("_b", "_a") / ROLLBACKS_FILE).read_text()
                (run / ROLLBACKS_FILE).write_text(told)
        final = training.train(cfg)
        if dist.get_rank() == 0:
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x]
            losses = [m["loss"] for m in metrics if "loss" in m]
            (out / f"{name}.json").write_text(json.dumps({"losses": losses, "final": final}))


if __name__ == "__main__":
    main()
