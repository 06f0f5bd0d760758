"""Why the initialisation is timm's and not N(0, 0.02) everywhere: the demo's plateau, measured.

    python bench/init_plateau.py [--seeds 0 1 2] [--steps 130]

A plain single-process loop (no DeepSpeed, no augmentation, no clipping) trains CoAtNet-0 on the
demo's digits (data_tools/make_demo's JPEGs and split, read at the demo's 32 px) with the demo's
optimizer, schedule, batch and loss (configs/demo.yaml: AdamW 1e-3, weight decay 0.05 on the
decayed group, 15 warm-up steps, cosine, batch 64, label smoothing 0.1), once per initialisation
and seed, and prints validation top-1 at fixed steps:

* `timm`: this project's `init_module_` (timm's default for CoAtNet: He fan-out convs, Xavier
  Transformer linears, N(0, 0.02) head and tables);
* `trunc002`: every conv and linear weight from N(0, 0.02), the init before 2026-11-30.

With `trunc002` most seeds sit at chance until about step 50 (the plateau `make demo` fell off
for some seeds); with `timm` every seed is above 95% at step 50. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from coatnet_scale.config import Config, load_config
from coatnet_scale.data.transforms import normalize
from coatnet_scale.models.coatnet import build_model
from coatnet_scale.optim import lr_at, param_groups, set_lr
from data_tools.make_demo import demo_split, digit_jpeg

EVAL_AT = (25, 50, 75, 100, 130)
DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_demo's JPEGs and split, decoded at `size` px and normalised: train x, y, val x, y."""
    from sklearn.datasets import load_digits

    d = load_digits()

    def images(indices: np.ndarray) -> torch.Tensor:
        decoded = [
            Image.open(io.BytesIO(digit_jpeg(d.images[i], 64))).resize((size, size), Image.BICUBIC)
            for i in indices
        ]
        uint8 = torch.tensor(np.stack([np.asarray(img) for img in decoded])).permute(0, 3, 1, 2)
        return normalize(uint8)

    split = demo_split(len(d.target))
    return (
        images(split["train"]),
        torch.tensor(d.target[split["train"]]),
        images(split["val"]),
        torch.tensor(d.target[split["val"]]),
    )


def trunc002_(model: nn.Module) -> None:
    """The former initialisation: every conv and linear weight N(0, 0.02), truncated."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)


def run(init: str, seed: int, cfg: Config, data) -> dict[int, float]:
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = build_model(cfg.model, torch.device("cpu"))
    if init == "trunc002":
        trunc002_(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    steps, batch = cfg.train.total_steps, cfg.train.global_batch_size
    order = torch.Generator().manual_seed(seed)
    perm, pos, acc = torch.randperm(len(y_train), generator=order), 0, {}
    for step in range(steps):
        if pos + batch > len(y_train):
            perm, pos = torch.randperm(len(y_train), generator=order), 0
        idx, pos = perm[pos : pos + batch], pos + batch
        set_lr(opt, lr_at(step, cfg.optim.lr, cfg.schedule, steps))
        logits = model(x_train[idx])
        loss = nn.functional.cross_entropy(
            logits, y_train[idx], label_smoothing=cfg.train.label_smoothing
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 in EVAL_AT or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                acc[step + 1] = (model(x_val).argmax(1) == y_val).float().mean().item()
            model.train()
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=130, help="train.total_steps (the demo's)")
    args = parser.parse_args()
    cfg = load_config([DEMO], [f"train.total_steps={args.steps}"], model="coatnet0")
    data = digits(cfg.model.image_size)
    print("init      seed  " + "  ".join(f"top-1@{s:<3d}" for s in EVAL_AT) + "  seconds")
    for init in ("timm", "trunc002"):
        for seed in args.seeds:
            start = time.perf_counter()
            acc = run(init, seed, cfg, data)
            cells = "  ".join(f"{100 * acc[s]:8.1f}%" for s in EVAL_AT if s in acc)
            print(f"{init:9s} {seed:4d}  {cells}  {time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    main()
