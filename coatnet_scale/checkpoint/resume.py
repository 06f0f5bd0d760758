"""Choosing the checkpoint a run continues from, checking it fits, converting it for another
world size, and loading it; `Resume` is what the trainer sees of all that."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coatnet_scale.checkpoint.ema_files import (
    add_ema_to_universal,
    load_universal_ema_zero3,
    read_ema,
)
from coatnet_scale.checkpoint.layout import (
    MUST_MATCH,
    RNG_DIR,
    TMP_PREFIX,
    UNIVERSAL,
    CheckpointError,
    Log,
    checkpoint_root,
    checkpoint_step,
    checkpoints_in,
    list_checkpoints,
    verify_on_ranks,
)
from coatnet_scale.checkpoint.save import point_latest, recover
from coatnet_scale.checkpoint.state import TrainerState, set_rng_state
from coatnet_scale.config import CheckpointConfig, Config
from coatnet_scale.distributed.collectives import (
    barrier,
    rank0_work_awaited_on_disk,
    rank_world,
)
from coatnet_scale.files import free_name, fsync_dir, remove_tree
from coatnet_scale.guard import overflow_at_min_scale_skips
from coatnet_scale.models.coatnet import current_key
from coatnet_scale.run_folder import IGNORED_ON_RESUME, flatten, is_free, saved_form
from coatnet_scale.seeding import seed_for, seed_rank_streams

if TYPE_CHECKING:
    from coatnet_scale.data.pipeline import TrainLoader
    from coatnet_scale.ema import BufferEma
    from coatnet_scale.guard import StepGuard


def newest_valid(root: Path, checksums: bool, log: Log) -> Path | None:
    """The newest checkpoint under `root` that verifies; damaged newer ones are reported and
    renamed `stepN.damaged` (kept for inspection). Collective when a process group exists."""
    rank, _ = rank_world()
    for ckpt in reversed(list_checkpoints(root)):
        problems = verify_on_ranks(ckpt, checksums)
        if not problems:
            return ckpt
        log(
            f"WARNING: checkpoint {ckpt} is damaged and is not used ("
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + "); falling back to the previous checkpoint"
        )
        if rank == 0:
            ckpt.rename(free_name(ckpt.with_name(ckpt.name + ".damaged")))
            point_latest(root)
        barrier()
    return None


def find_resume(cfg: CheckpointConfig, run_dir: Path, log: Log) -> Path | None:
    """The checkpoint this run continues from: `checkpoint.resume` = auto (newest valid in the run
    folder, or None to start fresh), none, or a path (a `stepN` folder, or a run/checkpoints
    folder meaning its newest valid checkpoint). All ranks call this."""
    root = checkpoint_root(run_dir)
    rank, _ = rank_world()
    if rank == 0:
        recover(root, log)
    barrier()
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return newest_valid(root, cfg.verify_checksums, log)
    path = Path(cfg.resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={cfg.resume}: no such file or folder")
    if checkpoint_step(path) is None:  # a run folder or its checkpoints folder
        inner = checkpoints_in(path)
        found = newest_valid(inner, cfg.verify_checksums, log)
        if found is None:
            raise CheckpointError(f"checkpoint.resume={cfg.resume}: no valid checkpoint in it")
        return found
    problems = verify_on_ranks(path, cfg.verify_checksums)
    if problems:
        raise CheckpointError(f"checkpoint.resume={cfg.resume} is damaged: " + "; ".join(problems))
    if rank == 0 and path.parent.resolve() == root.resolve():
        # Resuming an older checkpoint of this run: newer ones would be kept by the retention
        # policy and win the next `auto` resume. Move them aside (never deleted).
        step = checkpoint_step(path) or 0
        for newer in list_checkpoints(root):
            if (checkpoint_step(newer) or 0) > step:
                newer.rename(free_name(newer.with_name(newer.name + ".superseded")))
                log(f"{newer.name} is newer than the resumed {path.name}: kept as *.superseded")
        point_latest(root)
    barrier()
    return path


@dataclass(frozen=True)
class ConfigChanges:
    """Differences between a checkpoint's config and this run's, one 'key: checkpoint X, this
    run Y' line each: `blocking` (the checkpoint cannot load: `MUST_MATCH`), `guarded` (another
    experiment: fingerprint keys, `run_folder.py`, not listed in `checkpoint.allow_changes`) and
    `allowed` (free keys, or listed)."""

    blocking: list[str]
    guarded: list[str]
    allowed: list[str]

    def guarded_keys(self) -> list[str]:
        return [line.split(":", 1)[0] for line in self.guarded]


def within(key: str, listed: str) -> bool:
    """`key` is the listed key or under the listed prefix (`optim` covers `optim.eps`)."""
    listed = listed.rstrip(".")
    return key == listed or key.startswith(listed + ".")


def config_changes(saved: dict[str, Any], cfg: Config) -> ConfigChanges:
    """Compare a checkpoint's saved config with this run's. The saved config has its secrets
    masked: this run's is compared masked the same way."""
    before, after = flatten(saved), saved_form(cfg)
    listed = cfg.checkpoint.allow_changes
    changes = ConfigChanges([], [], [])
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        line = f"{key}: checkpoint {before.get(key)!r}, this run {after.get(key)!r}"
        # an option newer than the checkpoint (not in its config) ran with its default
        newer = key not in before
        if key.startswith(MUST_MATCH):
            changes.blocking.append(line)
        elif (
            newer or is_free(key) or key in IGNORED_ON_RESUME or any(within(key, a) for a in listed)
        ):
            changes.allowed.append(line)
        else:
            changes.guarded.append(line)
    return changes


