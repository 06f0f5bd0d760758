"""Train-pipeline throughput: our shard pipeline vs torchvision ImageFolder vs a bare decode.

    python bench/data_pipeline.py [--images 512] [--batch-size 32] [--image-size 224]

Generates ImageNet-like JPEGs (500x375, quality 90, smooth content with texture so they compress
like photos: about 60-90 kB), writes them as an ImageFolder tree and as shards, then measures
samples/s in this one process:
- bare: full-size decode of every file (PIL `convert("RGB")`), one process, no augmentation;
- torchvision: `ImageFolder` + `DataLoader` with the same augmentation as ours (RandomResizedCrop
  224 bilinear, flip, timm RandAugment 2/15, uint8 tensor), 1 and 2 workers;
- ours: `TrainLoader` over the shards, 1 and 2 workers.
Goals (issue 3): ours >= 2x torchvision and >= 1.0x bare decode. Results merge into
bench/results.json under "data_pipeline".
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench.common import cpu_name, record_result
from coatnet_scale.data.pipeline import BatchPlan, TrainLoader
from coatnet_scale.data.shards import load_manifest
from coatnet_scale.data.transforms import TrainAugment
from data_tools.make_shards import make_shards, scan_image_folder


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """Smooth colour fields plus fine noise: compresses and decodes like a photograph."""
    coarse = rng.integers(0, 255, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def throughput(batches, samples: int, batch_size: int) -> float:
    """Samples/s over `samples` samples, after one warm-up batch (worker start-up excluded)."""
    iterator = iter(batches)
    next(iterator)
    start, seen = time.perf_counter(), 0
    while seen < samples:
        next(iterator)
        seen += batch_size
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    size = args.image_size

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        files = []
        for i in range(args.images):
            folder = root / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:05d}.jpg"
            path.write_bytes(photo_like(rng))
            files.append(path)
        mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        items, classes = scan_image_folder(root)
        _, manifest_path = make_shards(
            items, classes, Path(tmp) / "shards", "train", shard_samples=128, progress=False
        )
        manifest = load_manifest(manifest_path)
        measure = args.images  # one pass; the loaders cycle, so this never runs dry

        start = time.perf_counter()
        for path in files:
            Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        bare = len(files) / (time.perf_counter() - start)

        augment = TrainAugment(size, randaugment_n=2, randaugment_m=15)
        tv_transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),  # bilinear, as ours by default
                transforms.RandomHorizontalFlip(),
                augment.randaugment(),
                transforms.PILToTensor(),
            ]
        )
        results = {"bare_decode": bare}
        for workers in (1, 2):
            folder_ds = datasets.ImageFolder(str(root), transform=tv_transform)
            tv = DataLoader(
                folder_ds,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                persistent_workers=True,
                prefetch_factor=4,
                sampler=None,
                drop_last=True,
            )
            tv_cycle = (batch for _ in range(100) for batch in tv)
            results[f"torchvision_{workers}w"] = throughput(tv_cycle, measure, args.batch_size)
            plan = BatchPlan(args.batch_size, args.batch_size, 0, 1)
            ours = TrainLoader([manifest], [1.0], 0, "exact", plan, augment, workers, 0.01)
            results[f"ours_{workers}w"] = throughput(ours, measure, args.batch_size)

    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "setup": f"{args.images} JPEGs 500x375 q90 (mean {mean_kb:.0f} kB), crop {size}, "
        f"batch {args.batch_size}, RandAugment 2/15",
        "samples_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratios": {},
    }
    print(f"{record['machine']}; {record['setup']}")
    print(f"bare full-size decode, 1 process: {bare:7.1f} samples/s")
    for workers in (1, 2):
        ours, tv = results[f"ours_{workers}w"], results[f"torchvision_{workers}w"]
        vs_tv, vs_bare = ours / tv, ours / bare
        record["ratios"][f"ours_vs_torchvision_{workers}w"] = round(vs_tv, 2)
        record["ratios"][f"ours_vs_bare_{workers}w"] = round(vs_bare, 2)
        print(
            f"{workers} worker(s): ours {ours:7.1f}/s, torchvision {tv:7.1f}/s -> "
            f"{vs_tv:.2f}x torchvision, {vs_bare:.2f}x bare decode"
        )
    record_result("data_pipeline", record)


if __name__ == "__main__":
    main()
