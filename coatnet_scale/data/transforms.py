"""Decode one sample: the training crop or the evaluation centre crop, as a uint8 tensor.

Train: RandomResizedCrop (timm's parameter sampling) -> uint8 CHW tensor at the output size; the
flip, RandAugment (TF's) and mixup/CutMix are drawn per sample right after (`batch_augment.draw`)
and applied to the batch on the training device (`batch_augment.BatchAugment`).
Eval: resize the shorter side to image_size / crop_pct, center crop. Both decode
JPEGs at reduced size when the region to be kept allows (libjpeg decodes at 1/2, 1/4 or 1/8 scale
directly, DCT scaling: several times faster than a full decode followed by a downscale, and never
below the output resolution), and only the region to be kept (`roi_jpeg`: the crop's rows and MCU
columns; Pillow's draft mode where that decoder was not built).

Only bytes that do not decode are bad data (`UndecodableImage`); any other exception here is a bug
and propagates.

Workers return uint8 tensors; a `Normalizer` turns a batch into float on the consumer's side, which
moves 4x fewer bytes between processes than float images.

Every random choice for a sample is drawn from `random` seeded by the sample's slot in the run
(see pipeline.py), so a sample is augmented the same way whichever rank or worker reads it.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation

from coatnet_scale.data import roi_jpeg
from coatnet_scale.data.batch_augment import Mixing, draw
from coatnet_scale.data.randaugment import RandAugment

RRC_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class TrainAugment:
    """The per-sample training augmentation (picklable, built once per worker)."""

    image_size: int
    crop_scale_min: float = 0.08
    randaugment_n: int = 2
    randaugment_m: int = 15
    hflip: float = 0.5
    interpolation: str = "bilinear"  # or "bicubic": about 2x the resize cost on CPU
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def randaugment(self) -> RandAugment | None:
        """The per-image Pillow RandAugment at (n, m) (randaugment.py): the reference the batched
        device version is tested against, and the baselines' augmentation in bench/."""
        if self.randaugment_n == 0:
            return None
        return RandAugment(self.randaugment_n, self.randaugment_m, self.image_size)

    def draw(self) -> tuple[list[int], list[float]]:
        """This sample's flip, RandAugment and mixing draws (global `random`, seeded per slot)."""
        mixing = Mixing(self.mixup_alpha, self.cutmix_alpha)
        return draw(self.image_size, self.hflip, self.randaugment_n, mixing)


Box = tuple[float, float, float, float]
# What Pillow raises for bytes it cannot decode (UnidentifiedImageError and "image file is
# truncated" are OSErrors; some decoders raise SyntaxError, ValueError or EOFError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class UndecodableImage(ValueError):
    """The stored bytes are not a decodable image: bad data, counted as a bad sample. Every other
    exception in decoding and augmentation is a bug of ours and propagates."""


