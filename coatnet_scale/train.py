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

from coatnet_scale import checkpoint
from coatnet_scale.checkpoint import TrainerState, checkpoint_root
from coatnet_scale.config import Config, config_hash, dump_yaml, to_dict
from coatnet_scale.data.pipeline import BatchPlan, build_eval_loader, build_train_loader, seed_for
from coatnet_scale.data.transforms import build_mixup, normalize
from coatnet_scale.distributed.engine import (
    build_engine,
    build_sharded_model,
    load_initial_weights,
    save_deepspeed_config,
    to_deepspeed_config,
)
from coatnet_scale.distributed.env import DistEnv, dist_env
from coatnet_scale.logging import RunLogger, redact, rewind_metrics
from coatnet_scale.losses import classification_loss
from coatnet_scale.models.flops import total_macs
from coatnet_scale.optim import lr_at, set_lr
from coatnet_scale.stop import StopRequest

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


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise logical OR of `flags` over ranks (one tiny all-reduce)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def global_mean(value: torch.Tensor, world_size: int) -> float:
    """Mean of a scalar over ranks (one tiny all-reduce)."""
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total.item() / world_size


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


def restore_ema(ema: WeightEma | None, ckpt: Path, notes: list[str]) -> None:
    if ema is None:
        return
    saved = checkpoint.read_ema(ckpt)
    if saved is None:
        notes.append("the checkpoint has no EMA weights: the EMA restarts from the current weights")
        return
    ema.shadow = {name: saved[name].clone() for name in ema.shadow}


def train(cfg: Config) -> dict[str, float]:
    """Run (or continue) the pretraining described by `cfg`; returns the final metrics.

    With `checkpoint.resume=auto` a run folder that holds a valid checkpoint continues from it:
    weights, optimizer, step, data position, RNG, EMA, counters and wandb run. A stop signal
    (SIGUSR1/SIGTERM, see `coatnet_scale.stop`) ends the run at the next step boundary after a
    checkpoint; the result then has `stopped` = 1.
    """
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
    notes: list[str] = []  # set-up messages, printed once the logger exists

    # ---- where the run starts ------------------------------------------------------------------
    resume_from = checkpoint.find_resume(cfg.checkpoint, run_dir, notes.append)
    saved = TrainerState.read(resume_from) if resume_from is not None else None
    if saved is not None:
        changed = checkpoint.check_compatible(resume_from, saved, cfg)
        notes += [f"changed since the checkpoint: {line}" for line in changed]

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
    load_plan = None
    if saved is not None:
        load_plan = checkpoint.prepare_load(
            resume_from, saved.world_size, env.world_size, notes.append
        )
        if load_plan.universal:
            ds_config["checkpoint"] = {"load_universal": True}
    if env.is_main:
        save_deepspeed_config(ds_config, run_dir)
    model = build_sharded_model(cfg.model, cfg.zero.stage, ds_config)
    if saved is None and cfg.checkpoint.init_from:
        source = cfg.checkpoint.init_from
        state = checkpoint.initial_weights(Path(source), cfg.checkpoint.init_ema)
        fresh = load_initial_weights(model, state, cfg.zero.stage, source)
        notes.append(
            f"initialised from {source}"
            + (f"; newly initialised: {', '.join(fresh)}" if fresh else "")
        )
    engine = build_engine(model, cfg, ds_config)
    ema = WeightEma(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    flops_per_image = 6 * total_macs(cfg.model)

    start_step, skipped_total = 0, 0
    if saved is not None and load_plan is not None:
        checkpoint.load(engine, load_plan)
        train_loader.load_state_dict(saved.data)
        restore_ema(ema, resume_from, notes)
        start_step, skipped_total = saved.step, saved.skipped_steps
        if env.is_main:
            moved = rewind_metrics(run_dir / "metrics.jsonl", start_step)
            if moved:
                notes.append(f"{moved} metric records after step {start_step} moved aside")
        notes.append(
            f"resumed from {resume_from} (step {start_step}, saved by {saved.world_size} "
            f"rank(s), {saved.data['samples_consumed']:,} samples consumed)"
        )

    logger = RunLogger(
        cfg.logging,
        run_dir,
        env.is_main,
        to_dict(cfg),
        cfg.train.total_steps,
        start_step,
        saved.wandb_run_id if saved is not None else None,
    )
    logger.message(
        f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters on this "
        f"rank, {env.world_size} rank(s), ZeRO-{cfg.zero.stage}, {cfg.precision.dtype}, "
        f"{plan.accumulation} micro-batch(es) of {plan.micro_batch} per rank per step, "
        f"config {config_hash(cfg)}, run folder {run_dir}"
    )
    for note in notes:
        logger.message(note)
    if start_step >= cfg.train.total_steps:
        logger.message(
            f"the run is already complete (step {start_step} of train.total_steps="
            f"{cfg.train.total_steps}); raise train.total_steps to continue it"
        )

    def save(step: int) -> None:
        state = TrainerState.of(
            cfg,
            step,
            train_loader.state_dict(),
            skipped_total,
            logger.wandb_run_id,
            env.world_size,
        )
        checkpoint.save(
            engine,
            checkpoint_root(run_dir),
            state,
            ema.shadow if ema is not None and env.is_main else None,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_every,
            logger.message,
        )

    # Last thing before the loop: the RNG streams continue exactly where the checkpoint left them
    # (same world size), or restart from a seed of (seed, step) on another world size.
    if saved is not None and resume_from is not None:
        same_world = saved.world_size == env.world_size
        if not checkpoint.restore_rng(resume_from, env.rank, same_world):
            seed_everything(seed_for(cfg.train.seed, start_step), env.rank)

    # ---- the loop --------------------------------------------------------------------------------
    stop = StopRequest()  # from here on a stop signal means: checkpoint, then exit cleanly
    batches = iter(train_loader)
    skipped_in_a_row = 0
    final: dict[str, float] = {}
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    last_save = time.monotonic()
    try:
        for step in range(start_step, cfg.train.total_steps):
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

            # Non-finite guard: DeepSpeed's ZeRO optimizer already skips a step whose global
            # gradient norm is not finite (on every rank, the norm is all-reduced); here the loss
            # is checked as well, the skip is counted and logged, and a run that keeps failing
            # stops. The loss is the mean over all ranks (a NaN anywhere makes it NaN everywhere),
            # so every rank takes the same decision and the logged value is the step's loss.
            loss_value = global_mean(torch.stack(losses).mean(), env.world_size)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
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
                        f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"norm (limit train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                        "lower optim.lr, raise optim.grad_clip, or resume from an earlier "
                        "checkpoint"
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
                logger.message(
                    f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                )
                final.update(result)

            minutes = (time.monotonic() - last_save) / 60
            due = (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or (
                cfg.checkpoint.every_minutes and minutes >= cfg.checkpoint.every_minutes
            )
            # Ranks' clocks and signals differ: they agree (one tiny all-reduce) on saving and
            # stopping, so all of them do the same.
            save_now, stop_now = any_rank([bool(due), stop.requested], device)
            if last or save_now or stop_now:
                save(done)
                last_save = time.monotonic()
            if stop_now and not last:
                logger.message(
                    f"stop requested ({stop.received.name if stop.received else 'another rank'})"
                    f": stopped after step {done} with a checkpoint; the same command resumes"
                )
                final["stopped"] = 1.0
                break
        final["step"] = float(done if cfg.train.total_steps > start_step else start_step)
    finally:
        stop.close()
    logger.close()
    dist.barrier()
    return final
