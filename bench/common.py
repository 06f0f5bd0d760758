"""What every benchmark shares: the machine description and the results file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record_result(key: str, record: dict) -> None:
    """Merge one benchmark's record into bench/results.json under `key`."""
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[key] = record
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")


def evict(paths: list[Path] | list[str]) -> None:
    """Drop the files' pages from the page cache (they are fsynced, so clean), so reads come
    from the disk: no root needed, unlike /proc/sys/vm/drop_caches."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
