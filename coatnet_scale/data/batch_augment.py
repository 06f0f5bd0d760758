"""Flip, RandAugment, mixup/CutMix and normalisation on the batch, on the training device.

The loader workers only decode and crop (`transforms.decode_train`: the region of interest, resized
to the output size, uint8); everything after the crop runs here, batched, on the device the model
trains on (CUDA on GPUs, the CPU in tests), where it costs a few kernels per op instead of a core's
milliseconds per image.

Every random choice is drawn in the worker, from the sample's slot seed (`draw`), and travels with
the batch as two small tensors: the augmentation does not depend on which rank, worker or
micro-batch a sample lands in, so exact and elastic resume stay bitwise. Mixup/CutMix pairs slot
2k with slot 2k+1 (the pair's draws are slot 2k's): micro-batches are contiguous slot ranges, so a
pair is always in one micro-batch when micro-batches have an even size and start at an even slot
(any even global batch split into even micro-batches); a sample whose partner is elsewhere is not
mixed. (timm's Mixup draws one lambda per batch and pairs sample i with B-1-i: both depend on
the batch's composition.)

The RandAugment ops are the paper's TF ops at TF's arguments (`randaugment.op_argument`, any
magnitude), computed the way Pillow computes them (lookup tables, the affine nearest-neighbour
transform at pixel centres, Pillow's blend), on integer-valued float images rounded after each op
as Pillow's uint8 images are. `randaugment.py` is the per-image Pillow reference they are tested
against (tests/data/test_batch_augment.py: per-op differences within stated tolerances).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from coatnet_scale.data.randaugment import FILL, OPS, SIGNED, op_argument
from coatnet_scale.losses import smooth_targets

LAYER_FIELDS = 5  # per RandAugment layer: op index, applied, sign, cutout x, cutout y
MIX_FIELDS = 4  # lambda, CutMix (1) or mixup (0), CutMix box centre x, y (fractions)
GREY = float(FILL[0])


@dataclass(frozen=True)
class Mixing:
    """Mixup/CutMix as configured (timm's switch rule: both on -> CutMix half of the time)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def draw(
    image_size: int, hflip: float, layers: int, mixing: Mixing
) -> tuple[list[int], list[float]]:
    """One sample's augmentation draws, from the global `random` (seeded per slot by the
    pipeline): [flip, (op, applied, sign, cutout x, cutout y) per layer] and [lambda, cutmix, box
    centre x, y]. The sequence of draws is fixed whatever is drawn, so each field is a function of
    the slot alone."""
    params = [int(random.random() < hflip)]
    for _ in range(layers):
        op = random.randrange(len(OPS))
        probability = random.uniform(0.2, 0.8)  # TF: each layer's op applies with p ~ U(0.2, 0.8)
        applied = int(random.random() < probability)
        sign = -1 if random.random() < 0.5 else 1
        params += [op, applied, sign, random.randrange(image_size), random.randrange(image_size)]
    use_cutmix = mixing.cutmix_alpha > 0 and (
        mixing.mixup_alpha <= 0 or random.random() < mixing.switch_prob
    )
    alpha = mixing.cutmix_alpha if use_cutmix else mixing.mixup_alpha
    lam = random.betavariate(alpha, alpha) if alpha > 0 else 1.0
    mix = [lam, float(use_cutmix), random.random(), random.random()]
    return params, mix


# ---- the ops: (N, 3, H, W) float tensors holding integers 0..255 ----------------------------


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's `Image.blend(degenerate, image, factor)`: truncated toward zero, clipped."""
    out = degenerate + factor.view(-1, 1, 1, 1) * (image - degenerate)
    return out.clamp_(0, 255).floor_()


