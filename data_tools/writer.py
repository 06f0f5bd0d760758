"""Writing one shard atomically, shared by make_shards and make_demo.

A shard is written under a temporary name in the output folder, flushed and fsynced, then renamed
to `NAME-NNNNNN.tar`: a reader (or a re-run) never sees a half-written tar under its final name.
Members follow the WebDataset layout: `KEY.jpg`, `KEY.cls` (the integer label as text) and
optionally `KEY.json`, written with webdataset's own `TarWriter`. Only images that decode
completely are stored, so plain `webdataset(...).decode("pil")` reads every shard without an
error; each input left out is reported with its source and the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageOps

from coatnet_scale.data.shards import ShardInfo, TarIndex
from coatnet_scale.data.transforms import DECODE_ERRORS, UndecodableImage, open_image
from coatnet_scale.files import atomic_write_text, sha256_file

ORIENTATION = 0x0112  # the EXIF tag


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
    info: ShardInfo  # with the shard's label histogram
    skipped: tuple[tuple[str, str], ...]  # (source, reason) of inputs that could not be stored
    reused: bool


def _source_name(source: str | bytes, key: str) -> str:
    return source if isinstance(source, str) else f"sample {key} (bytes)"


def encode_image(source: str | bytes, resize_shorter: int, quality: int) -> tuple[bytes, str]:
    """The bytes to store and their extension, after a full decode of the input.

    Every input is decoded completely (a truncated JPEG has a valid header: opening it is not
    enough), and its EXIF orientation applied. A JPEG is stored untouched when it needs neither
    a rotation nor a resize; anything else is re-encoded as JPEG. Raises UndecodableImage (or
    OSError for an unreadable file) with a readable reason.
    """
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not raw:
        raise UndecodableImage("empty file (0 bytes)")
    img = open_image(raw)
    try:
        img.load()
    except DECODE_ERRORS as err:
        raise UndecodableImage(f"truncated or corrupt image data ({err})") from None
    try:
        rotated = img.getexif().get(ORIENTATION, 1) not in (1, None)
    except Exception:  # malformed EXIF metadata: the pixels decoded, store them as they are
        rotated = False
    if (
        img.format == "JPEG"
        and not rotated
        and not (resize_shorter and min(img.size) > resize_shorter)
    ):
        return raw, "jpg"
    if rotated:
        img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    short = min(img.size)
    if resize_shorter and short > resize_shorter:
        scale = resize_shorter / short
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg"


def sidecar(shard: Path) -> Path:
    """`NAME-000000.tar` -> `NAME-000000.info.json`: the shard's label histogram and skipped
    inputs, written before the tar is published, read back when a re-run reuses the shard."""
    return shard.with_name(shard.name.removesuffix(".tar") + ".info.json")


def job_fingerprint(job: ShardJob) -> str:
    """What a shard was written from: its samples (key, label, source) and the encoding; a
    re-run reuses a finished shard only for the same job (another seed, shard size or input
    list writes it again)."""
    digest = hashlib.sha256(f"{job.resize_shorter}/{job.quality}".encode())
    for sample in job.samples:
        source = (
            sample.source
            if isinstance(sample.source, str)
            else hashlib.sha256(sample.source).hexdigest()
        )
        digest.update(f"\n{sample.key}\t{sample.label}\t{source}".encode())
    return digest.hexdigest()[:32]


def _reuse(final: Path, job: ShardJob) -> ShardResult | None:
    """The result of a finished shard written by the same job, or None when it must be written
    (again): another job, no or a damaged sidecar, a truncated tar, a count that differs."""
    try:
        info = json.loads(sidecar(final).read_text())
        labels = Counter({int(c): n for c, n in info["labels"].items()})
        skipped = tuple((s["source"], s["reason"]) for s in info["skipped"])
        if info["job"] != job_fingerprint(job):
            return None
        tar = TarIndex(final)
    except Exception:  # missing or unreadable: write it again
        return None
    tar.close()
    if tar.truncated or len(tar) != sum(labels.values()):
        return None
    shard = ShardInfo(
        str(final),
        len(tar),
        final.stat().st_size,
        sha256_file(final),
        tuple(sorted(labels.items())),
    )
    return ShardResult(shard, skipped, reused=True)


def write_shard(job: ShardJob) -> ShardResult:
    """Write one shard (or reuse a finished one): every input decoded first, the undecodable
    ones skipped with their source and reason."""
    final = Path(job.path)
    if final.exists():
        reused = _reuse(final, job)
        if reused is not None:
            return reused
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    skipped: list[tuple[str, str]] = []
    labels: Counter = Counter()
    try:
        writer = wds.TarWriter(str(tmp))
        for sample in job.samples:
            try:
                data, ext = encode_image(sample.source, job.resize_shorter, job.quality)
            except UndecodableImage as err:
                skipped.append((_source_name(sample.source, sample.key), str(err)))
                continue
            except OSError as err:
                reason = err.strerror or str(err)
                skipped.append((_source_name(sample.source, sample.key), f"unreadable: {reason}"))
                continue
            record = {"__key__": sample.key, ext: data, "cls": str(sample.label).encode()}
            if sample.meta is not None:
                record["json"] = json.dumps(sample.meta).encode()
            writer.write(record)
            labels[sample.label] += 1
        writer.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write_text(
            sidecar(final),
            json.dumps(
                {
                    "job": job_fingerprint(job),
                    "labels": {str(c): n for c, n in sorted(labels.items())},
                    "skipped": [{"source": s, "reason": r} for s, r in skipped],
                }
            ),
        )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    info = ShardInfo(
        str(final),
        sum(labels.values()),
        final.stat().st_size,
        sha256_file(final),
        tuple(sorted(labels.items())),
    )
    return ShardResult(info, tuple(skipped), reused=False)
