"""Write the demo dataset: scikit-learn's handwritten digits as JPEG shards (no download).

    python -m data_tools.make_demo [--out data/demo] [--size 64] [--shard-samples 256]

1,797 real 8x8 grayscale images (scikit-learn ships them), upscaled to SIZE px RGB JPEGs and split
80/20 into train (1,437) and val (360) with a fixed seed. Output: OUT/train.json, OUT/val.json and
their shards. This is what the README's main command trains on.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from coatnet_scale.data.shards import write_manifest
from data_tools.writer import ShardJob, SourceSample, write_shard

CLASSES = tuple(str(d) for d in range(10))


def digit_jpeg(pixels: np.ndarray, size: int) -> bytes:
    """An 8x8 digit (values 0..16) as a size x size RGB JPEG, white on black."""
    gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
    img = gray.resize((size, size), Image.BICUBIC).convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()


def demo_split(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The indices of the train (80%) and val images, shuffled with `seed`."""
    order = np.random.default_rng(seed).permutation(count)
    n_train = int(round(0.8 * count))
    return {"train": order[:n_train], "val": order[n_train:]}


def make_demo(
    out: Path, size: int = 64, shard_samples: int = 256, seed: int = 0
) -> dict[str, Path]:
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn

    digits = load_digits()
    out.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for split, indices in demo_split(len(digits.target), seed).items():
        samples = [
            SourceSample(
                f"{i:09d}",
                int(digits.target[i]),
                digit_jpeg(digits.images[i], size),
                {"sklearn_index": int(i)},
            )
            for i in indices
        ]
        infos = []
        for shard, start in enumerate(range(0, len(samples), shard_samples)):
            job = ShardJob(
                str(out / f"{split}-{shard:06d}.tar"), tuple(samples[start : start + shard_samples])
            )
            infos.append(write_shard(job).info)
        manifests[split] = out / f"{split}.json"
        write_manifest(manifests[split], split, infos, CLASSES)
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-samples", type=int, default=256, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = parser.parse_args(argv)
    manifests = make_demo(args.out, args.size, args.shard_samples, args.seed)
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
