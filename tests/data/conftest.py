"""Small image folders and shard sets made on the fly (no downloads)."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coatnet_scale.data.shards import write_manifest
from data_tools.make_shards import make_shards, scan_image_folder
from data_tools.writer import ShardJob, SourceSample, write_shard


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (48, 40)) -> Path:
    seed = 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(seed, size))
            seed += 1
    return root


def shard_set(tmp: Path, shard_sizes: list[int], name: str = "train") -> Path:
    """Shards with the given sample counts (labels cycle over 3 classes); returns the manifest."""
    total = sum(shard_sizes)
    folder = image_folder(tmp / f"{name}_src", {c: 0 for c in "abc"})
    items = []
    for i in range(total):
        path = folder / "abc"[i % 3] / f"img{i:04d}.jpg"
        path.write_bytes(jpeg_bytes(1000 + i))
        items.append((str(path), i % 3))
    out = tmp / f"{name}_shards"
    out.mkdir()
    infos, start = [], 0
    for index, size in enumerate(shard_sizes):
        samples = tuple(
            SourceSample(f"{name}{i:06d}", items[i][1], items[i][0])
            for i in range(start, start + size)
        )
        infos.append(write_shard(ShardJob(str(out / f"{name}-{index:06d}.tar"), samples)).info)
        start += size
    write_manifest(out / f"{name}.json", name, infos, ["a", "b", "c"])
    return out / f"{name}.json"


def debug_data(tmp: Path) -> Path:
    """One folder with train.json (shards of 20, 7 and 13 samples) and val.json (9 samples): the
    data of the short debug-model runs (tests/distributed/scenarios.py `debug_run`)."""
    data = tmp / "data"
    data.mkdir()
    for manifest in (shard_set(tmp / "t", [20, 7, 13]), shard_set(tmp / "v", [9], name="val")):
        for f in manifest.parent.iterdir():
            shutil.copy(f, data / f.name)
    return data


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return image_folder(tmp_path / "src", {"cat": 5, "dog": 4, "eel": 3})


@pytest.fixture
def shards(tmp_path: Path, folder: Path) -> Path:
    items, classes = scan_image_folder(folder)
    _, manifest = make_shards(
        items, classes, tmp_path / "out", "train", shard_samples=5, workers=1, progress=False
    )
    return manifest
