"""RandAugment as the paper's TF implementation runs it, at any magnitude [P Table 10: M=15, 20].

The CoAtNet/EfficientNet TF code (`tensorflow/tpu` `models/official/efficientnet/autoaugment.py`,
`distort_image_with_randaugment`) applies `num_layers` times: pick one of 16 ops uniformly, apply
it with probability p ~ U(0.2, 0.8), its argument a fixed function of the magnitude M
(`level_to_arg`, levels out of 10) with a random sign for geometric ops. timm's RandAugment differs
where the paper's recipes need it: it clamps M to 10 (so M=15 runs as 10), has no Cutout, and its
ops reject arguments TF's mapping gives beyond M=10 (Posterize with 10 bits). Here each op's
argument is TF's mapping extrapolated to the configured M and clamped to what the op can take
(`op_argument`): Posterize keeps int(4M/10) bits (at most 8: TF's posterize weakens with M),
Solarize's threshold int(256M/10) stops at 256 (no pixel inverted: TF's solarize also weakens
with M), SolarizeAdd adds int(110M/10) below 128, enhancements use 1.8M/10 + 0.1, shears 0.3M/10,
rotations 30M/10 degrees, translations and Cutout TF's 100 and 40 px scaled to the image size
(TF's constants are for 224 px). Fill colour: TF's 128 grey. The ops themselves are timm's
(`timm.data.auto_augment`), Cutout written here. Every random draw uses Python's `random`, which
the pipeline seeds per sample slot (exact resume).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageOps
from timm.data import auto_augment as timm_ops

MAX_LEVEL = 10.0  # TF's `_MAX_LEVEL`: magnitudes are out of 10
REFERENCE_SIZE = 224  # TF's translate (100 px) and cutout (40 px) constants are for this size
TRANSLATE_CONST, CUTOUT_CONST = 100.0, 40.0
FILL = (128, 128, 128)  # TF's `replace_value`

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}  # TF negates at random


def op_argument(op: str, magnitude: float, image_size: int) -> float | int | None:
    """TF's argument for `op` at `magnitude`, before the random sign, clamped to the op's
    domain; None for ops without an argument."""
    level = magnitude / MAX_LEVEL
    scale = image_size / REFERENCE_SIZE
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return level * 30.0
    if op == "Posterize":
        return min(8, max(0, int(level * 4)))
    if op == "Solarize":
        return min(256, max(0, int(level * 256)))
    if op == "SolarizeAdd":
        return min(255, max(0, int(level * 110)))
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return max(0.0, level * 1.8 + 0.1)
    if op in ("ShearX", "ShearY"):
        return level * 0.3
    if op in ("TranslateX", "TranslateY"):
        return min(float(image_size), level * TRANSLATE_CONST * scale)
    if op == "Cutout":
        return min(image_size, int(level * CUTOUT_CONST * scale))
    raise ValueError(f"unknown RandAugment op {op!r}")


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """TF's posterize: keep the top `bits` bits (0 bits: black, which Pillow refuses)."""
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return timm_ops.posterize(img, bits)


def cutout(img: Image.Image, pad: int) -> Image.Image:
    """TF's cutout: a (2 pad)-sided square of grey at a uniformly random centre, clipped."""
    if pad <= 0:
        return img
    x, y = random.randrange(img.size[0]), random.randrange(img.size[1])
    out = img.copy()
    ImageDraw.Draw(out).rectangle((x - pad, y - pad, x + pad - 1, y + pad - 1), fill=FILL)
    return out


_GEOMETRY = {"fillcolor": FILL, "resample": Image.NEAREST}  # TF's transforms: nearest, grey fill
APPLY: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img, _: ImageOps.autocontrast(img),
    "Equalize": lambda img, _: ImageOps.equalize(img),
    "Invert": lambda img, _: ImageOps.invert(img),
    "Rotate": lambda img, deg: timm_ops.rotate(img, deg, **_GEOMETRY),
    "Posterize": posterize,
    "Solarize": lambda img, threshold: timm_ops.solarize(img, threshold),
    "SolarizeAdd": lambda img, add: timm_ops.solarize_add(img, add),
    "Color": lambda img, factor: timm_ops.color(img, factor),
    "Contrast": lambda img, factor: timm_ops.contrast(img, factor),
    "Brightness": lambda img, factor: timm_ops.brightness(img, factor),
    "Sharpness": lambda img, factor: timm_ops.sharpness(img, factor),
    "ShearX": lambda img, factor: timm_ops.shear_x(img, factor, **_GEOMETRY),
    "ShearY": lambda img, factor: timm_ops.shear_y(img, factor, **_GEOMETRY),
    "TranslateX": lambda img, px: timm_ops.translate_x_abs(img, px, **_GEOMETRY),
    "TranslateY": lambda img, px: timm_ops.translate_y_abs(img, px, **_GEOMETRY),
    "Cutout": cutout,
}


class RandAugment:
    """`num_layers` ops per image at magnitude `magnitude` (TF's procedure, see the module)."""

    def __init__(self, num_layers: int, magnitude: float, image_size: int) -> None:
        self.num_layers, self.magnitude, self.image_size = num_layers, magnitude, image_size

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(self.num_layers):
            op = random.choice(OPS)
            probability = random.uniform(0.2, 0.8)
            if random.random() >= probability:
                continue
            argument = op_argument(op, self.magnitude, self.image_size)
            if op in SIGNED and random.random() < 0.5:
                argument = -argument
            img = APPLY[op](img, argument)
        return img
