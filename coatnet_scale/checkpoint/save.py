"""Writing a checkpoint: the commit protocol, retention, and recovery of killed saves."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    CheckpointError,
    Log,
    checkpoint_step,
    files_under,
    list_checkpoints,
    read_manifest,
    step_name,
    verify,
)
from coatnet_scale.checkpoint.state import TrainerState, rng_state
from coatnet_scale.distributed.collectives import barrier, gather, rank_world
from coatnet_scale.files import atomic_write_text, free_name, fsync_dir, remove_tree, sha256_file


class CapturingEngine:
    """DeepSpeed's checkpoint engine for the length of one of our saves: it records which files
    this rank writes (each rank checksums its own), and for an asynchronous save keeps host
    copies of what it is handed instead of writing it (the snapshot). The methods are those
    `DeepSpeedEngine.save_checkpoint` calls (deepspeed/runtime/checkpoint_engine/
    checkpoint_engine.py); no DeepSpeed import, so the checkpoint tools and the SLURM supervisor
    stay light."""

    def __init__(self, zipfile_serialization: bool, defer: bool) -> None:
        self.zipfile_serialization, self.defer = zipfile_serialization, defer
        self.files: list[tuple[str, Any]] = []  # (path, host copy or None once written)

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        if self.defer:
            self.files.append((path, host_copy(state_dict)))
        else:
            torch.save(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            self.files.append((path, None))

    def commit(self, info: Any) -> bool:
        return True

    def is_decoupled(self) -> bool:
        return False

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def preserves_storage_sharing(self) -> bool:
        """True makes DeepSpeed clone every tensor before `save` (what its own engine does); a
        deferred save copies each to host memory itself (`host_copy`), once."""
        return not self.defer

    def cleanup(self) -> None:
        pass


def host_copy(item: Any) -> Any:
    """`item` with every tensor copied to host memory and everything else copied too: the state
    as it is now, whatever the next steps change in place (optimizer moments, loss scaler)."""
    if isinstance(item, torch.Tensor):
        return item.detach().to("cpu", copy=True)
    if isinstance(item, dict):
        return type(item)((k, host_copy(v)) for k, v in item.items())
    if isinstance(item, list | tuple):
        return type(item)(host_copy(v) for v in item)
    return copy.deepcopy(item)


@dataclass
class SaveJob:
    """What is left of a save once its state is captured: write (if deferred), checksum and
    fsync this rank's files, and on rank 0 commit and publish.

    A synchronous save exchanges the file records with one gather. An asynchronous one runs in a
    background thread beside training's collectives, so it uses none: each rank leaves
    `.records-rankN.json` in the folder (or, if its part failed, the error), and rank 0 waits for
    all of them."""

    tmp: Path
    final: Path
    step: int
    rank: int
    world: int
    files: list[tuple[str, Any]]
    rng: dict[str, Any]
    trainer_state: str | None  # rank 0
    ema: dict[str, torch.Tensor] | None  # rank 0
    keep_last: int
    keep_every: int
    log: Log
    zipfile_serialization: bool = True
    background: bool = False
    may_publish: Callable[[], str | None] | None = None  # rank 0: why not, or None

    def run(self) -> None:
        if not self.background:
            records = self.write()
            merged = {k: v for part in gather(records) for k, v in part.items()}
            if self.rank == 0:
                self.commit(merged)
            return
        marker = self.tmp / f"{RECORDS_PREFIX}{self.rank:05d}.json"
        try:
            records = self.write()
        except BaseException as err:  # rank 0 must not wait for records that never come
            with contextlib.suppress(OSError):
                atomic_write_text(marker, json.dumps({ERROR_KEY: repr(err)}))
            raise
        atomic_write_text(marker, json.dumps(records))
        if self.rank == 0:
            self.commit(self.gathered_from_folder())

    def write(self) -> dict[str, dict[str, Any]]:
        """This rank's files written (if deferred), checksummed and fsynced: their records."""
        written = []
        for path, state in self.files:
            if state is not None:
                torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            written.append(str(Path(path).relative_to(self.tmp)))
        self.files = []  # the host copies can go
        rng_file = self.tmp / RNG_DIR / f"rank{self.rank:05d}.pt"
        rng_file.parent.mkdir(exist_ok=True)
        torch.save(self.rng, rng_file)
        written.append(str(rng_file.relative_to(self.tmp)))
        if self.rank == 0 and self.trainer_state is not None:
            (self.tmp / TRAINER_STATE).write_text(self.trainer_state)
            written.append(TRAINER_STATE)
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file(
                    {k: v.contiguous() for k, v in self.ema.items()}, str(self.tmp / EMA_FILE)
                )
                written.append(EMA_FILE)
        return file_records(self.tmp, written)

    def gathered_from_folder(self) -> dict[str, Any]:
        """Rank 0: every rank's records, once all are in the folder; a rank's error is raised."""
        expected = [self.tmp / f"{RECORDS_PREFIX}{r:05d}.json" for r in range(self.world)]
        while not all(path.exists() for path in expected):
            time.sleep(0.02)
        records: dict[str, Any] = {}
        for rank, path in enumerate(expected):
            part = json.loads(path.read_text())
            if ERROR_KEY in part:
                raise CheckpointError(
                    f"rank {rank} failed to write {self.final.name}: {part[ERROR_KEY]}"
                )
            records |= part
            path.unlink()
        return records

    def commit(self, records: dict[str, Any]) -> None:
        """Rank 0: the manifest (once every rank's files are durable), then the publish."""
        # anything DeepSpeed wrote past its checkpoint engine is committed too
        records |= file_records(self.tmp, sorted(set(files_under(self.tmp)) - set(records)))
        for folder in {self.tmp, *((self.tmp / f).parent for f in records)}:
            fsync_dir(folder)  # the files' directory entries are durable before the commit
        refusal = self.may_publish() if self.may_publish is not None else None
        if refusal is not None:  # e.g. the run folder was taken over meanwhile: not ours to touch
            raise CheckpointError(f"{self.final.name} not published: {refusal}")
        write_manifest(self.tmp, self.step, self.world, records)
        publish(self.tmp, self.final, self.log)
        root = self.final.parent
        point_latest(root)
        for old in retention(list_checkpoints(root), self.keep_last, self.keep_every):
            remove_tree(old)
        size = sum(r["size"] for r in records.values())
        self.log(
            f"checkpoint {self.final} committed ({len(records)} files, {size / 2**20:.1f} MiB)"
        )


