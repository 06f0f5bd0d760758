"""Verify shards against their manifest: files, sizes, checksums, sample counts, decodable images
and labels. Prints every problem with its shard, sample key and source path (from KEY.json);
exits 1 when there is any.

    python -m data_tools.verify_shards data/demo/train.json [--sample-fraction 0.1] [--no-decode]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from coatnet_scale.data.reader import source_path
from coatnet_scale.data.shards import (
    IMAGE_EXTS,
    Manifest,
    ShardInfo,
    TarIndex,
    load_manifest,
)
from coatnet_scale.files import sha256_file


def verify_shard(
    shard: ShardInfo, num_classes: int, fraction: float, decode: bool, rng: random.Random
) -> list[str]:
    """Problems found in one shard, one line each."""
    name = Path(shard.path).name
    path = Path(shard.path)
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if shard.filesize and size != shard.filesize:
        problems.append(f"{name}: {size} bytes, manifest says {shard.filesize}")
    if shard.sha256 and sha256_file(path) != shard.sha256:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        index = TarIndex(path)
    except Exception as err:
        return [*problems, f"{name}: not a readable tar ({err})"]
    if index.truncated:
        problems.append(f"{name}: truncated after {len(index)} complete samples")
    if len(index) != shard.nsamples:
        problems.append(f"{name}: {len(index)} samples, manifest says {shard.nsamples}")
    for i in range(len(index)):
        if fraction < 1 and rng.random() >= fraction:
            continue
        key, members = index.read(i)
        origin = source_path(members)
        where = f"{name}: sample {key}{f' ({origin})' if origin else ''}"
        problems.extend(f"{where}: {p}" for p in check_sample(members, num_classes, decode))
    return problems


def check_sample(members: dict[str, bytes], num_classes: int, decode: bool) -> list[str]:
    problems = []
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        problems.append("no image member")
    elif decode:
        try:
            with Image.open(io.BytesIO(image)) as img:
                img.load()
        except Exception as err:
            problems.append(f"image does not decode ({err})")
    if "cls" not in members:
        problems.append("no .cls label")
    else:
        try:
            label = int(members["cls"].decode().strip())
            if num_classes and not 0 <= label < num_classes:
                problems.append(f"label {label} outside 0..{num_classes - 1}")
        except ValueError:
            problems.append(f"label {members['cls'][:20]!r} is not an integer")
    return problems


def verify(
    manifest: Manifest,
    fraction: float = 1.0,
    decode: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    rng = random.Random(seed)
    problems = []
    for shard in tqdm(manifest.shards, unit="shard", disable=not progress):
        problems.extend(verify_shard(shard, len(manifest.classes), fraction, decode, rng))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="manifest JSON written by make_shards/make_demo")
    parser.add_argument(
        "--sample-fraction",
        type=float,
        default=1.0,
        help="decode this share of samples, chosen at random (default: all)",
    )
    parser.add_argument("--no-decode", action="store_true", help="check files and counts only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
    except (OSError, ValueError) as err:
        print(f"verify_shards: error: {err}", file=sys.stderr)
        return 2
    problems = verify(manifest, args.sample_fraction, not args.no_decode, args.seed, not args.quiet)
    for line in problems:
        print(line)
    status = f"{len(problems)} problem(s)" if problems else "OK"
    print(
        f"{manifest.name}: {len(manifest.shards)} shards, {manifest.total_samples} samples: "
        f"{status}",
        file=sys.stderr,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
