"""What a checkpoint folder is: names, listing, the manifest and its verification, and the
few collectives the protocol needs (no-ops without a process group)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coatnet_scale.distributed.collectives import gather, rank_world
from coatnet_scale.files import sha256_file

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
# DeepSpeed's ds_to_universal refuses checkpoints without this client state (its
# `_check_for_required_state`: a checkpoint saved without it cannot be converted).
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


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoints_in(path: Path) -> Path:
    """The folder holding `stepN` checkpoints, given a run folder or that folder itself."""
    return checkpoint_root(path) if checkpoint_root(path).is_dir() else path


# ---- manifest and verification -------------------------------------------------------------


def files_under(folder: Path) -> list[str]:
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
        try:
            if not path.is_file():
                problems.append(f"{ckpt.name}/{name}: missing")
            elif (size := path.stat().st_size) != expected["size"]:
                problems.append(f"{ckpt.name}/{name}: {size} bytes, expected {expected['size']}")
            elif checksums and sha256_file(path) != expected["sha256"]:
                problems.append(f"{ckpt.name}/{name}: checksum differs from the manifest")
        except OSError as err:  # a problem like the others: the ranks sharing the work agree
            problems.append(f"{ckpt.name}/{name}: cannot be read ({err.strerror or err})")
    return problems


def verify_on_ranks(ckpt: Path, checksums: bool = True) -> list[str]:
    """`verify` with the files shared over the ranks; every rank gets the full list."""
    rank, world = rank_world()
    return [p for part in gather(verify(ckpt, checksums, (rank, world))) for p in part]