ERROR_KEY = "__error__"
RECORDS_PREFIX = ".records-rank"


class BackgroundSaver:
    """At most one asynchronous save in flight per rank, written by a thread; `wait` returns
    when it is durable (on rank 0: committed and published) and raises what it failed with."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, job: SaveJob) -> None:
        self.wait()

        def run() -> None:
            try:
                job.run()
            except BaseException as err:  # re-raised in the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=run, name=f"save-{job.final.name}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still writing: `timeout` was for a run on its way out
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"a checkpoint save failed in the background: {error!r}")


def save(
    engine,
    root: Path,
    state: TrainerState,
    ema: dict[str, torch.Tensor] | None,
    keep_last: int,
    keep_every: int,
    log: Log,
    background: BackgroundSaver | None = None,
    may_publish: Callable[[], str | None] | None = None,
) -> Path:
    """Write, commit and publish checkpoint `stepN` of every rank; all ranks call this.

    Without `background` the checkpoint is published on every rank when this returns. With it,
    this returns once the state is captured in host memory (the previous background save has
    finished first) and the writing, checksums, fsyncs, manifest and publish continue in the
    background; `background.wait()` returns when they are done. Either way a kill at any moment
    leaves only complete checkpoints: nothing is published before the manifest, and the
    manifest only after every rank's files are durable. Returns the folder it publishes.
    """
    rank, world = rank_world()
    name = step_name(state.step)
    tmp = root / f"{TMP_PREFIX}{name}"
    if background is not None:
        background.wait()  # one save in flight: its host copies, and its folder, are done
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            remove_tree(tmp)  # a killed attempt at the same step
    barrier()
    own = engine.checkpoint_engine
    capture = CapturingEngine(getattr(own, "zipfile_serialization", True), background is not None)
    engine.checkpoint_engine = capture
    try:
        engine.save_checkpoint(
            str(root), tag=tmp.name, client_state=UNIVERSAL_INFO, save_latest=False
        )
    finally:
        engine.checkpoint_engine = own
    job = SaveJob(
        tmp,
        root / name,
        state.step,
        rank,
        world,
        capture.files,
        rng_state(),
        state.to_json() if rank == 0 else None,
        host_copy(ema) if rank == 0 and ema is not None else None,
        keep_last,
        keep_every,
        log,
        capture.zipfile_serialization,
        background is not None,
        may_publish,
    )
    if background is None:
        job.run()
        barrier()
    else:
        background.start(job)
    return root / name


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
