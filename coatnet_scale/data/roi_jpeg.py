"""Decode only the part of a JPEG a crop keeps (region of interest), at a reduced DCT scale.

TF's `decode_and_crop_jpeg` and DALI's ROI decoders do this; Pillow cannot (its draft mode scales
the DCT but decodes every pixel). `_roi_jpeg.c` calls libjpeg-turbo directly: rows above and below
the crop are skipped (`jpeg_skip_scanlines`) and columns outside it too, to the iMCU boundary
(`jpeg_crop_scanline`), so their inverse DCT, upsampling and colour conversion are never done.
Entropy decoding still reads the whole scan (JPEG has no random access to the coefficients).

The scale is Pillow's draft rule (the largest 1/2, 1/4, 1/8 that keeps the crop at least the
output size), so the pixels that are decoded equal Pillow's draft decode; only what is outside the
crop is left out. Built from C against the system libjpeg (setup.py); where it was not built
(no libjpeg headers), `AVAILABLE` is False and decoding stays with Pillow.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

try:
    from coatnet_scale.data import _roi_jpeg
except ImportError:  # built optionally: no libjpeg headers where this was installed
    _roi_jpeg = None

AVAILABLE = _roi_jpeg is not None
Box = tuple[float, float, float, float]


def draft_scale(width: int, height: int, box: Box, out: int) -> int:
    """The DCT scale denominator (1, 2, 4, 8) Pillow's `draft` picks for a crop `box` of a
    width x height image that is to be resized to out x out: the largest that leaves the crop at
    least `out` pixels on each side."""
    need_w = math.ceil(width * out / (box[2] - box[0]))
    need_h = math.ceil(height * out / (box[3] - box[1]))
    ratio = min(width // need_w, height // need_h)
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


EOI = b"\xff\xd9"  # JPEG's end-of-image marker
TRAILING_BYTES = 4096  # what some writers append after it


def check_complete(data: bytes) -> None:
    """ValueError unless the file ends with JPEG's end-of-image marker (allowing a few KiB of
    trailing bytes). The region decoder stops at the crop's last row, so a file cut below the crop
    would otherwise decode for some slots and be bad for others; Pillow's full decode refuses a
    truncated file, and so does this check, for every crop. Damage that keeps the marker but
    corrupts the scan below the crop goes unnoticed, as it changes none of the decoded pixels."""
    if data.rfind(EOI, max(0, len(data) - TRAILING_BYTES)) < 0:
        raise ValueError("truncated: no end-of-image marker")


def decode_crop(
    data: bytes, width: int, height: int, box: Box, out: int
) -> tuple[Image.Image, Box] | None:
    """The region of the JPEG `data` that covers `box` (full-image pixels), decoded at Pillow's
    draft scale, as an RGB image, and the box in its pixels; None where libjpeg cannot give RGB
    (CMYK). Raises ValueError for bytes libjpeg cannot decode, and for a truncated file whatever
    the crop (`check_complete`)."""
    check_complete(data)
    scale = draft_scale(width, height, box, out)
    # libjpeg's scaled size rounds up: 500 px at 1/8 is 63 px for 62.5 px of image
    full_w, full_h = -(-width // scale), -(-height // scale)
    # A margin around the box: the resize reads up to 2 (bicubic's support) output pixels'
    # worth of source pixels beyond the box, and with chroma subsampling the first and last
    # column of a cropped region are upsampled without their outer neighbour. With it, every
    # pixel the resize reads is what a full decode at this scale gives.
    margin_x = math.ceil(2 * max(1.0, (box[2] - box[0]) / scale / out)) + 1
    margin_y = math.ceil(2 * max(1.0, (box[3] - box[1]) / scale / out)) + 1
    x0, y0 = (
        max(0, math.floor(box[0] / scale) - margin_x),
        max(0, math.floor(box[1] / scale) - margin_y),
    )
    x1 = min(full_w, math.ceil(box[2] / scale) + margin_x)
    y1 = min(full_h, math.ceil(box[3] / scale) + margin_y)
    decoded = _roi_jpeg.decode(data, scale, x0, y0, x1, y1)
    if decoded is None:
        return None
    pixels, x_offset, region_w = decoded
    rows = np.frombuffer(pixels, dtype=np.uint8).reshape(y1 - y0, region_w, 3)
    region = Image.fromarray(rows, "RGB")
    # the box in the region's pixels, kept inside the image's true extent (as decode_region does)
    local = (
        max(0.0, box[0] / scale) - x_offset,
        max(0.0, box[1] / scale) - y0,
        min(width / scale, box[2] / scale) - x_offset,
        min(height / scale, box[3] / scale) - y0,
    )
    return region, local
