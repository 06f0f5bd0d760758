"""Shard manifests and indexed reading of WebDataset tar shards.

A manifest is one JSON file per dataset split, written by `data_tools.make_shards`. It is a valid
`wids` shard index (`__kind__: wids-shard-index-v1`, `shardlist` of `url`/`nsamples`/`filesize`,
URLs relative to the manifest) with our extra fields: per-shard `sha256`, the class names and
totals. The pipeline takes epoch lengths and per-shard sample counts from it, so every rank knows
the whole dataset without opening a tar.

`TarIndex` gives random access to the samples of one shard. It fills a gap that `wids` leaves for
our use: wids copies local shards into a cache directory, asserts (kills the worker) on a
truncated tar or a count mismatch, and prints on every dataset creation. Here a truncated tar
keeps its readable prefix and reports the rest as missing, and a missing shard is an error the
pipeline counts per sample instead of a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np

from coatnet_scale.files import atomic_write_text

MANIFEST_KIND = "wids-shard-index-v1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # members the pipeline and the verifier accept


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its path, sample count, size in bytes and checksum (None if unknown)."""

    path: str
    nsamples: int
    filesize: int = 0
    sha256: str | None = None
    labels: tuple[tuple[int, int], ...] | None = None  # (class, count) pairs, when known


@dataclass(frozen=True)
class Manifest:
    """A dataset split: its shards in order, class names and where it was read from."""

    name: str
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...] = ()
    source: str = ""  # the manifest path or shard pattern it came from

    @property
    def total_samples(self) -> int:
        return sum(s.nsamples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.filesize for s in self.shards)

    def shard_labels(self) -> list[dict[int, int]] | None:
        """Per-shard label histograms (None unless every shard has one)."""
        if any(s.labels is None for s in self.shards):
            return None
        return [dict(s.labels) for s in self.shards]

    def fingerprint(self) -> str:
        """Identifies the sample order: shard names and counts (not their absolute location)."""
        text = json.dumps([(Path(s.path).name, s.nsamples) for s in self.shards])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_manifest(
    path: str | Path,
    name: str,
    shards: Sequence[ShardInfo],
    classes: Sequence[str],
    extra: dict | None = None,
) -> Manifest:
    """Write a wids-compatible manifest; shard URLs are stored relative to the manifest. Each
    shard's label histogram goes with it (`labels`, class -> count) when known; `extra` adds
    top-level fields (make_shards: the shuffle seed and the skipped inputs)."""
    path = Path(path)
    entries = []
    for s in shards:
        rel = os.path.relpath(s.path, path.parent)
        entry = {"url": rel, "nsamples": s.nsamples, "filesize": s.filesize, "sha256": s.sha256}
        if s.labels is not None:
            entry["labels"] = {str(c): n for c, n in s.labels}
        entries.append(entry)
    body = {
        "__kind__": MANIFEST_KIND,
        "wids_version": 1,
        "name": name,
        "shardlist": entries,
        "classes": list(classes),
        "total_samples": sum(s.nsamples for s in shards),
        "total_bytes": sum(s.filesize for s in shards),
        **(extra or {}),
    }
    atomic_write_text(path, json.dumps(body, indent=1) + "\n")
    return Manifest(name, tuple(shards), tuple(classes), str(path))


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest; shard paths are resolved relative to its folder."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shard manifest {path} does not exist; make shards with "
            "`python -m data_tools.make_shards` or `python -m data_tools.make_demo`"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"shard manifest {path} is not valid JSON: {err}") from None
    if not isinstance(body, dict) or "shardlist" not in body:
        raise ValueError(f"{path} is not a shard manifest (no 'shardlist')")
    shards = tuple(
        ShardInfo(
            str((path.parent / e["url"]).resolve()) if "://" not in e["url"] else e["url"],
            int(e["nsamples"]),
            int(e.get("filesize", 0)),
            e.get("sha256"),
            tuple(sorted((int(c), int(n)) for c, n in e["labels"].items()))
            if isinstance(e.get("labels"), dict)
            else None,
        )
        for e in body["shardlist"]
    )
    return Manifest(body.get("name", path.stem), shards, tuple(body.get("classes", ())), str(path))


def resolve_shards(spec: str) -> Manifest:
    """A manifest JSON path, or a brace pattern (`/d/train-{000000..000099}.tar`).

    A pattern has no manifest, so each tar is indexed once here to count its samples; prefer a
    manifest for large datasets.
    """
    if spec.endswith(".json"):
        return load_manifest(spec)
    paths, missing = pattern_files(spec)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of {spec} do not exist, e.g. {missing[0]}"
        )
    shards = tuple(
        ShardInfo(str(Path(p).resolve()), len(TarIndex(p)), Path(p).stat().st_size) for p in paths
    )
    return Manifest(Path(paths[0]).stem.rsplit("-", 1)[0], shards, (), spec)


def pattern_files(spec: str) -> tuple[list[str], list[str]]:
    """The files a brace pattern names, and those of them that do not exist."""
    paths = list(braceexpand.braceexpand(spec))
    return paths, [p for p in paths if not Path(p).is_file()]


def split_key(member_name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`): WebDataset keys end at the first dot of the
    base name."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class TarIndex:
    """Random access to the samples (consecutive members sharing a key) of one tar shard.

    Indexing reads only the 512-byte headers, once. What it keeps is compact (numpy arrays:
    per member its data offset, size and extension; per sample its key and first member; a few
    tens of bytes per sample), so a reader can keep the index of every shard of a large dataset;
    a sample is then one `pread` from its first member's data to its last one's end. A truncated
    or damaged tail ends the index at the last complete member (`truncated` is then True); those
    samples are simply absent.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd: int | None = None
        self.truncated = False
        keys: list[str] = []
        firsts: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        ext_codes: list[int] = []
        self.exts: list[str] = []
        codes: dict[str, int] = {}
        size = os.path.getsize(self.path)
        try:
            with tarfile.open(self.path, mode="r:") as tar:
                for member in _members(tar):
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        self.truncated = True
                        break
                    key, ext = split_key(member.name)
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        firsts.append(len(offsets))
                    if ext not in codes:
                        codes[ext] = len(self.exts)
                        self.exts.append(ext)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
                    ext_codes.append(codes[ext])
        except tarfile.ReadError:
            if not keys:
                raise
            self.truncated = True
        self.keys = np.array([k.encode() for k in keys], dtype=np.bytes_)  # 1 byte a character
        self.first_member = np.array([*firsts, len(offsets)], dtype=np.int64)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.sizes = np.array(sizes, dtype=np.int64)
        self.ext_codes = np.array(ext_codes, dtype=np.int16)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        """(key, {extension: bytes}) of the sample at `index`."""
        first, end = int(self.first_member[index]), int(self.first_member[index + 1])
        start = int(self.offsets[first])
        stop = int(self.offsets[end - 1] + self.sizes[end - 1])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, stop - start, start)
        key = self.keys[index].decode()
        if len(data) != stop - start:
            raise OSError(f"{self.path}: sample {key} is shorter than its tar headers say")
        out = {}
        for m in range(first, end):
            at = int(self.offsets[m]) - start
            out[self.exts[self.ext_codes[m]]] = data[at : at + int(self.sizes[m])]
        return key, out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _members(tar: tarfile.TarFile) -> Iterable[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except (tarfile.ReadError, EOFError, OSError) as err:
            raise tarfile.ReadError(str(err)) from err
        if member is None:
            return
        yield member
