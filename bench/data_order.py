"""What the epoch order costs in reads: window order vs global order, same shards, one process.

    python bench/data_order.py [--shards 96] [--per-shard 250] [--batch 64]

Writes class-sorted shards of photo-like 500x375 JPEGs (100 classes; what an ImageFolder gives
without make_shards' shuffle), then, for each order, reads the samples of the first slots the
way a loader does (`SampleOrder.locate` + `ShardReader.read`, the image bytes and label, no
decode): the first epoch (each shard's index is built when the shard is first touched) and
slots of the second (the steady state). Both with the shards in the page cache,
and evicted from it before each pass (posix_fadvise DONTNEED: the disk, or what a network
filesystem serves). Reports samples/s, the steady-state ratio global/window, the indexes kept
and their memory per sample, and the class diversity per micro-batch (distinct classes of 64
samples, vs i.i.d.). Merges into
bench/results.json under "data_order".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import cpu_name, evict, record_result
from bench.data_pipeline import photo_like
from coatnet_scale.data.order import SampleOrder, expected_distinct
from coatnet_scale.data.reader import ShardReader, image_and_label
from coatnet_scale.data.shards import Manifest, ShardInfo, write_manifest
from data_tools.writer import ShardJob, SourceSample, write_shard

CLASSES = 100


def write_sorted_shards(folder: Path, shards: int, per_shard: int) -> Manifest:
    rng = np.random.default_rng(0)
    pool = [photo_like(rng) for _ in range(32)]  # distinct content is not the point here
    total = shards * per_shard
    infos: list[ShardInfo] = []
    for s in range(shards):
        samples = tuple(
            SourceSample(f"{i:09d}", i * CLASSES // total, pool[i % len(pool)])
            for i in range(s * per_shard, (s + 1) * per_shard)
        )
        infos.append(write_shard(ShardJob(str(folder / f"train-{s:06d}.tar"), samples)).info)
    return write_manifest(folder / "train.json", "train", infos, [str(c) for c in range(CLASSES)])


def read_pass(reader: ShardReader, order: SampleOrder, first: int, samples: int, batch: int):
    start = time.perf_counter()
    labels = []
    for slot in range(first, first + samples):
        _, data = reader.read(*order.locate(slot))
        labels.append(image_and_label(data)[1])
    seconds = time.perf_counter() - start
    distinct = [len(set(labels[i : i + batch])) for i in range(0, samples - batch + 1, batch)]
    return samples / seconds, float(np.mean(distinct))


def measure(manifest: Manifest, order: str, samples: int, batch: int, cold: bool) -> dict:
    """Samples/s over the first epoch (each shard's index built when first touched) and over
    `samples` slots of the second (indexes kept: the steady state of a long run)."""
    counts = [[s.nsamples for s in manifest.shards]]
    sample_order = SampleOrder(counts, [1.0], seed=0, orders=[order], window_shards=8)
    reader = ShardReader([manifest])
    if cold:
        evict([s.path for s in manifest.shards])
    epoch = manifest.total_samples
    first, distinct = read_pass(reader, sample_order, 0, epoch, batch)
    if cold:
        evict([s.path for s in manifest.shards])
    steady, _ = read_pass(reader, sample_order, epoch, samples, batch)
    kept = [t for t in reader._indexes.values() if not isinstance(t, Exception)]
    index_bytes = sum(
        t.keys.nbytes + t.first_member.nbytes + t.offsets.nbytes + t.sizes.nbytes for t in kept
    )
    return {
        "first_epoch_per_s": round(first),
        "steady_per_s": round(steady),
        "indexes_kept": len(kept),
        "index_bytes_per_sample": round(index_bytes / max(1, sum(len(t) for t in kept)), 1),
        "distinct_classes_per_batch": round(distinct, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=96)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--samples", type=int, default=4000, help="slots read per pass")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_sorted_shards(Path(tmp), args.shards, args.per_shard)
        iid = expected_distinct(np.full(CLASSES, 1.0), args.batch)
        result: dict = {
            "date": date.today().isoformat(),
            "machine": cpu_name(),
            "setup": f"{args.shards} class-sorted shards x {args.per_shard} JPEGs (~65 kB), "
            f"{args.samples} slots per pass, reads only (no decode)",
            "iid_distinct_classes_per_batch": round(iid, 1),
        }
        for cache in ("warm", "cold"):
            for order in ("window", "global"):
                if cache == "warm":
                    measure(manifest, order, args.samples, args.batch, cold=False)  # fill it
                result[f"{cache}/{order}"] = measure(
                    manifest, order, args.samples, args.batch, cold=cache == "cold"
                )
            window, glob = result[f"{cache}/window"], result[f"{cache}/global"]
            result[f"{cache}_global_over_window_steady"] = round(
                glob["steady_per_s"] / window["steady_per_s"], 3
            )
    for key, value in result.items():
        print(f"{key}: {value}")
    record_result("data_order", result)


if __name__ == "__main__":
    main()
