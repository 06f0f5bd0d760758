"""train(cfg): the pretraining loop, readable top to bottom.

Set-up (process group, run folder, data, model, engine, EMA, logging), then one loop over
optimizer steps: data -> forward/backward per micro-batch -> step -> non-finite guard -> log ->
eval -> checkpoint. Everything configurable comes from the frozen config tree; runtime facts (rank,
world size, device) live in `DistEnv` and local variables, never in the config.
"""

from __future__ import annotations

import math
import os
import random
import time
from datetime import timedelta
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from coatnet_scale.config import Config, config_hash, dump_yaml, to_dict
from coatnet_scale.data.pipeline import BatchPlan, build_eval_loader, build_train_loader, seed_for
from coatnet_scale.data.transforms import build_mixup, normalize
from coatnet_scale.distributed.engine import (
    build_engine,
    build_sharded_model,
    save_deepspeed_config,
    to_deepspeed_config,
)
from coatnet_scale.distributed.env import DistEnv, dist_env
from coatnet_scale.logging import RunLogger, redact
from coatnet_scale.losses import classification_loss
from coatnet_scale.models.flops import total_macs
from coatnet_scale.optim import lr_at, set_lr

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class WeightEma:
    """EMA of the weights in fp32 on each rank (ZeRO 0-2, where every rank holds all weights).

    Under ZeRO-3 a rank holds only its partition, so a full-weight EMA would be wrong: that case
    is refused up front (`check_ema_supported`).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's weights with the EMA's (call twice to restore)."""
        for name, param in model.named_parameters():
            current = param.detach().float().clone()
            param.copy_(self.shadow[name].to(param.dtype))
            self.shadow[name] = current


def check_ema_supported(cfg: Config) -> None:
    if cfg.train.ema_decay > 0 and cfg.zero.stage == 3:
        raise ValueError(
            "train.ema_decay needs zero.stage <= 2: under ZeRO-3 each rank holds only a shard of "
            "the weights and a sharded EMA is not implemented yet"
        )


def init_process_group(cfg: Config, env: DistEnv) -> None:
    os.environ.update(env.export())  # srun: map SLURM's variables to the torch ones
    backend = None if cfg.distributed.backend == "auto" else cfg.distributed.backend
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=timedelta(minutes=cfg.distributed.timeout_minutes),
    )


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed_for(seed, rank, 1))
    np.random.seed(seed_for(seed, rank, 2) % (1 << 32))
    torch.manual_seed(seed)  # the same on every rank: identical initial weights


def all_true(flag: bool, device: torch.device) -> bool:
    """Logical AND over ranks (one tiny all-reduce)."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(engine, loader, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Top-1/top-5 over the validation shards, summed over ranks (each sample counted once)."""
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct1, correct5, count
    for batch in loader:
        logits = engine(normalize(batch["image"].to(device), dtype)).float()
        labels, valid = batch["label"].to(device), batch["valid"].to(device)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        totals[0] += (hit[:, 0] & valid).sum()
        totals[1] += (hit.any(dim=1) & valid).sum()
        totals[2] += valid.sum()
    dist.all_reduce(totals)
    engine.train()
    count = max(totals[2].item(), 1.0)
    return {
        "top1": totals[0].item() / count,
        "top5": totals[1].item() / count,
        "samples": totals[2].item(),
    }


def save(
    engine,
    run_dir: Path,
    step: int,
    data_state: dict,
    cfg: Config,
    wandb_run_id: str | None,
) -> None:
    """DeepSpeed's sharded save with our client state (data position, config hash, wandb id).

    Cadence only: the crash-safe commit, validation and retention are issue 5's checkpoint.py.
    """
    engine.save_checkpoint(
        str(run_dir / "checkpoints"),
        tag=f"step{step}",
        client_state={
            "data": data_state,
            "config_hash": config_hash(cfg),
            "wandb_run_id": wandb_run_id,
            "step": step,
        },
    )