def _luma(image: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, as (N, 1, H, W)."""
    r, g, b = image.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)[:, None]


def _lut(image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Apply per-(sample, channel) lookup tables (N, 3, 256) to integer-valued images."""
    n, c, h, w = image.shape
    index = image.long().view(n, c, h * w)
    return torch.gather(table.to(image.dtype), 2, index).view(n, c, h, w)


def autocontrast(image: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.autocontrast (no cutoff): each channel stretched to 0..255."""
    lo = image.amin(dim=(2, 3), keepdim=True)
    hi = image.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1)
    stretched = torch.floor(image * scale - lo * scale).clamp_(0, 255)
    return torch.where(hi > lo, stretched, image)


def equalize(image: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.equalize, per channel: lut[i] = (step // 2 + sum(h[:i])) // step with
    step = (pixels - count of the largest value present) // 255; identity when step is 0."""
    n, c, h, w = image.shape
    values = image.long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=image.device)
    hist.scatter_add_(1, values, torch.ones_like(values))
    top = values.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255
    before = torch.cumsum(hist, dim=1) - hist
    table = (step // 2 + before) // step.clamp_min(1)
    identity = torch.arange(256, device=image.device).expand(n * c, 256)
    table = torch.where(step > 0, table, identity).clamp_(0, 255)
    return _lut(image, table.view(n, c, 256))


def invert(image: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255 - image


def posterize(image: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits (0 bits: black, as TF)."""
    step = torch.pow(2.0, 8 - bits.to(image.dtype)).view(-1, 1, 1, 1)
    return torch.floor(image / step) * step


def solarize(image: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(image < threshold.view(-1, 1, 1, 1), image, 255 - image)


def solarize_add(image: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: below 128 add (clipped at 255), the rest unchanged."""
    return torch.where(image < 128, (image + add.view(-1, 1, 1, 1)).clamp_(max=255), image)


def color(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_luma(image).expand_as(image), image, factor)


def contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey of the image's mean luma (rounded, as ImageEnhance.Contrast)."""
    mean = torch.floor(_luma(image).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(image), image, factor)


def brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(image), image, factor)


SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def sharpness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with Pillow's SMOOTH filter of the image (its 1-pixel border left as it is)."""
    kernel = SMOOTH.to(image.device, image.dtype).expand(3, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(image, kernel, groups=3)
    degenerate = image.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5).clamp_(0, 255)
    return _blend(degenerate, image, factor)


def affine_nearest(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Pillow's AFFINE transform with NEAREST resampling and TF's grey fill: output pixel (x, y)
    takes input pixel floor(A (x + 0.5, y + 0.5) + t), grey where that is outside. `matrix` is
    (N, 6): Pillow's (a, b, c, d, e, f)."""
    n, channels, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=torch.float64) + 0.5,
        torch.arange(w, device=image.device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    m = matrix.to(torch.float64).view(n, 6, 1, 1)
    src_x = torch.floor(m[:, 0] * xs + m[:, 1] * ys + m[:, 2]).long()
    src_y = torch.floor(m[:, 3] * xs + m[:, 4] * ys + m[:, 5]).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w)
    moved = torch.gather(image.view(n, channels, h * w), 2, flat.expand(n, channels, h * w))
    return torch.where(inside.view(n, 1, h, w), moved.view(n, channels, h, w), GREY)


def rotate(image: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.rotate (counter-clockwise, about the centre w/2, h/2)."""
    h, w = image.shape[-2:]
    angle = -torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine_nearest(image, torch.stack([cos, sin, c, -sin, cos, f], dim=1))


def _matrices(n: int, device: torch.device, **entries: torch.Tensor) -> torch.Tensor:
    matrix = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64, device=device)
    matrix = matrix.repeat(n, 1)
    for name, value in entries.items():
        matrix[:, "abcdef".index(name)] = value.to(torch.float64)
    return matrix


def shear_x(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return affine_nearest(image, _matrices(len(image), image.device, b=factor))


def shear_y(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return affine_nearest(image, _matrices(len(image), image.device, d=factor))


def translate_x(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return affine_nearest(image, _matrices(len(image), image.device, c=pixels))


def translate_y(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return affine_nearest(image, _matrices(len(image), image.device, f=pixels))


def cutout(image: torch.Tensor, pad: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """TF's cutout: the (2 pad)-sided square at each sample's centre (x, y), clipped, grey."""
    h, w = image.shape[-2:]
    rows = torch.arange(h, device=image.device).view(1, h, 1)
    cols = torch.arange(w, device=image.device).view(1, 1, w)
    x, y, p = (v.view(-1, 1, 1) for v in (centres[:, 0], centres[:, 1], pad))
    box = (rows >= y - p) & (rows < y + p) & (cols >= x - p) & (cols < x + p)
    return torch.where(box[:, None], GREY, image)


IMPLEMENTATIONS = {
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "SolarizeAdd": solarize_add,
}


def apply_op(op: str, image: torch.Tensor, argument: torch.Tensor, centres=None) -> torch.Tensor:
    """One RandAugment op on a batch; `argument` per sample (sign already applied)."""
    if op == "Cutout":
        return cutout(image, argument, centres)
    return IMPLEMENTATIONS[op](image, argument)


# ---- the batch -----------------------------------------------------------------------------


class BatchAugment:
    """Applies the drawn augmentation to a uint8 batch on the device; returns normalised images
    and (soft) targets. Built once per run."""

    def __init__(
        self,
        image_size: int,
        layers: int,
        magnitude: float,
        mixing: Mixing,
        num_classes: int,
        smoothing: float,
        normalizer,
    ) -> None:
        self.layers, self.mixing = layers, mixing
        self.num_classes, self.smoothing, self.normalizer = num_classes, smoothing, normalizer
        self.arguments = [op_argument(op, magnitude, image_size) or 0 for op in OPS]

    def __call__(
        self,
        images: torch.Tensor,
        params: torch.Tensor,
        mix: torch.Tensor,
        slots: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` uint8 (B, 3, S, S) on the device; `params`, `mix`, `slots` and `valid` as the
        loader made them (on the host: the per-op sample indices are computed there, without a
        device synchronisation); `labels` (B,) on the device. A sample does not mix with an
        invalid partner (a bad sample's filler is another sample, which depends on the batch)."""
        x = self.augment_pixels(images, params)
        targets = smooth_targets(labels, self.num_classes, self.smoothing)
        if self.mixing.enabled:
            ok = torch.ones(len(slots), dtype=torch.bool) if valid is None else valid.cpu()
            x, targets = self._mix(x, targets, mix, slots, ok)
        return self.normalizer(x), targets

    def augment_pixels(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Flip and RandAugment: float images holding integers 0..255 (what Pillow would give)."""
        device = images.device
        x = images.to(torch.float32, copy=True)
        flipped = torch.nonzero(params[:, 0]).flatten().to(device, non_blocking=True)
        x[flipped] = x[flipped].flip(-1)
        for layer in range(self.layers):
            fields = params[:, 1 + layer * LAYER_FIELDS : 1 + (layer + 1) * LAYER_FIELDS]
            op, applied, sign, centres = fields[:, 0], fields[:, 1], fields[:, 2], fields[:, 3:5]
            for k, name in enumerate(OPS):
                chosen = torch.nonzero((op == k) & (applied == 1)).flatten()
                if not len(chosen):
                    continue
                argument = torch.full((len(chosen),), float(self.arguments[k]))
                if name in SIGNED:
                    argument = argument * sign[chosen].to(torch.float32)
                index = chosen.to(device, non_blocking=True)
                x[index] = apply_op(
                    name,
                    x[index],
                    argument.to(device, non_blocking=True),
                    centres[chosen].to(device, non_blocking=True),
                )
        return x

    def _mix(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        mix: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair (2k, 2k+1) mixed with the draws of slot 2k; see the module docstring."""
        device = x.device
        batch, (h, w) = len(slots), x.shape[-2:]
        partner = (slots ^ 1) - slots[0]
        present = (partner >= 0) & (partner < batch)
        partner = torch.where(present, partner, torch.arange(batch))
        present &= valid & valid[partner]
        leader = torch.where(slots % 2 == 0, torch.arange(batch), partner)
        draws = mix[leader]
        lam, use_cutmix = draws[:, 0].clone(), draws[:, 1] > 0
        lam[~present] = 1.0
        # CutMix: a box of area (1 - lam) at the drawn centre, clipped; lam = kept area (timm's
        # rand_bbox with correct_lam)
        cut = torch.sqrt(1.0 - lam)
        cut_h, cut_w = (cut * h).long(), (cut * w).long()
        cy, cx = (draws[:, 3] * h).long(), (draws[:, 2] * w).long()
        y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
        x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
        box_lam = 1.0 - ((y1 - y0) * (x1 - x0)).float() / (h * w)
        lam = torch.where(use_cutmix & present, box_lam, lam)
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        inside = (rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
        inside = inside & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1))
        # Only the samples that mix are touched: CutMix pastes the box, mixup blends.
        pasting = torch.nonzero(use_cutmix & present).flatten()
        blending = torch.nonzero(~use_cutmix & present).flatten()
        mixed = x.clone()
        if len(pasting):
            source = x[partner[pasting].to(device)]
            box = inside[pasting].to(device)[:, None]
            mixed[pasting.to(device)] = torch.where(box, source, x[pasting.to(device)])
        if len(blending):
            weight = lam[blending].to(device).view(-1, 1, 1, 1)
            here, there = blending.to(device), partner[blending].to(device)
            mixed[here] = weight * x[here] + (1 - weight) * x[there]
        partner, lam = partner.to(device), lam.to(device)
        return mixed, lam.view(-1, 1) * targets + (1 - lam.view(-1, 1)) * targets[partner]
