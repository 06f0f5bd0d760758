"""train(cfg): the pretraining loop, readable top to bottom.

Set-up (device and process group, run folder, data, model, engine, EMA, logging), then one loop
over optimizer steps (`TrainingLoop`): data -> forward/backward per micro-batch -> step -> step
guard and spike check -> log -> eval -> checkpoint. Everything configurable comes from the
frozen config tree; runtime facts (rank, world size, device) live in `DistEnv`, the device
binding and local variables, never in the config. Every tensor the loop makes lives on the
engine's device, the one this rank bound before the process group started
(`distributed/device.py`). Around the loop: the stall watchdog (`watchdog.py`), the straggler
report (`stragglers.py`), loss-spike rollback (`spikes.py`) and the goodput ledger
(`goodput.py`)."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from coatnet_scale import checkpoint
from coatnet_scale.checkpoint import Resume, TrainerState, checkpoint_root
from coatnet_scale.checkpoint.init_from import consolidated_file, initial_state
from coatnet_scale.checkpoint.layout import CheckpointError
from coatnet_scale.checkpoint.save import BackgroundSaver
from coatnet_scale.config import Config, DistributedConfig, config_hash, dump_yaml, to_dict
from coatnet_scale.data import gpu_decode
from coatnet_scale.data.batch_augment import BatchAugment, Mixing
from coatnet_scale.data.pipeline import (
    BatchPlan,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
)
from coatnet_scale.data.transforms import Normalizer
from coatnet_scale.distributed.collectives import (
    from_rank0,
    gather,
    global_mean,
    global_sum,
    largest,
)
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
from coatnet_scale.distributed.env import DistEnv, dist_env
from coatnet_scale.ema import BufferEma, ema_applied, whole_ema_weights
from coatnet_scale.files import atomic_write_text
from coatnet_scale.goodput import GoodputLedger
from coatnet_scale.guard import NonFiniteError, StepGuard, gradient_norm
from coatnet_scale.lease import Lease, RunFolderBusy
from coatnet_scale.logging import RunLogger, ThroughputWindow, redact
from coatnet_scale.losses import classification_loss
from coatnet_scale.memory import device_memory_metrics
from coatnet_scale.models.flops import total_macs
from coatnet_scale.optim import GuardedAdamW, lr_at, set_lr
from coatnet_scale.plan.hardware import device_peak_flops
from coatnet_scale.run_folder import run_folder
from coatnet_scale.seeding import seed_weights
from coatnet_scale.spikes import Rollback, SpikeRollback, read_rollbacks
from coatnet_scale.stop import STOP_FILE, StopRequest
from coatnet_scale.stragglers import DeviceForwardClock, StragglerWatch
from coatnet_scale.watchdog import Heartbeat, Watchdog

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RANK_LINES_SHOWN = 16  # larger jobs: a summary on the console, every rank in RUN/ranks.json

__all__ = ["DTYPES", "NonFiniteError", "train"]


def report_ranks(
    binding: DeviceBinding, rank: int, run_dir: Path, loader_workers: int, notes: list[str]
) -> None:
    """Every rank's host, device, CPU affinity and free memory, gathered on rank 0: written to
    RUN/ranks.json and shown (a summary for large jobs). Two ranks on one GPU stop the run; a
    rank confined to one CPU while it has loader workers is warned about."""
    reports = gather(rank_report(rank, binding))
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
def evaluate(engine, loader, normalizer: Normalizer, heartbeat: Heartbeat) -> dict[str, float]:
    """Top-1/top-5 and the mean cross-entropy over the validation shards, summed over ranks (each
    sample counted once). A heartbeat per batch: a long evaluation is not a stall."""
    device = engine.device
    heartbeat.enter("eval")  # from here: the loader's start-up, a compile for eval mode
    engine.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, CE, count
    for batch in loader:
        heartbeat.enter("eval")
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


class MicroBatches:
    """The micro-batches of one optimizer step through the engine: loader batches moved to the
    rank's device (non-blocking), augmented there (flip, RandAugment, mixup/CutMix from each
    sample's draws: `BatchAugment`) and normalised, forward, loss, backward, `engine.step()`
    (DeepSpeed steps the optimizer at the accumulation boundary)."""

    def __init__(
        self,
        engine,
        loader: TrainLoader,
        plan: BatchPlan,
        cfg: Config,
        heartbeat: Heartbeat,
        forward_clock: DeviceForwardClock,
    ) -> None:
        self.engine, self.plan, self.cfg, self.loader = engine, plan, cfg, loader
        self.heartbeat, self.forward_clock = heartbeat, forward_clock
        self.batches: Iterator[dict] = iter(loader)
        self.normalizer = Normalizer(engine.device, DTYPES[cfg.precision.dtype])
        self.augment = BatchAugment(
            cfg.model.image_size,
            cfg.data.randaugment_n,
            cfg.data.randaugment_m,
            Mixing(cfg.data.mixup_alpha, cfg.data.cutmix_alpha),
            cfg.model.num_classes,
            cfg.train.label_smoothing,
            self.normalizer,
        )
        # fp32 ZeRO-0: the engine drives our optimizer directly and reports no gradient norm
        self.own_norm = isinstance(engine.optimizer, GuardedAdamW)
        self.keys: list[str] = []  # the samples of the last step (named when it spikes)

    def restart(self) -> None:
        """Read from the loader's position again (after a rollback moved it)."""
        self.batches = iter(self.loader)

    def step(self, step: int, window: ThroughputWindow) -> tuple[torch.Tensor, float | None]:
        """Run one optimizer step; returns this rank's mean loss and the gradient norm."""
        engine, device, train = self.engine, self.engine.device, self.cfg.train
        losses, own_norm, beat = [], None, self.heartbeat.enter
        self.keys = []
        for micro in range(self.plan.accumulation):
            beat("data", step)
            wait_start = time.perf_counter()
            batch = next(self.batches)
            window.data_wait += time.perf_counter() - wait_start
            self.keys += [key for key in batch["key"] if key]
            crops, valid, labels, refused = gpu_decode.decode_batch(
                batch, device, self.cfg.data.train_interpolation
            )
            if refused:
                self.loader.count_bad(refused)
            beat("forward")
            forward_start = self.forward_clock.start()
            images, targets = self.augment(
                crops,
                batch["augment"],
                batch["mix"],
                batch["slot"],
                labels.to(device, non_blocking=True),
                valid,
            )
            valid = valid.to(device, non_blocking=True)
            loss = classification_loss(
                engine(images), targets, train.loss, train.label_smoothing, valid
            )
            self.forward_clock.stop(forward_start)
            beat("backward")
            engine.backward(loss)
            if micro == self.plan.accumulation - 1 and self.own_norm:
                own_norm = gradient_norm(engine.module)
            beat("optimizer")
            engine.step()
            losses.append(loss.detach().float())
        window.step_done(train.global_batch_size)
        reported = own_norm if self.own_norm else engine.get_global_grad_norm()
        return torch.stack(losses).mean(), float(reported) if reported is not None else None


