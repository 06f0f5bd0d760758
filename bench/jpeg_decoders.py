"""Which JPEG decoder for the training crop: ms per sample for decode + RandomResizedCrop to 224.

    python bench/jpeg_decoders.py [--images 200] [--repeats 3]

For photo-like JPEGs of 500x375 and 1024x768 (bench/data_pipeline.py's generator), each sample's
crop box drawn as timm's RandomResizedCrop draws it (scale 0.08-1), one process, one thread:
- pillow_full: full decode, then the crop resized (what torchvision's RandomResizedCrop does);
- pillow_draft: Pillow's draft mode (DCT scaling when the crop is >= 2x the output), then resize:
  this pipeline until 2026-11-30;
- roi: ours (coatnet_scale/data/roi_jpeg.py): draft's DCT scale plus only the crop's rows and
  MCU columns decoded (libjpeg-turbo's skip/crop scanline API), then resize;
- torchvision_cpu: torchvision.io.decode_jpeg (its bundled libjpeg-turbo, full decode), then
  resized_crop on the tensor (antialiased bilinear);
- simplejpeg (if installed): DCT-scaled decode with min_width/min_height, no crop, then resize;
- PyTurboJPEG: reported, not timed, when it cannot load (it needs TurboJPEG >= 3.0).
Medians over `repeats` passes; results merge into bench/results.json under "jpeg_decoders".
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from bench.common import cpu_name, record_result
from bench.data_pipeline import photo_like
from coatnet_scale.data import roi_jpeg
from coatnet_scale.data.transforms import crop_resize

OUT = 224


def boxes_for(images: list[bytes], seed: int) -> list[tuple[float, float, float, float]]:
    random.seed(seed)
    out = []
    for data in images:
        img = Image.open(io.BytesIO(data))
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(
            img, (0.08, 1.0), (3 / 4, 4 / 3)
        )
        out.append((left, top, left + w, top + h))
    return out


def pillow_full(data: bytes, box) -> None:
    Image.open(io.BytesIO(data)).convert("RGB").resize((OUT, OUT), Image.BILINEAR, box=box)


def pillow_draft(data: bytes, box) -> None:
    available, roi_jpeg.AVAILABLE = roi_jpeg.AVAILABLE, False
    try:
        crop_resize(data, box, OUT, Image.BILINEAR)
    finally:
        roi_jpeg.AVAILABLE = available


def roi(data: bytes, box) -> None:
    crop_resize(data, box, OUT, Image.BILINEAR)


def torchvision_cpu(data: bytes, box) -> None:
    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    left, top = int(box[0]), int(box[1])
    TF.resized_crop(
        image, top, left, int(box[3] - box[1]), int(box[2] - box[0]), [OUT, OUT], antialias=True
    )


def simplejpeg_scaled(data: bytes, box) -> None:
    import simplejpeg

    width, height = Image.open(io.BytesIO(data)).size
    need_w = int(width * OUT / (box[2] - box[0])) + 1
    need_h = int(height * OUT / (box[3] - box[1])) + 1
    pixels = simplejpeg.decode_jpeg(data, min_width=need_w, min_height=need_h)
    scale = pixels.shape[1] / width
    Image.fromarray(pixels).resize((OUT, OUT), Image.BILINEAR, box=tuple(v * scale for v in box))


def time_decoder(fn, images, boxes, repeats: int) -> float:
    """Median ms per sample over `repeats` passes (after one warm-up sample)."""
    fn(images[0], boxes[0])
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data, box in zip(images, boxes, strict=True):
            fn(data, box)
        passes.append((time.perf_counter() - start) * 1000 / len(images))
    return statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    decoders = {
        "pillow_full": pillow_full,
        "pillow_draft": pillow_draft,
        "roi": roi,
        "torchvision_cpu": torchvision_cpu,
    }
    notes = {}
    try:
        import simplejpeg  # noqa: F401

        decoders["simplejpeg"] = simplejpeg_scaled
    except ImportError:
        notes["simplejpeg"] = "not installed"
    try:
        from turbojpeg import TurboJPEG

        TurboJPEG()
        notes["pyturbojpeg"] = "loads (not timed here)"
    except Exception as err:
        notes["pyturbojpeg"] = f"unusable: {str(err).splitlines()[0][:120]}"
    if not roi_jpeg.AVAILABLE:
        raise SystemExit("the ROI decoder is not built (no libjpeg headers?): see setup.py")

    record = {"date": date.today().isoformat(), "machine": cpu_name(), "ms_per_sample": {}}
    for width, height in ((500, 375), (1024, 768)):
        rng = np.random.default_rng(0)
        images = [photo_like(rng, width, height) for _ in range(args.images)]
        boxes = boxes_for(images, 0)
        row = {name: time_decoder(fn, images, boxes, args.repeats) for name, fn in decoders.items()}
        record["ms_per_sample"][f"{width}x{height}"] = {k: round(v, 3) for k, v in row.items()}
        line = ", ".join(f"{k} {v:.2f}" for k, v in row.items())
        print(f"{width}x{height}: ms/sample (decode + crop {OUT}): {line}")
        print(
            f"  roi vs pillow_draft {row['pillow_draft'] / row['roi']:.2f}x faster, "
            f"vs pillow_full {row['pillow_full'] / row['roi']:.2f}x"
        )
    record["notes"] = notes
    print(f"{cpu_name()}; notes: {notes}")
    record_result("jpeg_decoders", record)


if __name__ == "__main__":
    main()
