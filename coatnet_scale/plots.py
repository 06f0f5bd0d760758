"""Plot a run folder's metrics: `python -m coatnet_scale.plots RUN_DIR` writes RUN_DIR/plots/*.png.

One PNG per panel (loss, learning rate, validation accuracy, throughput), read from the JSONL
metrics file every run writes; no wandb needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PANELS = {
    "loss": (["loss"], "training loss"),
    "lr": (["lr"], "learning rate"),
    "accuracy": (["val_top1", "val_top5", "val_ema_top1"], "validation accuracy"),
    "throughput": (["img_per_s"], "images / s (all ranks)"),
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return records


def plot_run(run_dir: Path) -> list[Path]:
    """Write one PNG per panel that has data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (keys, title) in PANELS.items():
        series = {key: [(r["step"], r[key]) for r in records if key in r] for key in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except FileNotFoundError as err:
        print(f"plots: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