class Checkpointing:
    """When to save (every N steps, every M minutes, at the end, on a stop signal: agreed by all
    ranks) and what: DeepSpeed's shards with the trainer state, RNG and EMA files."""

    def __init__(
        self,
        engine,
        cfg: Config,
        run_dir: Path,
        loader: TrainLoader,
        guard: StepGuard,
        stats_ema: BufferEma | None,
        logger: RunLogger,
        env: DistEnv,
        lease: Lease | None,
    ) -> None:
        self.engine, self.cfg, self.run_dir, self.loader = engine, cfg, run_dir, loader
        self.guard, self.stats_ema, self.logger, self.env = guard, stats_ema, logger, env
        self.lease = lease  # rank 0's
        self.background = BackgroundSaver() if cfg.checkpoint.async_save else None
        self.last_save = time.monotonic()

    def decide(self, done: int, stop: StopRequest) -> tuple[bool, int]:
        """(save now, the stop signal or 0). Ranks' clocks and signals differ: they agree (one
        tiny all-reduce) on saving, on stopping and on which signal asked, so all do the same.
        A run whose folder was taken over while it was frozen stops here on every rank, before
        it writes another checkpoint into it."""
        every_steps, every_minutes = (
            self.cfg.checkpoint.every_steps,
            self.cfg.checkpoint.every_minutes,
        )
        minutes = (time.monotonic() - self.last_save) / 60
        due = (every_steps and done % every_steps == 0) or (
            every_minutes and minutes >= every_minutes
        )
        lost = self.lease.lost if self.lease is not None else None
        due_anywhere, signum, lost_anywhere = largest(
            [float(bool(due)), float(stop.received or 0), float(lost is not None)],
            self.engine.device,
        )
        if lost_anywhere:
            raise RunFolderBusy(
                f"stopped without a checkpoint: {lost or 'rank 0 lost the run folder'}"
            )
        return due_anywhere > 0, int(signum)

    def save(self, step: int, final: bool = False) -> float:
        """Save checkpoint `step` on every rank; returns the seconds training stalled for it (with
        `checkpoint.async_save`, the copy to host memory and any wait for the previous save).
        A `final` save (the last step, a stop signal) is synchronous: the run ends right after,
        and its time is what a stop costs (the time-limit warning's lead must cover it)."""
        start = time.perf_counter()
        if final:
            self.finish()  # one save at a time: the one in the background first
        state = TrainerState.of(
            self.cfg,
            step,
            self.loader.state_dict(),
            self.guard.skipped,
            self.logger.wandb_run_id,
            self.env.world_size,
            self.guard.loss_scale_skips,
        )
        ema = None
        if self.stats_ema is not None and self.env.is_main:
            ema = self.stats_ema.shadow | whole_ema_weights(self.engine)
        checkpoint.save(
            self.engine,
            checkpoint_root(self.run_dir),
            state,
            ema,
            self.cfg.checkpoint.keep_last,
            self.cfg.checkpoint.keep_every,
            self.logger.message,
            None if final else self.background,
            self.lease.still_ours if self.lease is not None else None,
        )
        self.last_save = time.monotonic()
        return time.perf_counter() - start

    def finish(self) -> None:
        """Wait for a save still being written in the background (committed on rank 0)."""
        if self.background is not None:
            self.background.wait()

    def settle(self) -> None:
        """On the way out after an error: give a save being written a while to finish (the lease
        is released after this), without raising what it failed with."""
        if self.background is not None:
            with contextlib.suppress(CheckpointError):
                self.background.wait(timeout=120)


