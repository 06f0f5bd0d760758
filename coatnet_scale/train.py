"""train(cfg): the pretraining loop, readable top to bottom.

Set-up (device and process group, run folder, data, model, engine, EMA, logging), then one loop
over optimizer steps: data -> forward/backward per micro-batch -> step -> step guard -> log ->
eval -> checkpoint. Everything configurable comes from the frozen config tree; runtime facts (rank,
world size, device) live in `DistEnv`, the device binding and local variables, never in the config.
Every tensor the loop makes lives on the engine's device, the one this rank bound before the
process group started (`distributed/device.py`).
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from coatnet_scale import checkpoint
from coatnet_scale.checkpoint import TrainerState, checkpoint_root
from coatnet_scale.config import Config, config_hash, dump_yaml, to_dict
from coatnet_scale.data.pipeline import BatchPlan, build_eval_loader, build_train_loader
from coatnet_scale.data.transforms import Normalizer, build_mixup
from coatnet_scale.distributed.collectives import global_mean, global_sum, largest
from coatnet_scale.distributed.device import (
    DeviceBinding,
    DeviceError,
    check_distinct_devices,
    cpu_starvation,
    describe_rank,
    rank_report,
)
from coatnet_scale.distributed.engine import (
    build_engine,
    build_sharded_model,
    init_process_group,
    load_initial_weights,
    save_deepspeed_config,
    to_deepspeed_config,
)
from coatnet_scale.distributed.env import dist_env
from coatnet_scale.ema import BufferEma, ema_applied, whole_ema_weights
from coatnet_scale.guard import NonFiniteError, StepGuard, gradient_norm
from coatnet_scale.logging import RunLogger, ThroughputWindow, redact, rewind_metrics
from coatnet_scale.losses import classification_loss
from coatnet_scale.memory import device_memory_metrics
from coatnet_scale.models.flops import total_macs
from coatnet_scale.optim import GuardedAdamW, lr_at, set_lr
from coatnet_scale.plan.hardware import device_peak_flops
from coatnet_scale.seeding import seed_for
from coatnet_scale.stop import StopRequest

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RANK_LINES_SHOWN = 16  # larger jobs: a summary on the console, every rank in RUN/ranks.json

__all__ = ["DTYPES", "NonFiniteError", "train"]


def seed_weights(seed: int) -> None:
    """The generators that draw the initial weights: the same seed on every rank (and every
    device generator), so every rank builds the same model."""
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank streams for everything drawn during training (python, numpy, torch on the CPU and
    every GPU): stochastic depth and dropout masks differ between ranks, as if each rank's
    micro-batch were part of one big batch. Restored from the checkpoint on resume."""
    random.seed(seed_for(seed, rank, 1))
    np.random.seed(seed_for(seed, rank, 2) % (1 << 32))
    torch.manual_seed(seed_for(seed, rank, 3))


def report_ranks(
    binding: DeviceBinding, rank: int, run_dir: Path, loader_workers: int, notes: list[str]
) -> None:
    """Every rank's host, device, CPU affinity and free memory, gathered on rank 0: written to
    RUN/ranks.json and shown (a summary for large jobs). Two ranks on one GPU stop the run; a
    rank confined to one CPU while it has loader workers is warned about."""
    reports: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(reports, rank_report(rank, binding))
    check_distinct_devices(reports)
    if rank != 0:
        return
    (run_dir / "ranks.json").write_text(json.dumps(reports, indent=1) + "\n")
    warning = cpu_starvation(reports, loader_workers)
    if warning:
        notes.append(warning)
    if len(reports) <= RANK_LINES_SHOWN:
        notes.extend(describe_rank(r) for r in reports)
        return
    cpus = [len(r["cpus"]) for r in reports]
    free = [r.get("gpu_free_gib", r["host_free_gib"]) for r in reports]
    hosts = {r["host"] for r in reports}
    notes.append(
        f"{len(reports)} ranks on {len(hosts)} host(s): {min(cpus)}-{max(cpus)} CPUs per rank, "
        f"{min(free)}-{max(free)} GiB free per device; every rank in {run_dir / 'ranks.json'}"
    )


def loss_scale(engine) -> float | None:
    """fp16's current dynamic loss scale (None without a scaler)."""
    if not engine.fp16_enabled():
        return None
    return float(engine.optimizer.loss_scale)


