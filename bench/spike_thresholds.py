"""Loss-spike thresholds measured on a real training curve (coatnet_scale/spikes.py).

    python launch/pretrain.py --model coatnet_debug --config configs/demo.yaml \\
        train.total_steps=1500 logging.log_every=1 train.eval_every=0 train.run_dir=/tmp/curve
    python bench/spike_thresholds.py /tmp/curve/metrics.jsonl

Replays the run's per-step loss and gradient norm through `SpikeDetector` for several
settings and reports, for each:

- false alarms: steps of the clean curve it calls a spike (each would cost a rollback);
- caught: the share of spikes it catches when one step's loss is multiplied by k (or its
  gradient norm by m), injected at 60 evenly spaced steps after `min_history`.

The defaults (6 MADs and 1.5x the median; 30x the gradient norm's median) are the smallest of
these without a false alarm on the curve measured (bench/README.md).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coatnet_scale.config import SpikeConfig
from coatnet_scale.spikes import SpikeDetector

# (loss MADs, loss min ratio, grad factor): the starting rule, then with floors
SETTINGS = [
    (6.0, 1.0, 10.0),
    (10.0, 1.0, 20.0),
    (6.0, 1.25, 20.0),
    (6.0, 1.5, 30.0),
    (6.0, 2.0, 30.0),
]
LOSS_FACTORS = (1.25, 1.5, 2.0, 3.0)
GRAD_FACTORS = (5.0, 10.0, 30.0)
INJECTIONS = 60


def curve(path: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "loss" in r}
    if len(steps) < 300:
        raise SystemExit(f"{path}: {len(steps)} steps with a loss; log every step of a longer run")
    return [steps[s] for s in sorted(steps)]


def replay(cfg: SpikeConfig, values: list[tuple[float, float]]) -> dict[str, object]:
    detector = SpikeDetector(cfg)
    first = cfg.min_history + 1
    every = max(1, (len(values) - first) // INJECTIONS)
    at = set(range(first, len(values), every))
    false_alarms, caught = [], dict.fromkeys([*LOSS_FACTORS, *GRAD_FACTORS], 0)
    for step, (loss, grad) in enumerate(values):
        if step in at:
            for k in LOSS_FACTORS:
                caught[k] += copy.deepcopy(detector).spike(loss * k, grad) is not None
            for m in GRAD_FACTORS:
                caught[m] += copy.deepcopy(detector).spike(loss, grad * m) is not None
        if detector.spike(loss, grad) is not None:
            false_alarms.append(step + 1)
    return {"false_alarms": false_alarms, "caught": {k: v / len(at) for k, v in caught.items()}}


def main() -> None:
    values = curve(Path(sys.argv[1]))
    print(f"{len(values)} steps; loss {values[0][0]:.3f} -> {values[-1][0]:.3f}")
    print(
        "MADs  ratio  grad x  false alarms (steps)   caught: loss x"
        + "/".join(f"{k:g}" for k in LOSS_FACTORS)
        + ", grad x"
        + "/".join(f"{m:g}" for m in GRAD_FACTORS)
    )
    for mads, ratio, factor in SETTINGS:
        cfg = replace(SpikeConfig(), loss_mads=mads, loss_min_ratio=ratio, grad_factor=factor)
        result = replay(cfg, values)
        alarms = result["false_alarms"]
        caught = result["caught"]
        shown = ", ".join(map(str, alarms[:6])) + (" ..." if len(alarms) > 6 else "")
        rates = "/".join(f"{caught[k]:.0%}" for k in LOSS_FACTORS)
        grads = "/".join(f"{caught[m]:.0%}" for m in GRAD_FACTORS)
        line = f"{mads:4g}  {ratio:5g}  {factor:6g}  {len(alarms):3d} ({shown or '-'})"
        print(f"{line}  {rates}, {grads}")


if __name__ == "__main__":
    main()
