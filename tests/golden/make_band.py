"""Re-measure the golden loss curve: run `run.py` for several seeds, write debug_demo.json.

    python tests/golden/make_band.py [--seeds 0 1 2 3 4]

Run it only when the recipe changes on purpose (configs/demo.yaml, the debug model, the loss, the
optimizer): the file records each seed's mean loss per window of `WINDOW` steps, and the test
(tests/unit/test_golden_curve.py) derives its band from them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WINDOW = 10
BAND_FILE = HERE / "debug_demo.json"


def window_means(losses: list[float], window: int = WINDOW) -> list[float]:
    """Mean loss of steps 1-10, 11-20, ...: one step's loss is too noisy to pin."""
    return [sum(losses[i : i + window]) / window for i in range(0, len(losses), window)]


def run_curve(data: Path, out: Path, seed: int, broken: str | None = None) -> list[float]:
    """One run of run.py in its own process; its per-window mean losses."""
    command = [sys.executable, str(HERE / "run.py"), str(data), str(out), "--seed", str(seed)]
    if broken:
        command += ["--break", broken]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    return window_means(json.loads((out / "losses.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.common import cpu_name
    from data_tools.make_demo import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        make_demo(data)
        curves = {str(s): run_curve(data, Path(tmp) / f"seed{s}", s) for s in args.seeds}
    BAND_FILE.write_text(
        json.dumps(
            {
                "command": "python tests/golden/make_band.py",
                "date": datetime.date.today().isoformat(),
                "cpu": cpu_name(),
                "window_steps": WINDOW,
                "window_means_by_seed": curves,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {BAND_FILE}")


if __name__ == "__main__":
    main()
