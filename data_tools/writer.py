"""Writing one shard atomically, shared by make_shards and make_demo.

A shard is written under a temporary name in the output folder, flushed and fsynced, then renamed
to `NAME-NNNNNN.tar`: a reader (or a re-run) never sees a half-written tar under its final name.
Members follow the WebDataset layout: `KEY.jpg`, `KEY.cls` (the integer label as text) and
optionally `KEY.json`, written with webdataset's own `TarWriter`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from coatnet_scale.data.shards import ShardInfo, TarIndex
from coatnet_scale.files import sha256_file


@dataclass(frozen=True)
class SourceSample:
    """One image to store: its key, label, and either a file path or encoded bytes."""

    key: str
    label: int
    source: str | bytes
    meta: dict | None = None


@dataclass(frozen=True)
class ShardJob:
    path: str
    samples: tuple[SourceSample, ...]
    resize_shorter: int = 0  # 0: store the original bytes
    quality: int = 90


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    skipped: tuple[tuple[str, str], ...]  # (key, reason) of samples that could not be stored
    reused: bool


def encode_image(source: str | bytes, resize_shorter: int, quality: int) -> tuple[bytes, str]:
    """The bytes to store and their extension. Without resizing, JPEGs are stored untouched."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not resize_shorter:
        img = Image.open(io.BytesIO(raw))
        if img.format == "JPEG":
            return raw, "jpg"
    img = Image.open(io.BytesIO(raw))
    img.load()
    img = img.convert("RGB")
    short = min(img.size)
    if resize_shorter and short > resize_shorter:
        scale = resize_shorter / short
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img.draft("RGB", size)
        img = img.resize(size, Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg"


def write_shard(job: ShardJob) -> ShardResult:
    """Write one shard (or reuse a finished one with the expected sample count)."""
    final = Path(job.path)
    if final.exists():
        try:
            count = len(TarIndex(final))
        except Exception:
            count = -1
        if count >= 0:
            info = ShardInfo(str(final), count, final.stat().st_size, sha256_file(final))
            return ShardResult(info, (), reused=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    skipped: list[tuple[str, str]] = []
    written = 0
    try:
        writer = wds.TarWriter(str(tmp))
        for sample in job.samples:
            try:
                data, ext = encode_image(sample.source, job.resize_shorter, job.quality)
            except Exception as err:
                skipped.append((sample.key, f"{err}"))
                continue
            record = {"__key__": sample.key, ext: data, "cls": str(sample.label).encode()}
            if sample.meta is not None:
                record["json"] = json.dumps(sample.meta).encode()
            writer.write(record)
            written += 1
        writer.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    info = ShardInfo(str(final), written, final.stat().st_size, sha256_file(final))
    return ShardResult(info, tuple(skipped), reused=False)
