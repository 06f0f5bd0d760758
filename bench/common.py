"""What every benchmark shares: the machine description and the results file."""

from __future__ import annotations

import json
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
