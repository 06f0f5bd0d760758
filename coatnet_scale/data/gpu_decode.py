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
from torchvision.transforms import InterpolationMode
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


def _crop(
    image: torch.Tensor, crop: EncodedCrop, size: int, mode: InterpolationMode
) -> torch.Tensor:
    left, top, right, bottom = (int(round(v)) for v in crop.box)
    out = TF.resized_crop(
        image, top, left, bottom - top, right - left, [size, size], mode, antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8) if out.is_floating_point() else out


def _decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG decoded on `device`, or the decoder's message for one it refuses. Out of memory
    and other errors that are not about the bytes propagate (they are not bad data)."""
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # one bad image fails the batched call: find which, one by one
        pass
    decoded: list[torch.Tensor | str] = []
    for data in datas:
        try:
            decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as err:
            decoded.append(str(err).splitlines()[0][:200])
    return decoded


def decode_batch(
    batch: dict, device: torch.device, interpolation: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The batch's images on `device` with its encoded rows decoded, cropped and resized there
    (`interpolation` as `data.train_interpolation`, antialiased); returns images, the valid mask
    and labels (host tensors: a refused row becomes a copy, image and label, of the first good
    row, flagged invalid, as the workers fill bad rows) and a line naming each refused sample."""
    valid, labels = batch["valid"].clone(), batch["label"].clone()
    encoded: list[tuple[int, EncodedCrop]] = batch.get("encoded", [])
    if not encoded:
        return batch["image"].to(device, non_blocking=True), valid, labels, []
    # "image" holds only the rows the workers decoded (PNG, CMYK), in row order
    size = batch["image"].shape[-1]
    images = torch.zeros((len(valid), 3, size, size), dtype=torch.uint8, device=device)
    on_device = {row for row, _ in encoded}
    worker_rows = [row for row in range(len(valid)) if row not in on_device]
    if worker_rows:
        rows = torch.tensor(worker_rows, device=device)
        images[rows] = batch["image"].to(device, non_blocking=True)
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    datas = [torch.frombuffer(bytearray(crop.data), dtype=torch.uint8) for _, crop in encoded]
    refused = []
    for (row, crop), image in zip(encoded, _decode(datas, device), strict=True):
        if isinstance(image, str):
            valid[row] = False
            refused.append(f"{batch['key'][row]}: the device's JPEG decoder refused it ({image})")
        else:
            images[row] = _crop(image, crop, size, mode)
    if refused:
        good = torch.nonzero(valid).flatten()
        for row in torch.nonzero(~valid).flatten().tolist():
            if len(good):
                images[row], labels[row] = images[int(good[0])], labels[int(good[0])]
    return images, valid, labels, refused
