"""Reading samples from the shards for the loaders, and what counts as a bad sample.

A bad sample is bad *data*: a missing or unreadable shard, a truncated tar, a sample without an
image or a label, a label that is not an integer, bytes that do not decode as an image. It is
counted, named (shard, key, source path, reason) and replaced in its batch (pipeline.py). Any
other exception (our crop arithmetic, an augmentation) is a bug: it propagates and the run stops
with a traceback pointing at the code, instead of reporting clean data as damaged.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from coatnet_scale.data.shards import IMAGE_EXTS, Manifest, TarIndex
from coatnet_scale.data.transforms import UndecodableImage


class BadData(ValueError):
    """A sample whose stored data cannot be used (see the module docstring)."""


# everything a sample's read, parse and decode raise for bad data
DATA_ERRORS = (BadData, UndecodableImage)


INDEX_BYTES_PER_SAMPLE = 80  # a TarIndex of key + image/label/json members (bench/data_order.py)
INDEX_BUDGET = 256 * 2**20  # shard indexes a reader keeps, in bytes (about 3.4M samples)


class ShardReader:
    """Reads sample i of a source. A shard's index is built when the shard is first read (one
    pass over its tar headers) and kept while the indexes fit `index_budget` bytes (ImageNet's
    1.28M samples take ~100 MB; None: all of them, for a global order, which touches every
    shard all the time), least recently used first out beyond that: a window order touches
    every shard once per epoch. Open files follow their own LRU."""

    def __init__(
        self,
        manifests: Sequence[Manifest],
        index_budget: int | None = INDEX_BUDGET,
        open_files: int = 16,
    ) -> None:
        self.manifests = list(manifests)
        self.bounds = [np.cumsum([s.nsamples for s in m.shards]) for m in manifests]
        shards = [s.nsamples for m in manifests for s in m.shards]
        mean = max(1.0, sum(shards) / max(1, len(shards)))
        if index_budget is None:  # keep them all
            self.cached_shards = max(16, len(shards))
        else:
            self.cached_shards = max(16, int(index_budget / (INDEX_BYTES_PER_SAMPLE * mean)))
        self.open_files = open_files
        self._indexes: OrderedDict[str, TarIndex | BadData] = OrderedDict()
        self._open: OrderedDict[str, TarIndex] = OrderedDict()

    def where(self, source: int, index: int) -> tuple[str, int]:
        """(shard path, sample index within it) of sample `index` of `source`."""
        bounds = self.bounds[source]
        shard = int(np.searchsorted(bounds, index, side="right"))
        inner = index - (int(bounds[shard - 1]) if shard else 0)
        return self.manifests[source].shards[shard].path, inner

    def read(self, source: int, index: int) -> tuple[str, dict[str, bytes]]:
        """(key, {extension: bytes}); BadData for a missing shard or a truncated tar."""
        path, inner = self.where(source, index)
        tar = self._index(path)
        if isinstance(tar, BadData):
            raise tar
        if inner >= len(tar):
            raise BadData(f"the shard holds {len(tar)} samples, the manifest more (truncated?)")
        self._open[path] = tar
        self._open.move_to_end(path)
        if len(self._open) > self.open_files:
            _, old = self._open.popitem(last=False)
            old.close()
        try:
            return tar.read(inner)
        except OSError as err:
            raise BadData(f"cannot read the sample: {err}") from None

    def _index(self, path: str) -> TarIndex | BadData:
        if path in self._indexes:
            self._indexes.move_to_end(path)
            return self._indexes[path]
        try:
            tar: TarIndex | BadData = TarIndex(path)
        except (OSError, tarfile.TarError) as err:  # missing, unreadable, not a tar: bad data
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            tar = BadData(f"cannot open the shard: {reason}")
        self._indexes[path] = tar
        if len(self._indexes) > self.cached_shards:
            _, old = self._indexes.popitem(last=False)
            if isinstance(old, TarIndex):
                old.close()
                self._open.pop(old.path, None)
        return tar


def image_and_label(data: dict[str, bytes]) -> tuple[bytes, int]:
    """The encoded image and integer label of a sample; BadData naming what is missing."""
    image = next((data[ext] for ext in IMAGE_EXTS if ext in data), None)
    if image is None:
        raise BadData(f"no image member ({', '.join(IMAGE_EXTS)})")
    if "cls" not in data:
        raise BadData("no .cls member (missing label)")
    try:
        return image, int(data["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise BadData(f"the label {data['cls'][:20]!r} is not an integer") from None


def source_path(data: dict[str, bytes] | None) -> str | None:
    """The original file of a sample, from its KEY.json (`make_shards` writes it), if readable."""
    try:
        return str(json.loads(data["json"])["path"]) if data and "json" in data else None
    except (ValueError, KeyError, TypeError):
        return None


def describe_bad(
    shard: str, inner: int, key: str | None, data: dict[str, bytes] | None, error: Exception
) -> str:
    """One line naming a bad sample: shard file, key (or index), source path, reason."""
    where = f"{Path(shard).name} {key if key else f'sample #{inner}'}"
    origin = source_path(data)
    return f"{where}{f' ({origin})' if origin else ''}: {error}"


def sample_shard_labels(
    manifest: Manifest, count: int = 16, seed: int = 0
) -> list[dict[int, int]] | None:
    """Label histograms of `count` randomly chosen shards (their .cls members), for a manifest
    that has none; None when they cannot be read (a missing shard is the loader's to report)."""
    chosen = np.random.default_rng(seed).permutation(len(manifest.shards))[:count]
    histograms = []
    for index in sorted(chosen):
        try:
            tar = TarIndex(manifest.shards[index].path)
            labels: dict[int, int] = {}
            for i in range(len(tar)):
                label = int(tar.read(i)[1]["cls"])
                labels[label] = labels.get(label, 0) + 1
            tar.close()
        except (OSError, tarfile.TarError, KeyError, ValueError):
            # unreadable or unlabelled: no estimate; the loader reports the shard
            return None
        histograms.append(labels)
    return histograms