@torch.no_grad()
def evaluate(engine, loader, normalizer: Normalizer) -> dict[str, float]:
    """Top-1/top-5 and the mean cross-entropy over the validation shards, summed over ranks (each
    sample counted once)."""
    device = engine.device
    engine.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, CE, count
    for batch in loader:
        logits = engine(normalizer(batch["image"].to(device, non_blocking=True))).float()
        labels = batch["label"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        totals[0] += (hit[:, 0] & valid).sum()
        totals[1] += (hit.any(dim=1) & valid).sum()
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        totals[2] += (ce * valid).sum()
        totals[3] += valid.sum()
    dist.all_reduce(totals)
    engine.train()
    count = max(totals[3].item(), 1.0)
    return {
        "top1": totals[0].item() / count,
        "top5": totals[1].item() / count,
        "loss": totals[2].item() / count,
        "samples": totals[3].item(),
    }


def restore_ema(stats_ema: BufferEma | None, ckpt: Path, notes: list[str]) -> None:
    """The EMA of the BatchNorm statistics (the weights' EMA is loaded with the optimizer)."""
    if stats_ema is None:
        return
    saved = checkpoint.read_ema(ckpt)
    if saved is None:
        notes.append("the checkpoint has no EMA weights: the EMA restarts from the current weights")
        return
    stats_ema.load(saved)


def train(cfg: Config) -> dict[str, float]:
    """Run (or continue) the pretraining described by `cfg`; returns the final metrics.

    With `checkpoint.resume=auto` a run folder that holds a valid checkpoint continues from it:
    weights, optimizer, step, data position, RNG, EMA, counters and wandb run. A stop signal
    (SIGUSR1/SIGTERM, see `coatnet_scale.stop`) ends the run at the next step boundary after a
    checkpoint; the result then has `stopped` = 1.
    """
    # ---- context ---------------------------------------------------------------------------
    env = dist_env()
    binding = init_process_group(cfg, env)  # the rank's device first, then the process group
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(redact(dump_yaml(cfg)))
    dist.barrier()
    notes: list[str] = []  # set-up messages, printed once the logger exists
    report_ranks(binding, env.rank, run_dir, cfg.data.num_workers, notes)
    seed_weights(cfg.train.seed)
    dtype = DTYPES[cfg.precision.dtype]

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
    notes += train_loader.order_notes
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
    model = build_sharded_model(cfg.model, cfg.zero.stage, ds_config, binding.device)
    if saved is None and cfg.checkpoint.init_from:
        source = cfg.checkpoint.init_from
        state = checkpoint.initial_weights(Path(source), cfg.checkpoint.init_ema)
        fresh = load_initial_weights(model, state, cfg.zero.stage, source)
        notes.append(
            f"initialised from {source}"
            + (f"; newly initialised: {', '.join(fresh)}" if fresh else "")
        )
    engine = build_engine(model, cfg, ds_config)
    device = engine.device
    if device != binding.device:
        raise DeviceError(
            f"DeepSpeed placed rank {env.rank}'s model on {device}, but the rank is bound to "
            f"{binding.device}: DeepSpeed chose its accelerator from what torch saw (set "
            "DS_ACCELERATOR=cpu for distributed.device=cpu; launch/pretrain.py does)"
        )
    normalizer = Normalizer(device, dtype)
    flops_per_image = 6 * total_macs(cfg.model)
    peak_flops = cfg.logging.peak_flops or (
        device_peak_flops(
            torch.cuda.get_device_name(device), cfg.precision.dtype, cfg.precision.tf32
        )
        if device.type == "cuda"
        else None
    )
    guard = StepGuard(cfg.train.max_nonfinite_steps, cfg.precision.min_loss_scale)
    # fp32 ZeRO-0: the engine drives our optimizer directly and reports no gradient norm
    own_norm = isinstance(engine.optimizer, GuardedAdamW)
    norm_before_step = None

    start_step = 0
    if saved is not None and load_plan is not None:
        checkpoint.load(engine, load_plan)
        train_loader.load_state_dict(saved.data)
    # after loading: an EMA the checkpoint lacks starts from the loaded weights, not the initial
    stats_ema = (
        BufferEma(engine.module, cfg.train.ema_decay, device) if cfg.train.ema_decay > 0 else None
    )
    if saved is not None and load_plan is not None:
        restore_ema(stats_ema, resume_from, notes)
        start_step = saved.step
        guard.skipped, guard.loss_scale_skips = saved.skipped_steps, saved.loss_scale_skips
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
            guard.skipped,
            logger.wandb_run_id,
            env.world_size,
            guard.loss_scale_skips,
        )
        checkpoint.save(
            engine,
            checkpoint_root(run_dir),
            state,
            stats_ema.shadow | whole_ema_weights(engine)
            if stats_ema is not None and env.is_main
            else None,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_every,
            logger.message,
        )

    # Last thing before the loop: the RNG streams continue exactly where the checkpoint left them
    # (same world size), or restart from a seed of (seed, step) on another world size; a new run
    # starts each rank's own streams.
    same_world = saved is not None and saved.world_size == env.world_size
    if resume_from is None or not checkpoint.restore_rng(resume_from, env.rank, same_world):
        seed_rank_streams(seed_for(cfg.train.seed, start_step), env.rank)

    # ---- the loop --------------------------------------------------------------------------------
    stop = StopRequest()  # from here on a stop signal means: checkpoint, then exit cleanly
    batches = iter(train_loader)
    final: dict[str, float] = {}
    window = ThroughputWindow()  # training steps only: eval and checkpoint time measured apart
    last_save = time.monotonic()
    try:
        for step in range(start_step, cfg.train.total_steps):
            lr = lr_at(step, cfg.optim.lr, cfg.schedule, cfg.train.total_steps)
            set_lr(engine.optimizer, lr)
            scale_before = loss_scale(engine)
            losses = []
            for micro in range(plan.accumulation):
                wait_start = time.perf_counter()
                batch = next(batches)
                window.data_wait += time.perf_counter() - wait_start
                images = normalizer(batch["image"].to(device, non_blocking=True))
                targets = batch["label"].to(device, non_blocking=True)
                valid = batch["valid"].to(device, non_blocking=True)
                if mixup is not None:
                    np.random.seed(seed_for(cfg.train.seed, step, env.rank, micro) % (1 << 32))
                    images, targets = mixup(images, targets)
                logits = engine(images)
                loss = classification_loss(
                    logits, targets, cfg.train.loss, cfg.train.label_smoothing, valid
                )
                engine.backward(loss)
                if micro == plan.accumulation - 1 and own_norm:
                    norm_before_step = gradient_norm(engine.module)
                engine.step()
                losses.append(loss.detach().float())
            window.images += cfg.train.global_batch_size

            # The step guard (coatnet_scale/guard.py): the optimizer has already skipped an update
            # whose gradients were not finite (DeepSpeed's check is all-reduced; fp32 ZeRO-0's
            # GuardedAdamW sees gradients averaged over ranks); the loss is the mean over all
            # ranks, so every rank classifies the step the same way.
            loss_value = global_mean(torch.stack(losses).mean(), env.world_size)
            reported = norm_before_step if own_norm else engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else None
            applied = engine.was_step_applied()
            outcome = guard.observe(loss_value, grad_norm, applied, scale_before)
            if outcome == "applied" and stats_ema is not None:
                stats_ema.update(engine.module)
            elif outcome == "nonfinite":
                logger.message(
                    f"step {step + 1}: non-finite loss {loss_value} or gradient norm {grad_norm}: "
                    "update skipped on every rank"
                )
                guard.check()
            logger.advance()

            done = step + 1
            if done % cfg.logging.log_every == 0 or done == cfg.train.total_steps:
                elapsed = window.training_seconds()
                img_per_s = window.images / elapsed
                metrics = {
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": float("nan") if grad_norm is None else grad_norm,
                    "img_per_s": img_per_s,
                    "step_time_s": elapsed * cfg.train.global_batch_size / window.images,
                    "data_wait_share": window.data_wait / elapsed,
                    **device_memory_metrics(device),
                    "skipped_steps": guard.skipped,
                    "bad_samples": global_sum(train_loader.bad_samples, device),
                    "epoch": train_loader.state_dict()["epoch"],
                }
                if peak_flops:
                    metrics["mfu"] = flops_per_image * img_per_s / (peak_flops * env.world_size)
                if scale_before is not None:
                    metrics |= {
                        "loss_scale": loss_scale(engine),
                        "loss_scale_skips": guard.loss_scale_skips,
                    }
                logger.log(done, metrics)
                final.update(metrics)
                train_loader.bad_summary()
                window.reset()

            last = done == cfg.train.total_steps
            if eval_loader is not None and (
                last or (cfg.train.eval_every and done % cfg.train.eval_every == 0)
            ):
                eval_start = time.perf_counter()
                result = {
                    f"val_{k}": v for k, v in evaluate(engine, eval_loader, normalizer).items()
                }
                if stats_ema is not None:
                    with ema_applied(engine, stats_ema):
                        result |= {
                            f"val_ema_{k}": v
                            for k, v in evaluate(engine, eval_loader, normalizer).items()
                        }
                result["eval_s"] = time.perf_counter() - eval_start
                window.pause("eval", result["eval_s"])
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
            # on stopping, and on which signal asked for it, so all of them do the same.
            due_anywhere, signum = largest([float(bool(due)), float(stop.received or 0)], device)
            save_now, stop_now = due_anywhere > 0, signum > 0
            if last or save_now or stop_now:
                save_start = time.perf_counter()
                save(done)
                last_save = time.monotonic()
                window.pause("checkpoint", time.perf_counter() - save_start)
                logger.log(done, {"checkpoint_s": time.perf_counter() - save_start})
            if stop_now and not last:
                logger.message(
                    f"stop requested ({signal.Signals(int(signum)).name}): stopped after step "
                    f"{done} with a checkpoint; the same command resumes"
                )
                final["stopped"] = 1.0
                break
        final["step"] = float(done if cfg.train.total_steps > start_step else start_step)
    finally:
        stop.close()
    logger.close()
    dist.barrier()
    return final