def validation(
    engine, loader, normalizer: Normalizer, stats_ema: BufferEma | None, heartbeat: Heartbeat
) -> dict[str, float]:
    """val_* metrics of the weights, and val_ema_* of the EMA weights and statistics."""
    start = time.perf_counter()
    result = {f"val_{k}": v for k, v in evaluate(engine, loader, normalizer, heartbeat).items()}
    if stats_ema is not None:
        with ema_applied(engine, stats_ema):
            ema_result = evaluate(engine, loader, normalizer, heartbeat)
        result |= {f"val_ema_{k}": v for k, v in ema_result.items()}
    return result | {"eval_s": time.perf_counter() - start}


@contextlib.contextmanager
def own_run_folder(run_dir: Path, is_main: bool, log) -> Iterator[Lease | None]:
    """Rank 0 holds the run folder's lease (`coatnet_scale/lease.py`) for the run's lifetime;
    when another live run holds it, every rank raises the same `RunFolderBusy`."""
    lease, refusal = None, None
    if is_main:
        try:
            lease = Lease.take(run_dir, log)
        except RunFolderBusy as err:
            refusal = str(err)
        except OSError as err:  # every rank must hear of it, not wait in the broadcast below
            refusal = f"cannot take the run folder {run_dir}: {err}"
    refusal = from_rank0(refusal)
    if refusal is not None:
        raise RunFolderBusy(refusal)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()


def record_stop(
    run_dir: Path, signum: signal.Signals, received_at: float | None, step: int
) -> None:
    """RUN/stop_signal.json: which signal stopped the run after which step, and when rank 0 got
    it (now, when only other ranks did). The SLURM supervisor measures the warning signal's lead
    before the time limit from it (launch/slurm/warning.py)."""
    record = {"signal": signum.name, "received_at": received_at or time.time(), "step": step}
    with contextlib.suppress(OSError):  # a note for the supervisor: never a reason to hang
        atomic_write_text(run_dir / STOP_FILE, json.dumps(record))


