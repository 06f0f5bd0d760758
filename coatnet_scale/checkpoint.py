"""Crash-safe sharded checkpoints: save, commit, verify, keep, resume (also on another number of
ranks), export, and initial weights for fine-tuning.

Layout of RUN/checkpoints/
--------------------------
    step00001200/                 a committed checkpoint
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt
                                  DeepSpeed's sharded files (engine.save_checkpoint)
        trainer_state.json        step, data position, counters, wandb run id, world size, the
                                  resolved config and its hash, the code version
        rng/rank00000.pt          each rank's RNG states (python, numpy, torch, accelerator)
        ema.safetensors           the fp32 EMA weights (when EMA is on)
        manifest.json             every file above with its size and SHA-256; written last
        universal/                DeepSpeed universal checkpoint, made on demand when a run
                                  resumes on another number of ranks
    latest                        name of the newest committed checkpoint (for DeepSpeed's tools)
    .tmp-step00001300/            a save in progress (or killed): rolled forward if its manifest
                                  verifies, deleted otherwise, at the next start
    step00001100.damaged          failed verification at a resume; kept for inspection

The commit protocol (PRIOR_ART P4: DeepSpeed writes `latest` before every rank has finished)
---------------------------------------------------------------------------------------------
1. every rank writes its DeepSpeed shards and RNG state into `.tmp-stepN/` (DeepSpeed's own
   `latest` is switched off), rank 0 adds the trainer state and the EMA;
2. barrier, then the ranks checksum (and fsync) the files between them, and rank 0 writes
   `manifest.json` atomically: that is the commit point;
3. rank 0 renames `.tmp-stepN` to `stepN` (atomic) and rewrites `latest` atomically;
4. old checkpoints beyond the retention policy are renamed away, then deleted.

Readers never trust names alone: a resume takes the newest `stepN` whose manifest verifies (sizes
always, checksums by default, the work spread over the ranks) and falls back to the previous one,
with a warning, when the newest is damaged. A kill at any moment leaves either the previous state
or a verifiable new checkpoint.

Changing the number of ranks (PRIOR_ART P2) runs DeepSpeed's `ds_to_universal` on rank 0 into
`stepN/universal/` and loads that with `checkpoint.load_universal`; the data position, the EMA and
the counters are world-size independent by construction.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from coatnet_scale.config import CheckpointConfig, Config, config_hash, to_dict
from coatnet_scale.files import atomic_write_text, free_name, fsync_dir, remove_tree, sha256_file
from coatnet_scale.models import EXPORT_WEIGHTS, read_state_dict

FORMAT = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
RNG_DIR = "rng"
UNIVERSAL = "universal"
LATEST = "latest"
EXPORT_CONFIG = "config.json"
STEP_DIR = re.compile(r"^step(\d{8,})$")
TMP_PREFIX = ".tmp-"
# DeepSpeed's ds_to_universal refuses checkpoints without this client state (ON_THIS_MACHINE.md).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
# Settings a checkpoint cannot be resumed under when they change: the network, the ZeRO layout
# of the saved shards (DeepSpeed cannot load across stages), the precision of the saved optimizer
# states, and what defines the sample order. Everything else may change with a warning.
MUST_MATCH = ("model.", "zero.stage", "precision.dtype", "train.seed", "data.sampling")

Log = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which one and why."""


def step_name(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders under `root`, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


@functools.cache
def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    from coatnet_scale import __version__

    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


# ---- ranks -----------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if _rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    world = _rank_world()[1]
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


# ---- manifest and verification ---------------------------------------------------------------


def _files_under(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and UNIVERSAL not in p.relative_to(folder).parts
    )


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(ckpt: Path, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of checkpoint `ckpt` (empty: it is complete). `part=(i, n)` checks only every
    n-th file starting at i, so n ranks can share the reading."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return [f"{ckpt.name}: no readable {MANIFEST} (the save never completed)"]
    problems = []
    names = sorted(manifest["files"])
    for name in names[part[0] :: part[1]]:
        expected = manifest["files"][name]
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{ckpt.name}/{name}: missing")
        elif (size := path.stat().st_size) != expected["size"]:
            problems.append(f"{ckpt.name}/{name}: {size} bytes, expected {expected['size']}")
        elif checksums and sha256_file(path) != expected["sha256"]:
            problems.append(f"{ckpt.name}/{name}: checksum differs from the manifest")
    return problems


def verify_on_ranks(ckpt: Path, checksums: bool = True) -> list[str]:
    """`verify` with the files shared over the ranks; every rank gets the full list."""
    rank, world = _rank_world()
    return [p for part in _gather(verify(ckpt, checksums, (rank, world))) for p in part]


# ---- saving ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class TrainerState:
    """What the loop needs besides DeepSpeed's files to continue exactly (JSON, human-readable)."""

    step: int
    data: dict[str, Any]
    skipped_steps: int
    wandb_run_id: str | None
    world_size: int
    config: dict[str, Any]
    config_hash: str
    code_version: str

    @classmethod
    def of(
        cls,
        cfg: Config,
        step: int,
        data: dict[str, Any],
        skipped_steps: int,
        wandb_run_id: str | None,
        world_size: int,
    ) -> TrainerState:
        return cls(
            step,
            data,
            skipped_steps,
            wandb_run_id,
            world_size,
            to_dict(cfg),
            config_hash(cfg),
            code_version(),
        )

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.__dict__}, indent=1) + "\n"

    @classmethod
    def read(cls, ckpt: Path) -> TrainerState:
        data = json.loads((ckpt / TRAINER_STATE).read_text())
        data.pop("format", None)
        return cls(**data)


