"""File primitives for things that must never be seen half-written: shard manifests, checkpoint
manifests, pointers. Write under a temporary name in the same folder, fsync, rename over the
target (atomic on POSIX filesystems), then fsync the folder so the rename itself is durable."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 22, sync: bool = False) -> str:
    """Hex SHA-256 of a file; with `sync`, its data is also forced to disk (fsync)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make renames and creations inside `path` durable (a no-op where folders can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    """Write a file under a temporary name in the same folder, fsync, then rename over `path`.
    `durable=False` skips the fsyncs: readers still never see a partial file, but a crash may
    lose it (a heartbeat, worthless after a crash, on a filesystem that may stall on fsync)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; manifests and pointers are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def free_name(path: Path) -> Path:
    """`path` if nothing is there, else `path` with a time (and counter) suffix that is free."""
    if not path.exists():
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        candidate = path.with_name(f"{path.name}-{stamp}" + (f"-{n}" if n else ""))
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free name next to {path}")


def remove_tree(path: Path) -> None:
    """Delete a folder without ever leaving a half-deleted one under its name: rename it to a
    hidden `.trash-*` name first (atomic), then delete that."""
    if not path.exists():
        return
    trash = free_name(path.with_name(f".trash-{path.name}"))
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