def write_run_config(cfg: Config, run_dir: Path, is_main: bool) -> None:
    """RUN/config.yaml: the config this run uses (written by rank 0 while the others wait)."""
    if is_main:
        (run_dir / "config.yaml").write_text(redact(dump_yaml(cfg)))
    dist.barrier()


def build_training_engine(
    cfg: Config, env: DistEnv, binding: DeviceBinding, resume: Resume, run_dir: Path, log
):
    """The model, built sharded on the rank's device (or initialised from `checkpoint.init_from`
    for a new run), wrapped by DeepSpeed with the config generated from `cfg`."""
    ds_config = resume.deepspeed_config(to_deepspeed_config(cfg, env.world_size))
    if env.is_main:
        save_deepspeed_config(ds_config, run_dir)
    model = build_sharded_model(cfg.model, cfg.zero.stage, ds_config, binding.device)
    if resume.checkpoint is None and cfg.checkpoint.init_from:
        source = cfg.checkpoint.init_from
        weights = consolidated_file(
            Path(source), cfg.checkpoint.init_ema, run_dir, cfg.checkpoint.verify_checksums, log
        )
        fresh = load_initial_weights(model, initial_state(weights), cfg.zero.stage, source)
        log(
            f"initialised from {source}"
            + (f"; newly initialised: {', '.join(fresh)}" if fresh else "")
        )
    engine = build_engine(model, cfg, ds_config)
    if engine.device != binding.device:
        raise DeviceError(
            f"DeepSpeed placed rank {env.rank}'s model on {engine.device}, but the rank is bound "
            f"to {binding.device}: DeepSpeed chose its accelerator from what torch saw (set "
            "DS_ACCELERATOR=cpu for distributed.device=cpu; launch/pretrain.py does)"
        )
    return engine


def peak_flops(cfg: Config, device: torch.device, world_size: int) -> float | None:
    """The dense peak of all ranks together, for MFU: `logging.peak_flops` per device, else the
    GPU's datasheet figure; None on CPUs."""
    per_device = cfg.logging.peak_flops or (
        device_peak_flops(
            torch.cuda.get_device_name(device), cfg.precision.dtype, cfg.precision.tf32
        )
        if device.type == "cuda"
        else None
    )
    return per_device * world_size if per_device else None


def announce(
    logger: RunLogger, cfg: Config, engine, plan: BatchPlan, notes: list[str], start_step: int
) -> None:
    """The run's one-line summary, then the set-up messages collected before the logger."""
    logger.message(
        f"{cfg.model.name}: {sum(p.numel() for p in engine.module.parameters()):,} parameters on "
        f"this rank, {plan.world_size} rank(s), ZeRO-{cfg.zero.stage}, {cfg.precision.dtype}, "
        f"{plan.accumulation} micro-batch(es) of {plan.micro_batch} per rank per step, "
        f"config {config_hash(cfg)}, run folder {run_folder(cfg)}"
    )
    for note in notes:
        logger.message(note)
    if start_step >= cfg.train.total_steps:
        logger.message(
            f"the run is already complete (step {start_step} of train.total_steps="
            f"{cfg.train.total_steps}); raise train.total_steps to continue it"
        )


def training_metrics(
    engine, window: ThroughputWindow, guard: StepGuard, loader: TrainLoader
) -> dict[str, float]:
    """What each log record adds to loss, lr and gradient norm: throughput, memory, skipped
    steps, bad samples of all ranks, the epoch, and fp16's loss scale."""
    metrics = {
        **window.metrics(),
        **device_memory_metrics(engine.device),
        "skipped_steps": guard.skipped,
        "bad_samples": global_sum(loader.bad_samples, engine.device),
        "epoch": loader.state_dict()["epoch"],
    }
    scale = loss_scale(engine)
    if scale is not None:
        metrics |= {"loss_scale": scale, "loss_scale_skips": guard.loss_scale_skips}
    return metrics