def save(
    engine,
    root: Path,
    state: TrainerState,
    ema: dict[str, torch.Tensor] | None,
    keep_last: int,
    keep_every: int,
    log: Log,
) -> Path:
    """Write, commit and publish checkpoint `stepN` of every rank; all ranks call this.

    Returns the published folder. See the module docstring for the protocol.
    """
    rank, world = _rank_world()
    name = step_name(state.step)
    tmp = root / f"{TMP_PREFIX}{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            remove_tree(tmp)  # a killed attempt at the same step
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=UNIVERSAL_INFO, save_latest=False)

    (tmp / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / RNG_DIR / f"rank{rank:05d}.pt")
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(state.to_json())
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
    _barrier()

    # Each rank checksums (and fsyncs) a share of the files; rank 0 commits with the manifest.
    files = _from_rank0(_files_under(tmp) if rank == 0 else None)
    records = {
        k: v for part in _gather(file_records(tmp, files[rank::world])) for k, v in part.items()
    }
    final = root / name
    if rank == 0:
        write_manifest(tmp, state.step, world, records)
        publish(tmp, final)
        point_latest(root)
        for old in retention(list_checkpoints(root), keep_last, keep_every):
            remove_tree(old)
        size = sum(r["size"] for r in records.values())
        log(f"checkpoint {final} committed ({len(records)} files, {size / 2**20:.1f} MiB)")
    _barrier()
    return final


def file_records(folder: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of the named files, each forced to disk on the way (fsync)."""
    return {
        name: {
            "size": (folder / name).stat().st_size,
            "sha256": sha256_file(folder / name, sync=True),
        }
        for name in names
    }


def write_manifest(folder: Path, step: int, world: int, records: dict[str, Any]) -> None:
    """The commit point: once this file exists (atomically), the checkpoint is complete."""
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": world,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": records,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def publish(tmp: Path, final: Path) -> None:
    """Rename a committed `.tmp-stepN` to `stepN` (an older folder of that name is moved aside)."""
    if final.exists():
        final.rename(free_name(final.with_name(final.name + ".replaced")))
    tmp.rename(final)
    fsync_dir(final.parent)


def point_latest(root: Path) -> None:
    """`latest` names the newest committed checkpoint (DeepSpeed's zero_to_fp32 reads it)."""
    committed = list_checkpoints(root)
    if committed:
        atomic_write_text(root / LATEST, committed[-1].name)
    else:
        (root / LATEST).unlink(missing_ok=True)


def retention(committed: Sequence[Path], keep_last: int, keep_every: int) -> list[Path]:
    """Checkpoints to delete: all but the newest `keep_last` and those whose step is a multiple
    of `keep_every` (kept permanently)."""
    keep = set(committed[-keep_last:])
    if keep_every:
        keep |= {p for p in committed if (checkpoint_step(p) or 0) % keep_every == 0}
    return [p for p in committed if p not in keep]


def recover(root: Path, log: Log) -> None:
    """Rank 0 at start: finish or clean up what a killed save left behind."""
    if not root.is_dir():
        return
    for leftover in sorted(root.iterdir()):
        if leftover.name.startswith(".trash-"):
            remove_tree(leftover)
        elif leftover.name.startswith(TMP_PREFIX) and leftover.is_dir():
            final = root / leftover.name[len(TMP_PREFIX) :]
            if not final.exists() and read_manifest(leftover) and not verify(leftover):
                publish(leftover, final)  # killed between commit and publish: roll forward
                log(f"checkpoint {final} was committed but not published; published it now")
            else:
                remove_tree(leftover)
                log(f"removed the incomplete save {leftover.name} (the process died while saving)")
    point_latest(root)


# ---- choosing and loading a checkpoint -------------------------------------------------------


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def newest_valid(root: Path, checksums: bool, log: Log) -> Path | None:
    """The newest checkpoint under `root` that verifies; damaged newer ones are reported and
    renamed `stepN.damaged` (kept for inspection). Collective when a process group exists."""
    rank, _ = _rank_world()
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
        _barrier()
    return None


def find_resume(cfg: CheckpointConfig, run_dir: Path, log: Log) -> Path | None:
    """The checkpoint this run continues from: `checkpoint.resume` = auto (newest valid in the run
    folder, or None to start fresh), none, or a path (a `stepN` folder, or a run/checkpoints
    folder meaning its newest valid checkpoint). All ranks call this."""
    root = checkpoint_root(run_dir)
    rank, _ = _rank_world()
    if rank == 0:
        recover(root, log)
    _barrier()
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return newest_valid(root, cfg.verify_checksums, log)
    path = Path(cfg.resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={cfg.resume}: no such file or folder")
    if checkpoint_step(path) is None:  # a run folder or its checkpoints folder
        inner = checkpoint_root(path) if checkpoint_root(path).is_dir() else path
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
    _barrier()
    return path


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], cfg: Config) -> tuple[list[str], list[str]]:
    """(blocking, allowed) differences between a checkpoint's config and this run's, one
    'key: checkpoint X, this run Y' line each. Blocking ones are `MUST_MATCH` keys."""
    before, after = _flatten(saved), _flatten(to_dict(cfg))
    blocking, allowed = [], []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            line = f"{key}: checkpoint {before.get(key)!r}, this run {after.get(key)!r}"
            (blocking if key.startswith(MUST_MATCH) else allowed).append(line)
    return blocking, allowed


def check_compatible(ckpt: Path, state: TrainerState, cfg: Config) -> list[str]:
    """Raise `CheckpointError` naming every blocking difference; return the allowed ones."""
    blocking, allowed = config_changes(state.config, cfg)
    if blocking:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this run: "
            + "; ".join(blocking)
            + ". Use the checkpoint's settings, or start a new run folder (export the weights "
            "and pass them as checkpoint.init_from to change the model or the ZeRO stage)"
        )
    return [line for line in allowed if not line.startswith(("train.run_dir", "checkpoint."))]


