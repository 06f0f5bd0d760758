"""A checkpoint of this rank held in host memory: what a loss-spike rollback returns to.

It is DeepSpeed's own checkpoint, captured the way an asynchronous save captures it
(`CapturingEngine` with `defer`: host copies of what `save_checkpoint` hands over, nothing
written), and restored with DeepSpeed's own `load_checkpoint` through a checkpoint engine that
reads those copies back. So a rollback restores exactly what a resume restores (the resume is
bitwise), without touching the shared filesystem. Two departures from a saved checkpoint:

- every rank keeps the model-states file, not only data-parallel rank 0: on load each rank
  reads it (ZeRO 1/2 then take the weights from their fp32 partitions), and in memory no rank
  can read another's;
- DeepSpeed finds the model-states files with `glob` before it reads them, so the snapshot keeps
  empty stand-ins under a node-local temporary folder (removed by `close`).

Host memory per rank: this rank's optimizer partition and fp32 weights (as an asynchronous save
holds) plus the module's weights in the training dtype (the model-states file).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from coatnet_scale.checkpoint.save import CapturingEngine, host_copy
from coatnet_scale.checkpoint.state import rng_state, set_rng_state
from coatnet_scale.guard import overflow_at_min_scale_skips

TAG = "snapshot"


class MemoryReader:
    """DeepSpeed's checkpoint engine for one load: `load(path)` returns a fresh copy of what was
    captured for `path` (DeepSpeed and torch's optimizers may keep or change what they load)."""

    def __init__(self, files: dict[str, Any]) -> None:
        self.files = files

    def load(self, path: str, map_location: Any = None) -> Any:
        return host_copy(self.files[str(path)])

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def is_decoupled(self) -> bool:
        return False


class Snapshot:
    """`take` at a step boundary on every rank together; `restore` on every rank together."""

    def __init__(self, step: int, folder: Path, files: dict[str, Any], rng: dict) -> None:
        self.step, self.folder, self.files, self.rng = step, folder, files, rng

    @classmethod
    def take(cls, engine, step: int) -> Snapshot:
        folder = Path(tempfile.mkdtemp(prefix="coatnet-snapshot-"))
        (folder / TAG).mkdir()
        capture = CapturingEngine(zipfile_serialization=True, defer=True)
        own, writer = engine.checkpoint_engine, engine.save_non_zero_checkpoint
        engine.checkpoint_engine, engine.save_non_zero_checkpoint = capture, True
        try:
            engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)
        finally:
            engine.checkpoint_engine, engine.save_non_zero_checkpoint = own, writer
        for path, _ in capture.files:
            Path(path).touch()  # what DeepSpeed's glob looks for
        return cls(step, folder, {str(p): state for p, state in capture.files}, rng_state())

    def restore(self, engine) -> None:
        """Weights, optimizer, loss scaler and engine counters as they were at `step`, and this
        rank's RNG streams."""
        own, universal = engine.checkpoint_engine, engine._config.load_universal_checkpoint
        engine.checkpoint_engine = MemoryReader(self.files)
        # A run resumed on another world size keeps DeepSpeed's `load_universal` set for the
        # engine's life (`Resume.deepspeed_config`); the snapshot is in the ordinary layout.
        engine._config.load_universal_checkpoint = False
        try:
            path, _ = engine.load_checkpoint(str(self.folder), tag=TAG, load_module_strict=True)
        finally:
            engine.checkpoint_engine = own
            engine._config.load_universal_checkpoint = universal
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the step-{self.step} snapshot")
        overflow_at_min_scale_skips(engine)  # the loaded fp16 scaler replaced ours
        set_rng_state(self.rng)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
