"""The reduced-size, region-of-interest decoder never loses a valid image: over thousands of
random image sizes (extreme aspect ratios, images smaller than the output), crops and output
sizes, every decode gives the requested size and matches a full decode + the same crop + resize
at >= 30 dB PSNR. Errors of our own code propagate; only undecodable bytes are bad data."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageFile
from timm.data.transforms import RandomResizedCropAndInterpolation

from coatnet_scale.data import roi_jpeg
from coatnet_scale.data.transforms import (
    TrainAugment,
    UndecodableImage,
    crop_resize,
    decode_eval,
    decode_train,
    eval_box,
    open_image,
)

# (width, height): the sizes the old decoder lost crops of, extreme aspect ratios, small images
SIZES = [
    (500, 375),
    (375, 500),
    (683, 512),
    (681, 512),
    (765, 512),
    (427, 64),
    (64, 427),
    (1000, 90),
    (33, 700),
    (17, 13),
    (40, 40),
    (301, 299),
    (640, 480),
    (1023, 767),
    (257, 255),
    (96, 1000),
]


def smooth_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like smooth image (low-frequency waves and gradients), JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        value = rng.uniform(60, 190) + 40 * (x / width) - 30 * (y / height)
        for _ in range(3):
            fx, fy = rng.uniform(0.3, 2.5, size=2)
            phase = rng.uniform(0, 2 * math.pi)
            value += rng.uniform(10, 30) * np.sin(
                2 * math.pi * (fx * x / width + fy * y / height) + phase
            )
        channels.append(np.clip(value, 0, 255))
    out = io.BytesIO()
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def full_decode(data: bytes, box, out: int, resample: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.resize((out, out), resample, box=box, reducing_gap=None))


def test_every_random_crop_decodes_to_size_and_matches_a_full_decode() -> None:
    rng = random.Random(0)
    # the sizes above, and random ones (log-uniform sides from 8 to 1200 px: any aspect ratio)
    sizes = SIZES + [
        (
            round(math.exp(rng.uniform(math.log(8), math.log(1200)))),
            round(math.exp(rng.uniform(math.log(8), math.log(1200)))),
        )
        for _ in range(24)
    ]
    worst, cases = math.inf, 0
    for index, (width, height) in enumerate(sizes):
        data = smooth_jpeg(width, height, index)
        img = open_image(data)
        for _ in range(60):  # 40 sizes x 60 = 2,400 combinations
            scale_min = rng.uniform(0.01, 1.0)
            ratio = (rng.uniform(0.2, 1.0), rng.uniform(1.0, 5.0))  # incl. extreme ratios
            out = rng.choice([8, 16, 24, 32, 48, 64, 96, 128, 160, 224, 256])
            random.seed(rng.getrandbits(32))
            top, left, h, w = RandomResizedCropAndInterpolation.get_params(
                img, (scale_min, 1.0), ratio
            )
            box = (left, top, left + w, top + h)
            got = np.asarray(crop_resize(data, box, out, Image.BILINEAR))
            assert got.shape == (out, out, 3), (width, height, box, out)
            worst = min(worst, psnr(got, full_decode(data, box, out, Image.BILINEAR)))
            cases += 1
    assert cases == 2400
    assert worst >= 30.0, worst


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_train_and_eval_decoding_never_fail_on_valid_images(width: int, height: int) -> None:
    """The whole training transform (with the paper's crop scale 0.08 and RandAugment) and the
    evaluation transform, at the output sizes of a run: 500x375 at 32 px lost 5.5% of its crops,
    427x64 ~40%, to 'box can't exceed original image size'."""
    data = smooth_jpeg(width, height, width * height)
    for size in (32, 160, 224):
        aug = TrainAugment(size, crop_scale_min=0.08, randaugment_n=2, randaugment_m=9)
        for seed in range(25):
            random.seed(seed)
            assert decode_train(data, aug).shape == (3, size, size)
        assert decode_eval(data, size, 0.875).shape == (3, size, size)
        left, top, right, bottom = eval_box(width, height, size, 0.875)
        assert left >= 0 and right <= width and top >= 0 and bottom <= height


def test_only_undecodable_bytes_are_bad_data(monkeypatch: pytest.MonkeyPatch) -> None:
    good = smooth_jpeg(64, 48, 1)
    for broken in (b"", b"not an image", good[: len(good) // 2]):  # empty, garbage, truncated
        with pytest.raises(UndecodableImage):
            decode_eval(broken, 32, 0.875)
    # a bug of ours is not bad data: it propagates as what it is
    from coatnet_scale.data import transforms

    monkeypatch.setattr(transforms, "_to_tensor", lambda img: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        decode_train(good, TrainAugment(32, randaugment_n=0))


# ---- region-of-interest decoding -------------------------------------------------------------


def test_the_region_decoder_is_built_and_decodes_only_the_crop() -> None:
    """setup.py builds it against the system libjpeg; without it decoding silently stays with
    Pillow (slower), so a machine that should have it (this one, CI) fails here instead."""
    assert roi_jpeg.AVAILABLE, "coatnet_scale/data/_roi_jpeg.c was not built: libjpeg headers?"
    data = smooth_jpeg(1024, 768, 3)
    region, box = roi_jpeg.decode_crop(data, 1024, 768, (600.0, 300.0, 900.0, 500.0), 224)
    # 1/1 scale (the 300x200 crop is < 2x 224): a few hundred columns and rows, not 1024x768
    assert region.size[0] < 400 and region.size[1] < 300
    assert box[2] - box[0] == 300 and box[3] - box[1] == 200


@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_region_pixels_equal_a_full_decode_at_the_same_scale(
    subsampling: int, progressive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the box and its resize margin the decoded region is the full (draft-scale) decode,
    pixel for pixel; only a cropped region's first and last column may differ (chroma
    upsampling lacks its outer neighbour there), which is why the region has a margin."""
    monkeypatch.setattr(ImageFile, "MAXBLOCK", 1 << 26)  # Pillow's progressive noise needs it
    rng = random.Random(subsampling * 2 + progressive)
    for _ in range(20):
        width, height = rng.randint(40, 900), rng.randint(40, 900)
        buffer = io.BytesIO()
        noisy = np.random.default_rng(rng.getrandbits(32)).integers(0, 255, (height, width, 3))
        Image.fromarray(noisy.astype(np.uint8)).save(
            buffer, "JPEG", quality=90, subsampling=subsampling, progressive=progressive
        )
        data = buffer.getvalue()
        w, h = rng.uniform(8, width), rng.uniform(8, height)
        left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
        out = rng.choice([16, 64, 224])
        box = (left, top, left + w, top + h)
        scale = roi_jpeg.draft_scale(width, height, box, out)
        region, local = roi_jpeg.decode_crop(data, width, height, box, out)
        full = Image.open(io.BytesIO(data))
        if scale > 1:
            full.draft("RGB", (width // scale, height // scale))
        full = np.asarray(full.convert("RGB")).astype(int)
        x_off, y_off = round(box[0] / scale - local[0]), round(box[1] / scale - local[1])
        got = np.asarray(region).astype(int)[:, 1:-1]
        expected = full[y_off : y_off + region.size[1], x_off + 1 : x_off + region.size[0] - 1]
        assert np.array_equal(got, expected), (width, height, box, out, scale)


def test_cmyk_and_grayscale_jpegs_decode() -> None:
    """libjpeg cannot give RGB for CMYK: those fall back to Pillow; grayscale becomes RGB."""
    for mode in ("CMYK", "L"):
        buffer = io.BytesIO()
        Image.new(mode, (300, 200), 90 if mode == "L" else (10, 20, 30, 40)).save(buffer, "JPEG")
        out = decode_eval(buffer.getvalue(), 64, 0.875)
        assert out.shape == (3, 64, 64)
        reference = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").getpixel((150, 100))
        assert np.abs(out[:, 32, 32].numpy().astype(int) - np.array(reference)).max() <= 2


def test_a_truncated_jpeg_is_bad_whatever_the_crop() -> None:
    """The region decoder stops at the crop's last row; the end-of-image check makes a file cut
    below the crop bad too, as Pillow's full decode (and so every slot agrees)."""
    data = smooth_jpeg(500, 375, 7)
    cut = data[: len(data) * 6 // 10]
    for box in ((0.0, 0.0, 100.0, 50.0), (0.0, 300.0, 100.0, 375.0)):
        with pytest.raises(UndecodableImage, match="truncated"):
            crop_resize(cut, box, 32, Image.BILINEAR)
    assert crop_resize(data + b"\x00" * 100, (0.0, 0.0, 100.0, 50.0), 32, Image.BILINEAR)