@dataclass(frozen=True)
class LoadPlan:
    """Where DeepSpeed loads from: `load_dir/tag`, universal format or not."""

    load_dir: Path
    tag: str
    universal: bool


def prepare_load(ckpt: Path, saved_world: int, world: int, zero_stage: int, log: Log) -> LoadPlan:
    """Plan (and on a world-size change, make) what DeepSpeed loads. All ranks call this.

    Same world size, or ZeRO-0 (whose optimizer state is not partitioned): the checkpoint as is.
    Otherwise rank 0 converts it once with DeepSpeed's `ds_to_universal` into `stepN/universal`
    (written under a temporary name, renamed when complete) and the engine loads that.
    """
    if saved_world == world or zero_stage == 0:
        return LoadPlan(ckpt.parent, ckpt.name, universal=False)
    rank, _ = _rank_world()
    failure = None
    if rank == 0 and not (ckpt / UNIVERSAL).is_dir():
        log(f"{ckpt.name} was saved by {saved_world} rank(s), this run has {world}: converting it")
        started = time.perf_counter()
        failure = convert_to_universal(ckpt)
        if failure is None:
            log(f"converted to {ckpt / UNIVERSAL} in {time.perf_counter() - started:.1f} s")
    failure = _from_rank0(failure)
    if failure:
        raise CheckpointError(failure)
    return LoadPlan(ckpt, UNIVERSAL, universal=True)


def convert_to_universal(ckpt: Path) -> str | None:
    """Run DeepSpeed's converter (a subprocess: it forks workers and needs the memory of one
    consolidated parameter at a time); returns an error message or None."""
    tmp = ckpt / f"{TMP_PREFIX}{UNIVERSAL}"
    if tmp.exists():
        remove_tree(tmp)
    workers = "2"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            workers,
            "--num_merge_workers",
            workers,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return f"converting {ckpt} to a universal checkpoint failed: " + " | ".join(tail)
    tmp.rename(ckpt / UNIVERSAL)
    fsync_dir(ckpt)
    return None


def load(engine, plan: LoadPlan) -> None:
    """DeepSpeed's load of model, optimizer and engine counters (all ranks)."""
    path, _ = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_module_strict=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {plan.load_dir / plan.tag}")


def restore_rng(ckpt: Path, rank: int, same_world: bool) -> bool:
    """This rank's saved RNG states, when the world size is unchanged; returns whether it did.
    (On another world size there is no saved state for every rank; the caller reseeds.)"""
    path = ckpt / RNG_DIR / f"rank{rank:05d}.pt"
    if not same_world or not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