def train(cfg: Config) -> dict[str, float]:
    """Run (or continue) the pretraining described by `cfg`; returns the final metrics."""
    # ---- context ---------------------------------------------------------------------------
    check_ema_supported(cfg)
    env = dist_env()
    init_process_group(cfg, env)
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    if device.type != "cuda":
        device = torch.device("cpu")
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(redact(dump_yaml(cfg)))
    dist.barrier()
    seed_everything(cfg.train.seed, env.rank)
    dtype = DTYPES[cfg.precision.dtype]

    # ---- data --------------------------------------------------------------------------------
    plan = BatchPlan(
        cfg.train.global_batch_size, cfg.train.micro_batch_size, env.rank, env.world_size
    )
    train_loader = build_train_loader(cfg.data, cfg.model.image_size, plan, cfg.train.seed)
    eval_loader = (
        build_eval_loader(
            cfg.data, cfg.model.image_size, cfg.train.micro_batch_size, env.rank, env.world_size
        )
        if cfg.data.val_shards
        else None
    )
    mixup = build_mixup(
        cfg.data.mixup_alpha,
        cfg.data.cutmix_alpha,
        cfg.train.label_smoothing,
        cfg.model.num_classes,
    )

    # ---- model and engine ----------------------------------------------------------------------
    ds_config = to_deepspeed_config(cfg, env.world_size)
    if env.is_main:
        save_deepspeed_config(ds_config, run_dir)
    model = build_sharded_model(cfg.model, cfg.zero.stage, ds_config)
    engine = build_engine(model, cfg, ds_config)
    ema = WeightEma(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    flops_per_image = 6 * total_macs(cfg.model)

    logger = RunLogger(cfg.logging, run_dir, env.is_main, to_dict(cfg), cfg.train.total_steps)
    logger.message(
        f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters on this "
        f"rank, {env.world_size} rank(s), ZeRO-{cfg.zero.stage}, {cfg.precision.dtype}, "
        f"{plan.accumulation} micro-batch(es) of {plan.micro_batch} per rank per step, "
        f"config {config_hash(cfg)}, run folder {run_dir}"
    )

    # ---- the loop --------------------------------------------------------------------------------
    batches = iter(train_loader)
    skipped_in_a_row, skipped_total = 0, 0
    final: dict[str, float] = {}
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    last_save = time.monotonic()
    for step in range(cfg.train.total_steps):
        lr = lr_at(step, cfg.optim.lr, cfg.schedule, cfg.train.total_steps)
        set_lr(engine.optimizer, lr)
        losses = []
        for micro in range(plan.accumulation):
            wait_start = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - wait_start
            images = normalize(batch["image"].to(device, non_blocking=True), dtype)
            targets = batch["label"].to(device)
            if mixup is not None:
                np.random.seed(seed_for(cfg.train.seed, step, env.rank, micro) % (1 << 32))
                images, targets = mixup(images, targets)
            logits = engine(images)
            loss = classification_loss(
                logits,
                targets,
                cfg.train.loss,
                cfg.train.label_smoothing,
                batch["valid"].to(device),
            )
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        window_images += cfg.train.global_batch_size

        # Non-finite guard: DeepSpeed's ZeRO optimizer already skips a step whose global gradient
        # norm is not finite (on every rank, the norm is all-reduced); here the loss is checked as
        # well, the skip is counted and logged, and a run that keeps failing stops.
        loss_value = torch.stack(losses).mean().item()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        finite = all_true(math.isfinite(loss_value) and math.isfinite(grad_norm), device)
        if finite:
            skipped_in_a_row = 0
            if ema is not None:
                ema.update(engine.module)
        else:
            skipped_in_a_row += 1
            skipped_total += 1
            logger.message(
                f"step {step + 1}: non-finite loss {loss_value} or gradient norm "
                f"{grad_norm}: update skipped on every rank"
            )
            if skipped_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient norm "
                    f"(limit train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); lower "
                    "optim.lr, raise optim.grad_clip, or resume from an earlier checkpoint"
                )
        logger.advance()

        done = step + 1
        if done % cfg.logging.log_every == 0 or done == cfg.train.total_steps:
            elapsed = time.perf_counter() - window_start
            img_per_s = window_images / elapsed
            metrics = {
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "img_per_s": img_per_s,
                "step_time_s": elapsed * cfg.train.global_batch_size / window_images,
                "data_wait_share": window_wait / elapsed,
                "memory_mb": memory_mb(device),
                "skipped_steps": skipped_total,
                "bad_samples": train_loader.bad_samples,
                "mfu": flops_per_image * img_per_s / (cfg.logging.peak_flops * env.world_size),
                "epoch": train_loader.state_dict()["epoch"],
            }
            logger.log(done, metrics)
            final.update(metrics)
            window_start, window_images, window_wait = time.perf_counter(), 0, 0.0

        last = done == cfg.train.total_steps
        if eval_loader is not None and (
            last or (cfg.train.eval_every and done % cfg.train.eval_every == 0)
        ):
            result = {
                f"val_{k}": v for k, v in evaluate(engine, eval_loader, device, dtype).items()
            }
            if ema is not None:
                ema.swap(engine.module)
                result |= {
                    f"val_ema_{k}": v
                    for k, v in evaluate(engine, eval_loader, device, dtype).items()
                }
                ema.swap(engine.module)
            logger.log(done, result)
            logger.message(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            final.update(result)

        minutes = (time.monotonic() - last_save) / 60
        due = (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or (
            cfg.checkpoint.every_minutes and minutes >= cfg.checkpoint.every_minutes
        )
        # Ranks' clocks differ: they agree (one tiny all-reduce) so that all of them save.
        if last or not all_true(not due, device):
            save(engine, run_dir, done, train_loader.state_dict(), cfg, logger.wandb_run_id)
            last_save = time.monotonic()

    logger.close()
    dist.barrier()
    return final