@contextlib.contextmanager
def watching(
    heartbeat: Heartbeat,
    run_dir: Path,
    env: DistEnv,
    distributed: DistributedConfig,
    start_step: int,
) -> Iterator[None]:
    """Every rank's stall watchdog (`coatnet_scale/watchdog.py`), started together (rank 0 moves
    an earlier attempt's stall report aside and hands out this run's token) and stopped on any
    way out: a run that raised must not be judged stalled later in the same process."""
    if not distributed.stall_after_s:
        yield
        return
    if env.is_main:
        Watchdog.clear(run_dir)
    token = from_rank0(secrets.token_hex(8) if env.is_main else None)
    watchdog = Watchdog(
        heartbeat,
        run_dir,
        env.rank,
        env.world_size,
        token,
        distributed.stall_after_s,
        start_step,
        30 * distributed.timeout_minutes,  # the first step: compile, first collectives
    )
    watchdog.start()
    try:
        yield
    except BaseException:
        watchdog.stop(leaving_on_error=True)
        raise
    watchdog.stop()


def train(cfg: Config) -> dict[str, float]:
    """Run (or continue) the pretraining described by `cfg`; returns the final metrics.

    With `checkpoint.resume=auto` a run folder that holds a valid checkpoint continues from it:
    weights, optimizer, step, data position, RNG, EMA, counters and wandb run (`Resume`). A stop
    signal (SIGUSR1/SIGTERM, see `coatnet_scale.stop`) ends the run at the next step boundary
    after a checkpoint; the result then has `stopped` = 1. The run folder (`run_folder.py`: by
    default one per experiment) is this run's alone while it runs (`lease.py`).
    """
    env = dist_env()
    binding = init_process_group(cfg, env)  # the rank's device first, then the process group
    run_dir = run_folder(cfg)
    notes: list[str] = []  # set-up messages, printed once the logger exists
    with own_run_folder(run_dir, env.is_main, notes.append) as lease:
        write_run_config(cfg, run_dir, env.is_main)
        return run_in(run_dir, lease, cfg, env, binding, notes)


def run_in(
    run_dir: Path,
    lease: Lease | None,
    cfg: Config,
    env: DistEnv,
    binding: DeviceBinding,
    notes: list[str],
) -> dict[str, float]:
    """`train` once the run folder is this run's."""
    report_ranks(binding, env.rank, run_dir, cfg.data.num_workers, notes)
    seed_weights(cfg.train.seed)
    resume = Resume.find(cfg, run_dir, env.world_size, notes.append)
    ledger = GoodputLedger(run_dir, env.is_main, resume.start_step, env.world_size)
    plan = BatchPlan(
        cfg.train.global_batch_size, cfg.train.micro_batch_size, env.rank, env.world_size
    )
    device_decode = gpu_decode.resolve(cfg.data.decode, binding.device, notes.append)
    train_loader = build_train_loader(
        cfg.data, cfg.model.image_size, plan, cfg.train.seed, device_decode
    )
    eval_loader = None
    if cfg.data.val_shards:
        eval_loader = build_eval_loader(
            cfg.data, cfg.model.image_size, cfg.train.micro_batch_size, env.rank, env.world_size
        )
    engine = build_training_engine(cfg, env, binding, resume, run_dir, notes.append)
    stats_ema = (
        BufferEma(engine.module, cfg.train.ema_decay, engine.device)
        if cfg.train.ema_decay > 0
        else None
    )
    guard = StepGuard(cfg.train.max_nonfinite_steps, cfg.precision.min_loss_scale)
    resume.restore(engine, train_loader, stats_ema, guard, notes.append)
    notes += train_loader.order_notes  # after the restore: a resume keeps the run's order
    start_step, total_steps = resume.start_step, cfg.train.total_steps
    logger = RunLogger(
        cfg.logging,
        run_dir,
        env.is_main,
        to_dict(cfg),
        total_steps,
        start_step,
        resume.wandb_run_id,
    )
    announce(logger, cfg, engine, plan, notes, start_step)
    heartbeat, forward_clock = Heartbeat(), DeviceForwardClock(engine.device)
    loop = TrainingLoop(
        cfg,
        env,
        run_dir,
        engine,
        plan,
        train_loader,
        eval_loader,
        MicroBatches(engine, train_loader, plan, cfg, heartbeat, forward_clock),
        guard,
        stats_ema,
        logger,
        heartbeat,
        StragglerWatch(heartbeat, forward_clock, engine.device, run_dir),
        Checkpointing(engine, cfg, run_dir, train_loader, guard, stats_ema, logger, env, lease),
        SpikeRollback(
            cfg.spike,
            run_dir,
            env.is_main,
            engine,
            train_loader,
            stats_ema,
            guard,
            from_rank0(read_rollbacks(run_dir) if env.is_main else None),
        ),
        ledger,
        ThroughputWindow(6 * total_macs(cfg.model), peak_flops(cfg, engine.device, env.world_size)),
    )
    try:  # a resume skips them too
        train_loader.skip([r.slots for r in loop.spikes.rollbacks])
    except ValueError as err:  # the global batch changed: a requeue cannot fix it
        raise CheckpointError(f"{run_dir / 'rollbacks.json'}: {err}") from None
    with watching(heartbeat, run_dir, env, cfg.distributed, start_step):
        resume.restore_rng(cfg.train.seed, env.rank, env.world_size)  # last: set-up draws no more
        final = loop.run(start_step)
        logger.close()
        heartbeat.enter("collective")
        dist.barrier()
    return final


