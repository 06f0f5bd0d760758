"""Train-pipeline throughput: our shard pipeline vs torchvision ImageFolder vs a bare decode.

    python bench/data_pipeline.py [--images 512] [--batch-size 32] [--image-size 224]

Generates photo-like JPEGs (quality 90, smooth content with texture so they compress like
photos) at 500x375 and at 1024x768 (where DCT scaling applies), writes them as an ImageFolder tree
and as shards, then measures samples/s, end to end, in this process:
- bare: full-size decode of every file (Pillow `convert("RGB")`), one process, no augmentation;
- torchvision: `ImageFolder` + `DataLoader` with the same transforms (RandomResizedCrop 224
  bilinear, flip, the Pillow RandAugment 2/15, float tensor, normalised), 1 and 2 workers;
- ours: `TrainLoader` over the shards (workers: ROI decode + crop), 1 and 2 workers, plus the
  device-side flip, RandAugment and normalisation (`BatchAugment`) run here, on the CPU, and
  counted.
Then the cost of each stage, one process, one thread (`stage_costs`), and the images/s one core
gets through all of ours. Goals (issue 18): ours >= 2x torchvision at 2 workers and >= 1.0x bare
decode. Results merge into bench/results.json under "data_pipeline".
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench.common import cpu_name, record_result
from coatnet_scale.data.batch_augment import BatchAugment, Mixing
from coatnet_scale.data.pipeline import BatchPlan, TrainLoader
from coatnet_scale.data.shards import load_manifest
from coatnet_scale.data.transforms import Normalizer, TrainAugment
from data_tools.make_shards import make_shards, scan_image_folder


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """Smooth colour fields plus fine noise: compresses and decodes like a photograph."""
    coarse = rng.integers(0, 255, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def throughput(batches, samples: int, batch_size: int, consume=None) -> float:
    """Samples/s over `samples` samples, after one warm-up batch (worker start-up excluded);
    `consume(batch)` runs on each batch in this process and is counted (ours: the device-side
    augmentation, here on the CPU)."""
    iterator = iter(batches)
    batch = next(iterator)
    if consume is not None:
        consume(batch)
    start, seen = time.perf_counter(), 0
    while seen < samples:
        batch = next(iterator)
        if consume is not None:
            consume(batch)
        seen += batch_size
    return seen / (time.perf_counter() - start)


def stage_costs(files: list[Path], manifest, augment: TrainAugment, batch_size: int) -> dict:
    """ms per sample of each stage, one process, one thread: read (shard bytes), entropy decode
    (libjpeg reading the whole scan, one MCU row decoded), IDCT/upsampling/colour of a full
    decode (the rest of a full decode), the ROI decode the pipeline does, resize to the output,
    the device augmentation on the CPU (flip, RandAugment, normalisation), collation."""
    from coatnet_scale.data import _roi_jpeg, roi_jpeg
    from coatnet_scale.data.pipeline import _assemble
    from coatnet_scale.data.reader import ShardReader

    datas = [p.read_bytes() for p in files]
    sizes = [Image.open(io.BytesIO(d)).size for d in datas]
    random.seed(0)
    boxes = []
    for d in datas:
        top, left, bh, bw = RandomResizedCropAndInterpolation.get_params(
            Image.open(io.BytesIO(d)), (augment.crop_scale_min, 1.0), (3 / 4, 4 / 3)
        )
        boxes.append((left, top, left + bw, top + bh))

    def per_sample(fn) -> float:
        start = time.perf_counter()
        for i in range(len(datas)):
            fn(i)
        return (time.perf_counter() - start) * 1000 / len(datas)

    reader = ShardReader([manifest], None)
    read = per_sample(lambda i: reader.read(0, i))
    last_row = [(0, h - 1, 8, h) for _, h in sizes]  # every row above entropy-decoded, skipped
    entropy = per_sample(lambda i: _roi_jpeg.decode(datas[i], 1, *last_row[i]))
    full = per_sample(lambda i: _roi_jpeg.decode(datas[i], 1, 0, 0, *sizes[i]))
    regions = []
    roi = per_sample(
        lambda i: regions.append(roi_jpeg.decode_crop(datas[i], *sizes[i], boxes[i], 224))
    )
    out = augment.image_size
    crops = []
    resize = per_sample(
        lambda i: crops.append(
            regions[i][0].resize((out, out), Image.BILINEAR, box=regions[i][1], reducing_gap=None)
        )
    )
    tensors = [torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1) for c in crops]
    draws = []
    for slot in range(len(tensors)):
        random.seed(slot)
        draws.append(augment.draw())
    items = [(str(i), t, 0) for i, t in enumerate(tensors)]
    collate_start = time.perf_counter()
    batches = [
        _assemble(
            items[i : i + batch_size],
            [],
            range(i, i + batch_size),
            out,
            draws=draws[i : i + batch_size],
        )
        for i in range(0, len(items) - batch_size + 1, batch_size)
    ]
    collate = (time.perf_counter() - collate_start) * 1000 / (len(batches) * batch_size)
    device_augment = augmenter(augment)
    start = time.perf_counter()
    for batch in batches:
        device_augment(
            batch["image"], batch["augment"], batch["mix"], batch["slot"], batch["label"]
        )
    augmentation = (time.perf_counter() - start) * 1000 / (len(batches) * batch_size)
    return {
        "read": read,
        "entropy_decode": entropy,
        "idct_upsample_colour": full - entropy,
        "full_decode": full,
        "roi_decode": roi,
        "resize": resize,
        "device_augment_cpu": augmentation,
        "collate": collate,
    }


def augmenter(augment: TrainAugment) -> BatchAugment:
    """The training loop's device augmentation, on the CPU (no mixup: the baseline has none)."""
    return BatchAugment(
        augment.image_size,
        augment.randaugment_n,
        augment.randaugment_m,
        Mixing(),
        1000,
        0.0,
        Normalizer("cpu"),
    )


