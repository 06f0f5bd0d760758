"""Make WebDataset shards and a manifest from an ImageFolder tree or a TSV/CSV list.

    python -m data_tools.make_shards /data/imagenet/train /shards/in1k --name train \\
        --shard-samples 1000 --workers 8 --resize-shorter 512
    python -m data_tools.make_shards --list labels.tsv /shards/mine --name train

Output: OUT/NAME-000000.tar ... (`KEY.jpg`, `KEY.cls`, `KEY.json` with the source path) and
OUT/NAME.json, a manifest that coatnet_scale's pipeline, webdataset and wids all read, with each
shard's label histogram, the shuffle seed and every input that was left out.

The inputs are shuffled (seeded, `--seed`; `--no-shuffle` keeps the given order): an ImageFolder
listed class by class would otherwise give shards of one or two classes each, and batches read a
few shards at a time would hold a handful of classes. Every image is decoded completely before it
is stored, EXIF orientation applied; truncated, empty, non-image and unreadable files are skipped
and each is named with the reason, on the console and in the manifest. Each shard is written
under a temporary name and renamed when complete; re-running skips the shards already finished
(and reports their skipped inputs again).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from coatnet_scale.data.shards import write_manifest
from data_tools.writer import ShardJob, ShardResult, SourceSample, write_shard

SHOWN_SKIPS = 50  # skipped inputs printed one by one; the manifest lists them all
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class InputError(ValueError):
    """The input folder or list cannot be turned into shards."""


def scan_image_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs of an ImageFolder tree (one sub-folder per class) and class names."""
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{root} has no class sub-folders (expected ROOT/CLASS/IMAGE.jpg)")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                items.append((str(path), label))
    if not items:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return items, classes


def read_list(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs from a TSV/CSV of `path<TAB>label` rows; labels are class indices or
    names (names are numbered in sorted order). Relative paths are relative to the list file."""
    if not path.is_file():
        raise InputError(f"list file {path} does not exist")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    rows = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise InputError(f"{path}:{line_no}: expected 'path{delimiter!r}label'")
            rows.append((row[0].strip(), row[1].strip(), line_no))
    if rows and rows[0][1].lower() in ("label", "class"):
        rows = rows[1:]  # a header row
    if not rows:
        raise InputError(f"{path} lists no images")
    numeric = all(r[1].isdigit() for r in rows)
    classes = (
        [str(i) for i in range(max(int(r[1]) for r in rows) + 1)]
        if numeric
        else sorted({r[1] for r in rows})
    )
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for image, label, _ in rows:
        full = Path(image) if Path(image).is_absolute() else path.parent / image
        items.append((str(full), int(label) if numeric else index[label]))
    return items, classes


def plan_shards(
    items: Sequence[tuple[str, int]], shard_samples: int, shard_bytes: int
) -> Iterator[list[int]]:
    """Item indices per shard: fixed sample counts, or source bytes up to a target size."""
    if shard_bytes:
        current, size = [], 0
        for i, (path, _) in enumerate(items):
            nbytes = Path(path).stat().st_size if Path(path).exists() else 0
            if current and size + nbytes > shard_bytes:
                yield current
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            yield current
    else:
        for start in range(0, len(items), shard_samples):
            yield list(range(start, min(start + shard_samples, len(items))))


def make_shards(
    items: Sequence[tuple[str, int]],
    classes: Sequence[str],
    out_dir: Path,
    name: str,
    shard_samples: int = 1000,
    shard_bytes: int = 0,
    workers: int = 1,
    resize_shorter: int = 0,
    quality: int = 90,
    with_json: bool = True,
    progress: bool = True,
    shuffle_seed: int | None = 0,
) -> tuple[list[ShardResult], Path]:
    """Write all shards (in parallel) and the manifest; returns the results and manifest path.
    `shuffle_seed` None keeps the order of `items`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(items[0][0]).parent.parent if items else out_dir
    if shuffle_seed is not None:
        items = list(items)
        random.Random(shuffle_seed).shuffle(items)
    jobs = []
    for shard_index, members in enumerate(plan_shards(items, shard_samples, shard_bytes)):
        samples = tuple(
            SourceSample(
                key=f"{i:09d}",
                label=items[i][1],
                source=items[i][0],
                meta={"path": _relative(items[i][0], root), "class": classes[items[i][1]]}
                if with_json
                else None,
            )
            for i in members
        )
        path = out_dir / f"{name}-{shard_index:06d}.tar"
        jobs.append(ShardJob(str(path), samples, resize_shorter, quality))
    results: list[ShardResult] = []
    bar = tqdm(total=len(items), unit="img", desc=name, disable=not progress)
    with Pool(workers) if workers > 1 else _InProcess() as pool:
        for result in pool.imap(write_shard, jobs):
            results.append(result)
            bar.update(len(jobs[len(results) - 1].samples))
    bar.close()
    manifest_path = out_dir / f"{name}.json"
    skipped = [
        {"source": source, "reason": reason} for r in results for source, reason in r.skipped
    ]
    extra = {"shuffle_seed": shuffle_seed, "skipped": skipped}
    write_manifest(manifest_path, name, [r.info for r in results], classes, extra)
    return results, manifest_path


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


class _InProcess:
    """Stands in for a Pool when workers=1 (no process start-up, easier debugging)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, fn, jobs):
        return map(fn, jobs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="ImageFolder root (CLASS/IMAGE files)")
    parser.add_argument("out_dir", help="output folder for the shards and the manifest")
    parser.add_argument("--list", type=Path, help="TSV/CSV of path,label rows instead of a folder")
    parser.add_argument("--name", default="train", help="shard name prefix (default: train)")
    parser.add_argument("--shard-samples", type=int, default=1000, help="samples per shard")
    parser.add_argument(
        "--shard-bytes",
        type=float,
        default=0,
        help="target shard size in bytes of source images (overrides samples)",
    )
    parser.add_argument("--workers", type=int, default=1, help="writer processes")
    parser.add_argument(
        "--resize-shorter",
        type=int,
        default=0,
        help="re-encode with the shorter side at most this (0: keep originals)",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    parser.add_argument("--no-json", action="store_true", help="do not store KEY.json metadata")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input shuffle")
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep the input order (class-sorted shards!)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.list is not None:
            if args.source is not None:
                parser.error("give either a source folder or --list, not both")
            items, classes = read_list(args.list)
        elif args.source is None:
            parser.error("give a source folder or --list FILE")
        else:
            items, classes = scan_image_folder(Path(args.source))
        if args.shard_samples < 1 or args.workers < 1:
            raise InputError("--shard-samples and --workers must be >= 1")
        results, manifest = make_shards(
            items,
            classes,
            Path(args.out_dir),
            args.name,
            args.shard_samples,
            int(args.shard_bytes),
            args.workers,
            args.resize_shorter,
            args.quality,
            not args.no_json,
            not args.quiet,
            None if args.no_shuffle else args.seed,
        )
    except (InputError, OSError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    skipped = [s for r in results for s in r.skipped]
    reused = sum(r.reused for r in results)
    total = sum(r.info.nsamples for r in results)
    print(
        f"{len(results)} shards ({reused} already finished), {total} samples, "
        f"{len(classes)} classes -> {manifest}"
    )
    for source, reason in skipped[:SHOWN_SKIPS]:
        print(f"skipped {source}: {reason}", file=sys.stderr)
    if skipped:
        more = f" (the first {SHOWN_SKIPS} above)" if len(skipped) > SHOWN_SKIPS else ""
        print(
            f"{len(skipped)} source images could not be read and were skipped{more}; every one "
            f"is listed under 'skipped' in {manifest}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