@dataclass
class TrainingLoop:
    """The loop over optimizer steps and what happens between them, one method each: the step
    (`train_step`), a loss-spike rollback (`roll_back`), the log interval (`log`), evaluation
    (`evaluate`), checkpoints and stop signals (`checkpoint`), and the attempt's end (`end`).
    Built once by `run_in` from the parts it set up; it owns none of them."""

    cfg: Config
    env: DistEnv
    run_dir: Path
    engine: Any
    plan: BatchPlan
    loader: TrainLoader
    eval_loader: Any
    micro_batches: MicroBatches
    guard: StepGuard
    stats_ema: BufferEma | None
    logger: RunLogger
    heartbeat: Heartbeat
    stragglers: StragglerWatch
    checkpoints: Checkpointing
    spikes: SpikeRollback
    ledger: GoodputLedger
    window: ThroughputWindow

    def run(self, start_step: int) -> dict[str, float]:
        """Train from `start_step` to `train.total_steps` (or a stop signal); the final metrics."""
        total_steps = self.cfg.train.total_steps
        if self.spikes.keep_due(start_step):
            self.keep_good_state(start_step)
        self.ledger.first_step()
        stop = StopRequest()  # from here on a stop signal means: checkpoint, then exit cleanly
        final: dict[str, float] = {"step": float(start_step)}
        step = start_step
        try:
            while step < total_steps:
                done, last = step + 1, step + 1 == total_steps
                loss, lr, grad_norm, rollback = self.train_step(step)
                if rollback is not None:
                    step = self.roll_back(rollback, loss, lr, grad_norm)
                    continue
                self.logger.advance()
                final["step"] = float(done)
                if done % self.cfg.logging.log_every == 0 or last:
                    final |= self.log(done, loss, lr, grad_norm)
                every = self.cfg.train.eval_every
                if self.eval_loader is not None and (last or (every and done % every == 0)):
                    final |= self.evaluate(done)
                if self.checkpoint(done, last, stop):
                    final["stopped"] = 1.0
                    break
                if self.spikes.keep_due(done):
                    self.keep_good_state(done)
                step = done
            self.heartbeat.enter("checkpoint")
            self.checkpoints.finish()  # the last checkpoint is committed before the run ends
            self.end(int(final["step"]), "stopped" if final.get("stopped") else "finished")
        except BaseException:
            self.heartbeat.enter("exited")  # at once: the watchers never name a rank that failed
            self.ledger.update(int(final["step"]), self.heartbeat.total_s, "failed")
            raise
        finally:
            self.checkpoints.settle()
            stop.close()
            self.spikes.close()
        return final

    def train_step(self, step: int) -> tuple[float, float, float | None, Rollback | None]:
        """One optimizer step, judged: (loss over all ranks, lr, gradient norm, the rollback a
        loss spike caused or None)."""
        cfg, engine, guard = self.cfg, self.engine, self.guard
        lr = lr_at(step, cfg.optim.lr, cfg.schedule, cfg.train.total_steps)
        lr *= self.spikes.lr_factor(step)
        set_lr(engine.optimizer, lr)
        scale_before = loss_scale(engine)
        first_slot = self.loader.samples_consumed
        rank_loss, grad_norm = self.micro_batches.step(step, self.window)
        # The step guard (coatnet_scale/guard.py): the optimizer has already skipped an update
        # whose gradients were not finite; the loss is the mean over all ranks, so every rank
        # classifies the step the same way (and the same way finds a spike).
        self.heartbeat.enter("collective")
        loss = global_mean(rank_loss, self.env.world_size)
        outcome = guard.observe(loss, grad_norm, engine.was_step_applied(), scale_before)
        if outcome == "nonfinite":
            self.logger.message(
                f"step {step + 1}: non-finite loss {loss} or gradient norm {grad_norm}: "
                "update skipped on every rank"
            )
            guard.check()
        if outcome != "applied":
            return loss, lr, grad_norm, None
        self.heartbeat.enter("checkpoint")  # a spike restores the snapshot: not a stall
        rollback = self.spikes.check(
            step + 1,
            loss,
            grad_norm,
            (first_slot, first_slot + self.plan.global_batch),
            lambda: [k for keys in gather(self.micro_batches.keys) for k in keys],
        )
        self.heartbeat.enter("collective")
        if rollback is None and self.stats_ema is not None:
            self.stats_ema.update(engine.module)
        return loss, lr, grad_norm, rollback

    def roll_back(self, rollback: Rollback, loss: float, lr: float, grad_norm: float | None) -> int:
        """After `SpikeRollback` restored the good state: say so, keep the spike's record with
        the steps rolled back, and read on from the new data position. Returns the step."""
        self.logger.message(self.spikes.describe(rollback))
        spike = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "rolled_back": 1}
        self.logger.log(rollback.spike_step, spike)  # moved aside with the steps rolled back
        self.logger.rewind(rollback.to_step)
        self.ledger.rolled_back(rollback.distance, self.heartbeat.total_s)
        self.micro_batches.restart()
        return rollback.to_step

    def log(self, done: int, loss: float, lr: float, grad_norm: float | None) -> dict:
        grad = float("nan") if grad_norm is None else grad_norm
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad}
        metrics |= training_metrics(self.engine, self.window, self.guard, self.loader)
        straggling, warning = self.stragglers.measure(self.window.steps)
        metrics |= straggling
        if warning:
            self.logger.message(f"WARNING: {warning}")
        self.logger.log(done, metrics)
        self.ledger.update(done, self.heartbeat.total_s)
        self.loader.bad_summary()
        self.window.reset()
        return metrics

    def evaluate(self, done: int) -> dict[str, float]:
        result = validation(
            self.engine,
            self.eval_loader,
            self.micro_batches.normalizer,
            self.stats_ema,
            self.heartbeat,
        )
        self.window.pause("eval", result["eval_s"])
        self.logger.log(done, result)
        self.logger.message(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def checkpoint(self, done: int, last: bool, stop: StopRequest) -> bool:
        """Save when due, at the end or on a stop signal (all ranks agree); True: stop now."""
        self.heartbeat.enter("collective")
        save_now, signum = self.checkpoints.decide(done, stop)
        if last or save_now or signum:
            self.heartbeat.enter("checkpoint")
            seconds = self.checkpoints.save(done, final=bool(last or signum))
            self.window.pause("checkpoint", seconds)
            self.logger.log(done, {"checkpoint_s": seconds})
        if not signum or last:
            return False
        if self.env.is_main:
            record_stop(self.run_dir, signal.Signals(signum), stop.received_at, done)
        self.logger.message(
            f"stop requested ({signal.Signals(signum).name}): stopped after step {done} with a "
            "checkpoint; the same command resumes"
        )
        return True

    def keep_good_state(self, done: int) -> None:
        self.heartbeat.enter("checkpoint")
        self.spikes.keep(done)
        self.ledger.good_state(self.heartbeat.total_s)

    def end(self, step: int, how: str) -> None:
        """The attempt's goodput summary (line, metrics) once its last checkpoint is in."""
        self.ledger.update(step, self.heartbeat.total_s, how)
        flops_per_step = self.window.flops_per_image * self.plan.global_batch
        line, goodput = self.ledger.summary(flops_per_step, self.window.peak_flops)
        self.logger.message(line)
        self.logger.log(step, goodput)
