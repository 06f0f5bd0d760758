"""Decode and augment one sample; mixup/cutmix for a batch.

Train: RandomResizedCrop (timm's parameter sampling) -> horizontal flip -> RandAugment (timm) ->
uint8 CHW tensor. Eval: resize the shorter side to image_size / crop_pct, center crop. Both decode
JPEGs in PIL's draft mode when the region to be kept allows: libjpeg then decodes at 1/2, 1/4 or
1/8 scale directly (DCT scaling), which is several times faster than a full decode followed by a
downscale, and never goes below the output resolution (no quality loss at the output size).

Workers return uint8 tensors; a `Normalizer` turns a batch into float on the consumer's side, which
moves 4x fewer bytes between processes than float images.

Every random choice for a sample is drawn from `random` seeded by the sample's slot in the run
(see pipeline.py), so a sample is augmented the same way whichever rank or worker reads it.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, rand_augment_transform
from timm.data.auto_augment import _RAND_TRANSFORMS, RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation

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

    def randaugment(self) -> RandAugment | None:
        """timm's RandAugment with the paper's (n, m).

        timm clips the magnitude to its scale's maximum, 10, so the paper's m=15 acts as 10. Its
        TF-style Posterize keeps int(m / 10 * 4) bits, 0 for m < 2.5, which Pillow >= 11 rejects
        ("bits must be between 1 and 8"); the original AutoAugment Posterize (4..8 bits) stands
        in for it.
        """
        if self.randaugment_n == 0:
            return None
        hparams = dict(
            translate_const=int(self.image_size * 0.45),
            img_mean=tuple(round(255 * x) for x in IMAGENET_DEFAULT_MEAN),
        )
        ops = [op if op != "Posterize" else "PosterizeOriginal" for op in _RAND_TRANSFORMS]
        spec = f"rand-m{self.randaugment_m}-n{self.randaugment_n}"
        return rand_augment_transform(spec, hparams, transforms=ops)


def _draft_scale(img: Image.Image, box: tuple[float, float, float, float], out: int) -> float:
    """Ask libjpeg for the smallest DCT scale that keeps `box` at least `out` pixels on each side;
    return the factor by which the decoded image shrank (1.0 when draft does not apply)."""
    if img.format != "JPEG":
        return 1.0
    width, height = img.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    need = (math.ceil(width * out / box_w), math.ceil(height * out / box_h))
    img.draft("RGB", need)
    return img.size[0] / width


def decode_train(data: bytes, aug: TrainAugment, randaugment=None) -> torch.Tensor:
    """JPEG bytes -> augmented uint8 (3, S, S) tensor. Uses the global `random` state."""
    img = Image.open(io.BytesIO(data))
    top, left, h, w = RandomResizedCropAndInterpolation.get_params(
        img, (aug.crop_scale_min, 1.0), RRC_RATIO
    )
    box = (left, top, left + w, top + h)
    scale = _draft_scale(img, box, aug.image_size)
    img = img.convert("RGB")
    box = tuple(v * scale for v in box)
    size = (aug.image_size, aug.image_size)
    resample = Image.BICUBIC if aug.interpolation == "bicubic" else Image.BILINEAR
    img = img.resize(size, resample, box=box, reducing_gap=None)
    if random.random() < aug.hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if randaugment is not None:
        img = randaugment(img)
    return _to_tensor(img)


def decode_eval(data: bytes, image_size: int, crop_pct: float) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, S, S): shorter side to S / crop_pct, then a center crop of S."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    short = min(width, height)
    resized_short = image_size / crop_pct
    crop = short * image_size / resized_short  # side of the kept square in source pixels
    left, top = (width - crop) / 2, (height - crop) / 2
    box = (left, top, left + crop, top + crop)
    scale = _draft_scale(img, box, image_size)
    img = img.convert("RGB")
    box = tuple(v * scale for v in box)
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


def build_mixup(
    mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int
) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing; None when both are off.

    It draws from numpy's global RNG: seed it per step (`seed_for(...)`) for a reproducible run.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