def read_ema(ckpt: Path) -> dict[str, torch.Tensor] | None:
    if not (ckpt / EMA_FILE).is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(ckpt / EMA_FILE))


# ---- consolidated weights: export and fine-tuning --------------------------------------------


def consolidated_state_dict(ckpt: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights and buffers of a checkpoint of any ZeRO stage, in one process (DeepSpeed's
    zero_to_fp32 merges the partitions; ZeRO-0 keeps the module whole). With `use_ema`, the EMA
    weights replace the trained ones (buffers are the trained model's)."""
    if any(ckpt.glob("*_optim_states.pt")):  # ZeRO 1-3: partitioned fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        # ZeRO-0: the whole module is in the model-states file (which also holds non-tensor
        # engine state, hence weights_only=False: our own file, written by this run).
        saved = torch.load(
            ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        state = saved["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if use_ema:
        ema = read_ema(ckpt)
        if ema is None:
            raise CheckpointError(f"{ckpt} has no EMA weights (train.ema_decay was 0)")
        state.update({k: v.float() for k, v in ema.items()})
    return state


def resolve_checkpoint(path: Path, checksums: bool = True) -> Path:
    """A checkpoint folder from a path to one, or to a run / checkpoints folder (its newest valid
    checkpoint). Single process; raises `CheckpointError` when none verifies."""
    if checkpoint_step(path) is not None or (path / MANIFEST).exists():
        problems = verify(path, checksums)
        if problems:
            raise CheckpointError(f"{path} is damaged: " + "; ".join(problems))
        return path
    root = checkpoint_root(path) if checkpoint_root(path).is_dir() else path
    for ckpt in reversed(list_checkpoints(root)):
        if not verify(ckpt, checksums):
            return ckpt
    raise CheckpointError(f"no valid checkpoint under {path}")


def export(ckpt: Path, out_dir: Path, use_ema: bool = False) -> Path:
    """Write `out_dir/model.safetensors` (consolidated fp32) and `out_dir/config.json` (the model
    config, step and timm pretrained_cfg). Loadable by `create_model(name, checkpoint=out_dir)` and
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`."""
    from safetensors.torch import save_file

    from coatnet_scale.models.timm_registry import pretrained_cfg

    state = consolidated_state_dict(ckpt, use_ema)
    trainer = TrainerState.read(ckpt)
    model = trainer.config["model"]
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / EXPORT_WEIGHTS
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
    info = {
        "architecture": model["name"],
        "model": model,
        "step": trainer.step,
        "ema": use_ema,
        "source": str(ckpt.resolve()),
        "config_hash": trainer.config_hash,
        "code_version": trainer.code_version,
        "pretrained_cfg": pretrained_cfg(model["image_size"], model["num_classes"]),
    }
    atomic_write_text(out_dir / EXPORT_CONFIG, json.dumps(info, indent=1) + "\n")
    return weights


def initial_weights(path: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Weights to start a fine-tuning run from: a weights file, an export folder, a training
    checkpoint, or a run folder (its newest valid checkpoint)."""
    if path.is_file() or (path / EXPORT_WEIGHTS).is_file():
        if use_ema:
            raise CheckpointError(f"{path}: checkpoint.init_ema needs a training checkpoint")
        return read_state_dict(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint.init_from={path}: no such file or folder")
    return consolidated_state_dict(resolve_checkpoint(path), use_ema)


# ---- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m coatnet_scale.checkpoint {list,verify,export} ...`"""
    parser = argparse.ArgumentParser(
        prog="python -m coatnet_scale.checkpoint", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="committed checkpoints of a run and whether they verify")
    show.add_argument("run", type=Path, help="run folder or its checkpoints folder")
    check = sub.add_parser("verify", help="check one checkpoint against its manifest")
    check.add_argument("checkpoint", type=Path)
    out = sub.add_parser("export", help="consolidated fp32 safetensors + config.json")
    out.add_argument("checkpoint", type=Path, help="a stepN folder, or a run folder (newest valid)")
    out.add_argument("--out", type=Path, required=True, help="output folder")
    out.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            root = checkpoint_root(args.run) if checkpoint_root(args.run).is_dir() else args.run
            for ckpt in list_checkpoints(root):
                problems = verify(ckpt)
                print(f"{ckpt.name}  {'ok' if not problems else 'DAMAGED: ' + problems[0]}")
            return 0
        if args.command == "verify":
            problems = verify(args.checkpoint)
            print("\n".join(problems) if problems else f"{args.checkpoint}: ok")
            return 1 if problems else 0
        weights = export(resolve_checkpoint(args.checkpoint), args.out, args.ema)
        print(f"wrote {weights} and {weights.with_name(EXPORT_CONFIG)}")
        return 0
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