def measure(args, width: int, height: int, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    size = args.image_size
    root = tmp / f"folder{width}"
    files = []
    for i in range(args.images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(photo_like(rng, width, height))
        files.append(path)
    mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
    items, classes = scan_image_folder(root)
    _, manifest_path = make_shards(
        items, classes, tmp / f"shards{width}", "train", shard_samples=128, progress=False
    )
    manifest = load_manifest(manifest_path)
    measure_n = args.images  # one pass; the loaders cycle, so this never runs dry

    start = time.perf_counter()
    for path in files:
        Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    bare = len(files) / (time.perf_counter() - start)

    augment = TrainAugment(size, randaugment_n=2, randaugment_m=15)
    tv_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),  # bilinear, as ours by default
            transforms.RandomHorizontalFlip(),
            augment.randaugment(),  # the per-image Pillow RandAugment, TF's ops at M=15
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float32),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    device_augment = augmenter(augment)

    def consume(batch: dict) -> None:
        device_augment(
            batch["image"], batch["augment"], batch["mix"], batch["slot"], batch["label"]
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
            drop_last=True,
        )
        tv_cycle = (batch for _ in range(100) for batch in tv)
        results[f"torchvision_{workers}w"] = throughput(tv_cycle, measure_n, args.batch_size)
        plan = BatchPlan(args.batch_size, args.batch_size, 0, 1)
        ours = TrainLoader([manifest], [1.0], 0, "exact", plan, augment, workers, 0.01)
        results[f"ours_{workers}w"] = throughput(ours, measure_n, args.batch_size, consume)
    # What one worker core delivers when the augmentation runs elsewhere (on the GPU): the
    # per-core figure the planner uses for data.decode=cpu, measured end to end (IPC included).
    plan = BatchPlan(args.batch_size, args.batch_size, 0, 1)
    loader_only = TrainLoader([manifest], [1.0], 0, "exact", plan, augment, 1, 0.01)
    results["ours_1w_workers_only"] = throughput(loader_only, measure_n, args.batch_size)
    stages = stage_costs(files[: min(len(files), 256)], manifest, augment, args.batch_size)
    return {
        "setup": f"{args.images} JPEGs {width}x{height} q90 (mean {mean_kb:.0f} kB), crop {size}, "
        f"batch {args.batch_size}, RandAugment 2/15, normalised",
        "samples_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratios": {
            f"ours_vs_{base}_{w}w": round(results[f"ours_{w}w"] / results[key], 2)
            for w in (1, 2)
            for base, key in (("torchvision", f"torchvision_{w}w"), ("bare", "bare_decode"))
        },
        "stage_ms_per_sample": {k: round(v, 3) for k, v in stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, torch {torch.__version__}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in ((500, 375), (1024, 768)):
            result = measure(args, width, height, Path(tmp))
            record[f"{width}x{height}"] = result
            print(f"{record['machine']}; {result['setup']}")
            for key, value in result["samples_per_s"].items():
                print(f"  {key:16s} {value:8.1f} samples/s")
            print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
            stages = result["stage_ms_per_sample"]
            print("  ms/sample: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
            per_core = 1000 / (
                stages["read"]
                + stages["roi_decode"]
                + stages["resize"]
                + stages["device_augment_cpu"]
                + stages["collate"]
            )
            result["images_per_s_per_core_stage_sum"] = round(per_core, 1)
            print(f"  one core, every stage of ours (sum of stage costs): {per_core:.0f} images/s")
    record_result("data_pipeline", record)


if __name__ == "__main__":
    main()
