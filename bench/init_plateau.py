"""Why the initialisation is timm's and not N(0, 0.02) everywhere: the demo's plateau, measured.

    python bench/init_plateau.py [--seeds 0 1 2] [--steps 130]

A plain single-process loop (no DeepSpeed, no augmentation) trains CoAtNet-0 on the demo's
digits (scikit-learn's 8x8 digits as 64 px JPEGs read back at 32 px, the split of
data_tools/make_demo) with the demo's optimizer and schedule (AdamW 1e-3, weight decay 0.05 on
the decayed group, 15 warm-up steps, cosine, batch 64, label smoothing 0.1), once per
initialisation and seed, and prints validation top-1 at fixed steps:

* `timm`: this project's `init_module_` (timm's default for CoAtNet: He fan-out convs, Xavier
  Transformer linears, N(0, 0.02) head and tables);
* `trunc002`: every conv and linear weight from N(0, 0.02), the init before 2026-11-30.

With `trunc002` most seeds sit at chance until about step 50 (the plateau `make demo` fell off
for some seeds); with `timm` every seed is above 95% at step 50. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from coatnet_scale.models.coatnet import build_model
from coatnet_scale.models.config import ModelConfig
from coatnet_scale.optim import param_groups

EVAL_AT = (25, 50, 75, 100, 130)


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_demo's images and split: 8x8 digits -> 64 px JPEG (q95) -> size px, normalised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    n_train = int(round(0.8 * len(order)))

    def image(i: int) -> np.ndarray:
        gray = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8), mode="L")
        buf = io.BytesIO()
        gray.resize((64, 64), Image.BICUBIC).convert("RGB").save(buf, format="JPEG", quality=95)
        small = Image.open(buf).convert("RGB").resize((size, size), Image.BICUBIC)
        return np.asarray(small, dtype=np.float32) / 255

    x = torch.tensor(np.stack([image(i) for i in order])).permute(0, 3, 1, 2)
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_DEFAULT_STD
    )[:, None, None]
    y = torch.tensor(d.target[order])
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def trunc002_(model: nn.Module) -> None:
    """The former initialisation: every conv and linear weight N(0, 0.02), truncated."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)


def run(init: str, seed: int, steps: int, data) -> dict[int, float]:
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    cfg = ModelConfig(name="coatnet0", image_size=32, num_classes=10)
    model = build_model(cfg, torch.device("cpu"))
    if init == "trunc002":
        trunc002_(model)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    perm, pos, acc = torch.randperm(len(y_train), generator=order), 0, {}
    for step in range(steps):
        if pos + 64 > len(y_train):
            perm, pos = torch.randperm(len(y_train), generator=order), 0
        idx, pos = perm[pos : pos + 64], pos + 64
        warm = 15
        lr = (
            1e-3 * (step + 1) / warm
            if step < warm
            else (
                1e-5
                + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            )
        )
        for group in opt.param_groups:
            group["lr"] = lr
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
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
    parser.add_argument("--steps", type=int, default=130)
    args = parser.parse_args()
    data = digits()
    print("init      seed  " + "  ".join(f"top-1@{s:<3d}" for s in EVAL_AT) + "  seconds")
    for init in ("timm", "trunc002"):
        for seed in args.seeds:
            start = time.perf_counter()
            acc = run(init, seed, args.steps, data)
            cells = "  ".join(f"{100 * acc[s]:8.1f}%" for s in EVAL_AT if s in acc)
            print(f"{init:9s} {seed:4d}  {cells}  {time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    main()
