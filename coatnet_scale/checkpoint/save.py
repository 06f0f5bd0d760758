"""Writing a checkpoint: the commit protocol, retention, and recovery of killed saves."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from coatnet_scale.checkpoint.layout import (
    EMA_FILE,
    FORMAT,
    LATEST,
    MANIFEST,
    RNG_DIR,
    TMP_PREFIX,
    TRAINER_STATE,
    UNIVERSAL_INFO,
    Log,
    checkpoint_step,
    files_under,
    list_checkpoints,
    read_manifest,
    step_name,
    verify,
)
from coatnet_scale.checkpoint.state import TrainerState, rng_state
from coatnet_scale.distributed.collectives import barrier, from_rank0, gather, rank_world
from coatnet_scale.files import atomic_write_text, free_name, fsync_dir, remove_tree, sha256_file


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
    rank, world = rank_world()
    name = step_name(state.step)
    tmp = root / f"{TMP_PREFIX}{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            remove_tree(tmp)  # a killed attempt at the same step
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=UNIVERSAL_INFO, save_latest=False)

    (tmp / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / RNG_DIR / f"rank{rank:05d}.pt")
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(state.to_json())
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
    barrier()

    # Each rank checksums (and fsyncs) a share of the files; rank 0 commits with the manifest.
    files = from_rank0(files_under(tmp) if rank == 0 else None)
    records = {
        k: v for part in gather(file_records(tmp, files[rank::world])) for k, v in part.items()
    }
    final = root / name
    if rank == 0:
        for folder in {tmp, *((tmp / f).parent for f in files)}:
            fsync_dir(folder)  # the files' directory entries are durable before the commit
        write_manifest(tmp, state.step, world, records)
        publish(tmp, final, log)
        point_latest(root)
        for old in retention(list_checkpoints(root), keep_last, keep_every):
            remove_tree(old)
        size = sum(r["size"] for r in records.values())
        log(f"checkpoint {final} committed ({len(records)} files, {size / 2**20:.1f} MiB)")
    barrier()
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


REPLACED_SUFFIX = ".replaced"


def publish(tmp: Path, final: Path, log: Log | None = None) -> None:
    """Rename a committed `.tmp-stepN` to `stepN`. An older folder of that name (a run resumed
    from before step N, or started over with `checkpoint.resume=none`, saves step N again) is
    moved aside first and deleted once the new one's rename is durable; `recover` handles one a
    kill left between the two."""
    replaced = None
    if final.exists():
        replaced = free_name(final.with_name(final.name + REPLACED_SUFFIX))
        final.rename(replaced)
    tmp.rename(final)
    fsync_dir(final.parent)
    if replaced is not None:
        remove_tree(replaced)
        if log is not None:
            log(f"an older {final.name} in {final.parent} was replaced by this save")


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
    names = {p.name for p in root.iterdir()}
    for leftover in sorted(root.iterdir()):  # ".tmp-stepN" sorts before "stepN.replaced"
        if leftover.name.startswith(".trash-"):
            remove_tree(leftover)
        elif REPLACED_SUFFIX in leftover.name and leftover.is_dir():
            step = leftover.name.split(REPLACED_SUFFIX)[0]
            if not (root / step).exists() and f"{TMP_PREFIX}{step}" in names:
                # killed mid-publish and the new save did not verify: the old one is step N
                leftover.rename(root / step)
                log(f"{step} was being replaced when the process died; kept the older {step}")
            else:  # superseded by the published stepN (or left by an older version)
                remove_tree(leftover)
                log(f"removed {leftover.name}, superseded by a newer save of that step")
        elif leftover.name.startswith(TMP_PREFIX) and leftover.is_dir():
            final = root / leftover.name[len(TMP_PREFIX) :]
            if not final.exists() and read_manifest(leftover) and not verify(leftover):
                publish(leftover, final, log)  # killed between commit and publish: roll forward
                log(f"checkpoint {final} was committed but not published; published it now")
            else:
                remove_tree(leftover)
                log(f"removed the incomplete save {leftover.name} (the process died while saving)")
    point_latest(root)
