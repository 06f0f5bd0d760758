"""JPEG decoding on the training device (`data.decode=gpu`, or `auto` on CUDA devices).

Why nvJPEG through torchvision's batched `decode_jpeg(list, device="cuda")`: torchvision is
already a dependency (no DALI or nvImageCodec wheel to match to the CUDA version), it decodes a
whole micro-batch in one call (the hardware JPEG decoder on A100/H100 where present), and the
tensors it returns feed `resized_crop` on the device directly. DALI would also move the reading and
the crop; it would replace this pipeline rather than feed it.

The workers still read the shards, draw each slot's crop window exactly as the CPU path does
(`transforms.crop_for_device`: same seed, same draws) and hand over the encoded bytes with the
window; everything after that (decode, crop, resize, then `BatchAugment`) runs on the device. The
sample order, slot seeds and windows are the CPU path's; the pixels differ by the resampling
(antialiased bilinear on tensors against Pillow's) and the decoder's rounding.

Bytes the device decoder refuses are bad data, as on the CPU path: the batch is decoded again one
image at a time and the refused ones are marked invalid (a copy of a good row takes their place).
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from coatnet_scale.data.transforms import EncodedCrop


def resolve(choice: str, device: torch.device, note=print) -> bool:
    """Whether to decode on the device: `gpu`, or `auto` on a CUDA device whose torchvision
    decodes JPEGs there (a build without nvJPEG would otherwise turn every sample into bad data:
    `auto` then decodes on the CPU and says so, `gpu` is an error)."""
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise ValueError(f"data.decode=gpu needs a CUDA device; this rank trains on {device}")
    problem = _cannot_decode_on(device)
    if problem is None:
        return True
    if choice == "gpu":
        raise ValueError(f"data.decode=gpu: torchvision cannot decode JPEGs on {device}: {problem}")
    note(f"data.decode=auto: decoding on the CPU workers, {device} cannot ({problem})")
    return False


def _cannot_decode_on(device: torch.device) -> str | None:
    """None if torchvision decodes a small JPEG on `device`, else why not."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, "JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, NotImplementedError) as err:
        return str(err).splitlines()[0][:200]
    return None


def _crop(image: torch.Tensor, crop: EncodedCrop, size: int) -> torch.Tensor:
    left, top, right, bottom = (int(round(v)) for v in crop.box)
    out = TF.resized_crop(
        image, top, left, bottom - top, right - left, [size, size], antialias=True
    )
    return out.to(torch.uint8)


def decode_batch(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images on `device`, its encoded rows decoded and cropped there; returns the
    images and the valid mask (rows whose bytes did not decode are invalid copies of a good one)."""
    images = batch["image"].to(device, non_blocking=True)
    valid = batch["valid"].clone()
    encoded: list[tuple[int, EncodedCrop]] = batch.get("encoded", [])
    if not encoded:
        return images, valid.to(device, non_blocking=True)
    size = images.shape[-1]
    datas = [torch.frombuffer(bytearray(crop.data), dtype=torch.uint8) for _, crop in encoded]
    try:
        decoded: list[torch.Tensor | None] = list(
            decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        )
    except RuntimeError:  # one bad image fails the batched call: find which, one by one
        decoded = []
        for data in datas:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    good = None
    for (row, crop), image in zip(encoded, decoded, strict=True):
        if image is None:
            valid[row] = False
            continue
        images[row] = _crop(image, crop, size)
        good = row if good is None else good
    if good is not None:
        for row in torch.nonzero(~valid).flatten().tolist():
            images[row] = images[good]
    return images, valid.to(device, non_blocking=True)