def check_compatible(ckpt: Path, state: TrainerState, cfg: Config) -> list[str]:
    """Raise `CheckpointError` naming every blocking or guarded difference (and, for guarded
    ones, the override that allows them); return the allowed ones worth a log line."""
    changes = config_changes(state.config, cfg)
    if changes.blocking:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this run: "
            + "; ".join(changes.blocking)
            + ". Use the checkpoint's settings, or start a new run folder (export the weights "
            "and pass them as checkpoint.init_from to change the model or the ZeRO stage)"
        )
    if changes.guarded:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with other settings: "
            + "; ".join(changes.guarded)
            + ". To continue it with these changes add checkpoint.allow_changes="
            + ",".join(changes.guarded_keys())
            + "; to train them as a new experiment leave train.run_dir at auto or name another "
            "folder"
        )
    return [
        line
        for line in changes.allowed
        if not line.startswith(("train.run_dir", "checkpoint.resume", "checkpoint.allow_changes"))
    ]


@dataclass(frozen=True)
class LoadPlan:
    """Where DeepSpeed loads from: `load_dir/tag`, universal format or not."""

    load_dir: Path
    tag: str
    universal: bool


def prepare_load(ckpt: Path, saved_world: int, world: int, log: Log) -> LoadPlan:
    """Plan (and on a world-size change, make) what DeepSpeed loads. All ranks call this.

    Same world size, or no partitioned optimizer files (fp32 ZeRO-0 keeps the whole optimizer in
    the model-states file): the checkpoint as is. Otherwise (ZeRO 1-3, and bf16 ZeRO-0 whose
    BF16_Optimizer partitions its fp32 state) rank 0 converts it once with DeepSpeed's
    `ds_to_universal` into `stepN/universal` (written under a temporary name, renamed when
    complete) and the engine loads that.

    The other ranks wait for the result on the filesystem, not in a collective: a conversion of
    CoAtNet-6/7 can take longer than `distributed.timeout_minutes`, and a collective waiting that
    long failed the job (and its requeue started the same conversion again). Rank 0 reports
    progress every minute.
    """
    partitioned = any(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    if saved_world == world or not partitioned:
        return LoadPlan(ckpt.parent, ckpt.name, universal=False)

    def convert() -> str | None:
        if (ckpt / UNIVERSAL).is_dir():
            return None
        log(f"{ckpt.name} was saved by {saved_world} rank(s), this run has {world}: converting")
        started = time.perf_counter()
        try:
            failure = convert_to_universal(ckpt)
        except Exception as err:
            failure = f"converting {ckpt} to a universal checkpoint failed: {err!r}"
        if failure is None:
            log(f"converted to {ckpt / UNIVERSAL} in {time.perf_counter() - started:.1f} s")
        return failure

    failure = rank0_work_awaited_on_disk(convert, (ckpt / UNIVERSAL).is_dir, ckpt, poll_s=1.0)
    if failure:
        raise CheckpointError(failure)
    return LoadPlan(ckpt, UNIVERSAL, universal=True)


def convert_to_universal(ckpt: Path, progress_every_s: float = 60.0) -> str | None:
    """Run DeepSpeed's converter (a subprocess: it forks workers and needs the memory of one
    consolidated parameter at a time; `converter.py` ties it and its workers to this process, so
    they die with it); returns an error message or None.

    Each conversion writes into its own temporary folder, renamed `universal` when complete:
    leftovers of a dead run's conversion are removed first and are never written into again.
    """
    for leftover in ckpt.glob(f"{TMP_PREFIX}{UNIVERSAL}*"):
        remove_tree(leftover)
    tmp = ckpt / f"{TMP_PREFIX}{UNIVERSAL}-{secrets.token_hex(4)}"
    workers = "2"
    command = [
        sys.executable,
        "-m",
        "coatnet_scale.checkpoint.converter",
        str(os.getpid()),
        "--input_folder",
        str(ckpt),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        workers,
        "--num_merge_workers",
        workers,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, with the workers it forks
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        while True:
            try:
                proc.wait(timeout=progress_every_s)
                break
            except subprocess.TimeoutExpired:
                print(
                    f"converting {ckpt.name} to a universal checkpoint: "
                    f"{time.monotonic() - started:.0f} s so far",
                    flush=True,
                )
    finally:
        # The converter leads its own process group: whatever of it is left (workers orphaned
        # by an OOM-killed converter would also hold the output pipe open) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
    if proc.returncode != 0:
        tail = "".join(output).strip().splitlines()[-5:]
        return f"converting {ckpt} to a universal checkpoint failed: " + " | ".join(tail)
    try:
        add_ema_to_universal(ckpt, tmp)
    except Exception as err:  # reported like the converter's own failures, on every rank
        return f"adding the EMA to the universal checkpoint of {ckpt} failed: {err!r}"
    rename_legacy_parameter_folders(tmp)
    tmp.rename(ckpt / UNIVERSAL)
    fsync_dir(ckpt)
    return None


def rename_legacy_parameter_folders(universal: Path) -> None:
    """A universal checkpoint has a folder per parameter, named as the checkpoint named it, and
    DeepSpeed looks them up by the model's names: a checkpoint written before a parameter was
    renamed (`models.coatnet.current_key`: the head's pre-logits layer) gets today's names here."""
    zero = universal / "zero"
    for folder in list(zero.iterdir()) if zero.is_dir() else []:
        if current_key(folder.name) != folder.name:
            folder.rename(zero / current_key(folder.name))


def load(engine, plan: LoadPlan) -> None:
    """DeepSpeed's load of model, optimizer and engine counters (all ranks).

    Two repairs after a universal (elastic) load under ZeRO-3 (DeepSpeed 0.19,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`):
    - it gives every parameter group the hyperparameters of the first ("the hyperparameters of
      each parameter should be the same"): the norms, biases and tables would be decayed like the
      weights. The groups' own hyperparameters, as this run set them up, are put back (lr is set
      every step anyway);
    - it gives every group the same `step` tensor object, which AdamW increments in place once
      per group: after the resume the step count, and with it Adam's bias correction, ran ahead
      (3 steps later a 2-group run was at step 9, not 6). Each state gets its own copy;
    - it reads the moments only: the EMA of the weights is loaded the same way
      (`load_universal_ema_zero3`). ZeRO 1/2 load every optimizer-state file of a parameter.
    """
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_module_strict=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {plan.load_dir / plan.tag}")
    overflow_at_min_scale_skips(engine)  # the loaded fp16 scaler replaced ours
    if plan.universal:
        for group, own in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(own)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            load_universal_ema_zero3(engine, plan.load_dir / plan.tag)


def restore_rng(ckpt: Path, rank: int, same_world: bool) -> bool:
    """This rank's saved RNG states, when the world size is unchanged; returns whether it did.
    (On another world size there is no saved state for every rank; the caller reseeds.)"""
    path = ckpt / RNG_DIR / f"rank{rank:05d}.pt"
    if not same_world or not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


@dataclass(frozen=True)
class Resume:
    """Where a run starts, decided once before anything is built, and all that follows from it.

    A new run has no `checkpoint`. Otherwise: the committed checkpoint `find_resume` chose, its
    trainer state, and DeepSpeed's load plan (a universal checkpoint, made now, when the world
    size changed). The trainer asks it, in this order, for the DeepSpeed config
    (`deepspeed_config`), to restore the engine, data position, EMA statistics and counters
    (`restore`), and last, just before the loop, for the RNG streams (`restore_rng`).
    """

    checkpoint: Path | None = None
    saved: TrainerState | None = None
    load_plan: LoadPlan | None = None

    @classmethod
    def find(cls, cfg: Config, run_dir: Path, world_size: int, log: Log) -> Resume:
        """The run's start (all ranks; collective: verification, conversion)."""
        ckpt = find_resume(cfg.checkpoint, run_dir, log)
        if ckpt is None:
            return cls()
        saved = TrainerState.read(ckpt)
        for line in check_compatible(ckpt, saved, cfg):
            log(f"changed since the checkpoint: {line}")
        return cls(ckpt, saved, prepare_load(ckpt, saved.world_size, world_size, log))

    @property
    def start_step(self) -> int:
        return self.saved.step if self.saved is not None else 0

    @property
    def wandb_run_id(self) -> str | None:
        return self.saved.wandb_run_id if self.saved is not None else None

    def deepspeed_config(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """The run's DeepSpeed config, told to read the universal format when loading one."""
        if self.load_plan is not None and self.load_plan.universal:
            return ds_config | {"checkpoint": {"load_universal": True}}
        return ds_config

    def restore(
        self, engine, loader: TrainLoader, stats_ema: BufferEma | None, guard: StepGuard, log: Log
    ) -> None:
        """Weights, optimizer (with the weights' EMA), engine counters, data position, the EMA of
        the BatchNorm statistics and the step guard's counters. An EMA the checkpoint lacks
        starts from the loaded statistics, not the initial ones."""
        if self.saved is None or self.load_plan is None or self.checkpoint is None:
            return
        load(engine, self.load_plan)
        try:
            loader.load_state_dict(self.saved.data)
        except ValueError as err:  # seed, order or data changed: a requeue cannot fix it
            raise CheckpointError(f"{self.checkpoint}: {err}") from None
        if stats_ema is not None:
            stats_ema.reset(engine.module)
            saved_ema = read_ema(self.checkpoint)
            if saved_ema is None:
                log("the checkpoint has no EMA weights: the EMA restarts from the current weights")
            else:
                stats_ema.load(saved_ema)
        guard.skipped, guard.loss_scale_skips = (
            self.saved.skipped_steps,
            self.saved.loss_scale_skips,
        )
        log(
            f"resumed from {self.checkpoint} (step {self.start_step}, saved by "
            f"{self.saved.world_size} rank(s), {self.saved.data['samples_consumed']:,} samples "
            "consumed)"
        )

    def restore_rng(self, seed: int, rank: int, world_size: int) -> None:
        """The RNG streams continue exactly where the checkpoint left them (same world size), or
        restart from a seed of (seed, step) on another world size; a new run starts each rank's
        own streams. Called last before the loop: set-up draws nothing from them afterwards."""
        same_world = self.saved is not None and self.saved.world_size == world_size
        if self.checkpoint is None or not restore_rng(self.checkpoint, rank, same_world):
            seed_rank_streams(seed_for(seed, self.start_step), rank)
