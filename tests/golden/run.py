"""One golden-curve run: the debug model on the demo digits, one process, every step's loss.

    python tests/golden/run.py DATA OUT --seed S [--break WHAT] [section.key=value ...]

DATA holds the demo shards (`python -m data_tools.make_demo --out DATA`); OUT receives the run
folder and `losses.json`. The recipe is the demo's (configs/demo.yaml: AdamW 1e-3, weight decay
0.05, 15 warm-up steps then cosine, clipping 1.0, crops of 60-100%, label smoothing 0.1) on
`coatnet_debug` at 32 px for `STEPS` steps, through the real entry point and DeepSpeed (ZeRO-2,
one rank, two micro-batches per step).

`--break` plants a known regression, to show that the band catches it:
  constant_lr     the schedule ignored: the peak LR from the first step to the last
  no_warmup       warm-up dropped: the cosine starts at the peak at step 0
  decay_all       weight decay on every parameter (norms, biases, relative tables too)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# The golden curve is a CPU curve: decided before anything imports DeepSpeed, which fixes its
# accelerator on first import (--break imports the trainer before the entry point would set it)
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

STEPS = 120
BREAKS = ("constant_lr", "no_warmup", "decay_all")


def overrides(data: Path, out: Path, seed: int) -> list[str]:
    return [
        "--model",
        "coatnet_debug",
        "--config",
        str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"),
        "model.image_size=32",
        f"data.train_shards=[{data / 'train.json'}]",
        "data.val_shards=null",
        "data.num_workers=0",
        f"train.total_steps={STEPS}",
        f"train.seed={seed}",
        f"train.run_dir={out / 'run'}",
        "logging.log_every=1",
        "logging.wandb_mode=disabled",
        "distributed.device=cpu",
    ]


def plant(what: str) -> None:
    """Monkeypatch one known regression into the trainer (see the module docstring)."""
    import coatnet_scale.distributed.engine as engine
    import coatnet_scale.optim as optim
    import coatnet_scale.train as training

    if what == "constant_lr":
        training.lr_at = lambda step, peak, schedule, total: peak
    elif what == "no_warmup":
        original = optim.lr_at
        training.lr_at = lambda step, peak, schedule, total: original(
            step + schedule.warmup_steps, peak, schedule, total + schedule.warmup_steps
        )
    elif what == "decay_all":
        original_groups = optim.param_groups

        def decay_all(model, weight_decay):
            params = [p for g in original_groups(model, weight_decay) for p in g["params"]]
            return [{"params": params, "weight_decay": weight_decay}]

        optim.param_groups = decay_all  # what build_optimizer calls
        engine.param_groups = decay_all  # CPU offload's optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--break", dest="broken", choices=BREAKS)
    parser.add_argument("overrides", nargs="*", help="more config overrides (other tests)")
    args = parser.parse_intermixed_args()
    if args.broken:
        plant(args.broken)
    import torch.distributed as dist

    from launch.pretrain import main as pretrain

    try:
        pretrain(overrides(args.data, args.out, args.seed) + args.overrides)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    records = [json.loads(line) for line in (args.out / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    (args.out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