def open_image(data: bytes) -> Image.Image:
    """The image's header (size, format); UndecodableImage when the bytes are not an image."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names only an anonymous BytesIO
        raise UndecodableImage("not an image (in no format Pillow reads)") from None
    except DECODE_ERRORS as err:
        raise UndecodableImage(f"not an image: {err}") from None


def libjpeg_rgb(img: Image.Image) -> bool:
    """A JPEG that libjpeg (our region decoder, nvJPEG) decodes to RGB: not CMYK/YCCK."""
    return img.format == "JPEG" and img.mode in ("RGB", "L")


@contextlib.contextmanager
def libjpeg_errors_are_bad_data() -> Iterator[None]:
    """libjpeg's own errors (ValueError from `roi_jpeg`; the arithmetic around it is Python's,
    whose errors are bugs and propagate) make the sample bad data."""
    try:
        yield
    except ValueError as err:
        raise UndecodableImage(f"cannot decode the image: {err}") from None


def decode_region(data: bytes, img: Image.Image, box: Box, out: int) -> tuple[Image.Image, Box]:
    """Decode `img` (opened from `data`) for a crop `box` (in full-image pixels) to be resized to
    `out` pixels: a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the box at least
    `out` pixels on each side, and only the region the box covers (`roi_jpeg`, where it was
    built). Returns the RGB image and the box in its pixels.

    A scaled decode is 1/s of the image exactly, but libjpeg rounds its pixel count up on each
    axis (500x375 at 1/8 is 63x47 pixels for 62.5x46.875 of image, the last row and column
    partial): the box is scaled by 1/s (what Pillow's `draft` reports) and kept inside the
    image's true extent. (Scaling by one ratio of pixel counts pushed crops past an edge of
    valid images, or shifted them by a fraction of a pixel.)
    """
    width, height = img.size
    if roi_jpeg.AVAILABLE and libjpeg_rgb(img):
        with libjpeg_errors_are_bad_data():
            region = roi_jpeg.decode_crop(data, width, height, box, out)
        if region is not None:
            return region
    scale = 1.0
    if img.format == "JPEG":  # our arithmetic, outside the handler: its errors are bugs
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        need = (math.ceil(width * out / box_w), math.ceil(height * out / box_h))
        drafted = img.draft("RGB", need)
        if drafted is not None:
            scale = drafted[1][2] / width
    try:
        img.load()
    except DECODE_ERRORS as err:
        raise UndecodableImage(f"cannot decode the image: {err}") from None
    scaled = (
        max(0.0, box[0] * scale),
        max(0.0, box[1] * scale),
        min(width * scale, box[2] * scale),
        min(height * scale, box[3] * scale),
    )
    return img.convert("RGB"), scaled


def crop_resize(data: bytes, box: Box, out: int, resample: int) -> Image.Image:
    """The `box` of the encoded image, resized to out x out (decoded at reduced size if it can)."""
    img, box = decode_region(data, open_image(data), box, out)
    return img.resize((out, out), resample, box=box, reducing_gap=None)


def train_box(img: Image.Image, aug: TrainAugment) -> Box:
    """The RandomResizedCrop window of an image (timm's parameter sampling, global `random`)."""
    top, left, h, w = RandomResizedCropAndInterpolation.get_params(
        img, (aug.crop_scale_min, 1.0), RRC_RATIO
    )
    return left, top, left + w, top + h


def decode_train(data: bytes, aug: TrainAugment) -> torch.Tensor:
    """Encoded image -> its random-resized crop, uint8 (3, S, S). Draws the crop box from the
    global `random` state (seeded per slot); only the box's region is decoded."""
    img = open_image(data)
    img, box = decode_region(data, img, train_box(img, aug), aug.image_size)
    size = (aug.image_size, aug.image_size)
    resample = Image.BICUBIC if aug.interpolation == "bicubic" else Image.BILINEAR
    return _to_tensor(img.resize(size, resample, box=box, reducing_gap=None))


@dataclass(frozen=True)
class EncodedCrop:
    """A training sample left encoded, for the device to decode (`data.decode=gpu`): the JPEG's
    bytes and its crop window, drawn exactly as `decode_train` draws it for the same slot."""

    data: bytes
    box: Box


def crop_for_device(data: bytes, aug: TrainAugment) -> EncodedCrop | torch.Tensor:
    """A baseline or colour JPEG stays encoded with its window (`EncodedCrop`); anything else
    (PNG, CMYK JPEG, which the device decoder does not take) is decoded here as usual."""
    img = open_image(data)
    if libjpeg_rgb(img):
        with libjpeg_errors_are_bad_data():
            roi_jpeg.check_complete(data)  # a truncated file is bad here, as on the CPU path
        return EncodedCrop(data, train_box(img, aug))
    return decode_train(data, aug)


def eval_box(width: int, height: int, image_size: int, crop_pct: float) -> Box:
    """The centre square kept by "shorter side to S / crop_pct, then a centre crop of S"."""
    crop = min(width, height) * crop_pct  # side of the kept square in source pixels
    left, top = (width - crop) / 2, (height - crop) / 2
    return left, top, left + crop, top + crop


def decode_eval(data: bytes, image_size: int, crop_pct: float) -> torch.Tensor:
    """Encoded image -> uint8 (3, S, S): shorter side to S / crop_pct, then a center crop of S."""
    img = open_image(data)
    img, box = decode_region(data, img, eval_box(*img.size, image_size, crop_pct), image_size)
    img = img.resize((image_size, image_size), Image.BICUBIC, box=box, reducing_gap=None)
    return _to_tensor(img)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class Normalizer:
    """uint8 (B, 3, H, W) batch -> normalised float in `dtype`, ImageNet mean/std (timm's).

    The constants are made once, on the device, not rebuilt (and copied from the host) for every
    micro-batch."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.shift = -mean
        self.scale = 1 / (torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32, copy=True).add_(self.shift).mul_(self.scale).to(self.dtype)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-off `Normalizer` on the images' device (tools and tests; the loop keeps one)."""
    return Normalizer(images.device, dtype)(images)
