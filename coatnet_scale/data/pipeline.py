"""Training and evaluation input pipelines over WebDataset shards, resumable and elastic.

The guarantee (exact mode)
--------------------------
The run reads an infinite sequence of *slots* 0, 1, 2, ...; slot s holds one sample, and what it
holds is a pure function of (seed, manifests, weights, s), independent of the number of ranks and
loader workers. Optimizer step k (counting from the start of the run) consumes slots
[k*G, (k+1)*G) where G is the global batch: rank r takes the contiguous slice
[k*G + r*G/W, k*G + (r+1)*G/W), cut into micro-batches for gradient accumulation. The position is
therefore one number, the slots consumed (`samples_consumed`), and after a resume the run continues
with slot `samples_consumed`, whatever W, the micro-batch or the worker count now are: within each
epoch of each source no sample is repeated and none is skipped. Every rank yields the same number
of batches whatever the shard sizes (slots, not shards, are split), so no rank waits at a
collective for another that ran out of data.

Which sample a slot holds: with one source, slot s is position s mod N of epoch s // N of that
source. An epoch's order is a shard-window shuffle: shards are permuted by (seed, epoch), grouped
into windows of `window_shards` consecutive shards, and the samples of each window are permuted by
(seed, epoch, window). That is the randomness of a shuffle buffer spanning a few shards, but
deterministic and addressable, and a reader touches only one window's shards at a time. Several
sources are interleaved in blocks of `MIX_BLOCK` slots holding each source in proportion to its
weight (largest remainder), shuffled by (seed, block); each source then walks its own epochs.

Resampled mode draws slot s's sample uniformly with replacement (hash of seed and s): no epochs,
still resumable from the same single number.

Bad data: a missing shard, a truncated tar, an undecodable image or a missing label makes that
sample "bad": it is counted, logged (rate-limited), and its place in the batch is filled by a copy
of a good sample of the same batch with `valid` False, so batch shapes and counts never change.
The run stops with `DataError` only when the share of bad samples exceeds `max_bad_fraction`.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from coatnet_scale.config import DataConfig
from coatnet_scale.data.shards import IMAGE_EXTS, Manifest, TarIndex, resolve_shards
from coatnet_scale.data.transforms import TrainAugment, decode_eval, decode_train
from coatnet_scale.stop import STOP_SIGNALS

log = logging.getLogger("coatnet_scale.data")

MIX_BLOCK = 1000  # slots per interleaving block when several sources are mixed
WINDOW_SHARDS = 8  # shards whose samples are shuffled together
MIN_SAMPLES_BEFORE_LIMIT = 1000  # the bad-sample share is enforced after this many samples
_MASK64 = (1 << 64) - 1


class DataError(RuntimeError):
    """The input data is too damaged to go on (bad share above the configured limit)."""


def seed_for(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chain): cheap, stateless per-slot randomness."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x


def _rng(*values: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(*values))


# ---- which sample each slot holds --------------------------------------------------------------


class _EpochOrder:
    """The shard-window shuffled order of one epoch of one source."""

    def __init__(self, counts: np.ndarray, starts: np.ndarray, seed: int, source: int, epoch: int):
        self.key = (seed, source, epoch)
        self.shard_order = _rng(seed, source, epoch).permutation(len(counts))
        windows = [
            self.shard_order[i : i + WINDOW_SHARDS] for i in range(0, len(counts), WINDOW_SHARDS)
        ]
        self.windows = windows
        self.window_ends = np.cumsum([counts[w].sum() for w in windows])
        self.counts, self.starts = counts, starts
        self._window_cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def sample(self, offset: int) -> int:
        w = int(np.searchsorted(self.window_ends, offset, side="right"))
        inner = offset - (int(self.window_ends[w - 1]) if w else 0)
        return int(self._window(w)[inner])

    def _window(self, w: int) -> np.ndarray:
        if w not in self._window_cache:
            members = np.concatenate(
                [
                    np.arange(self.starts[s], self.starts[s] + self.counts[s])
                    for s in self.windows[w]
                ]
            )
            self._window_cache[w] = members[_rng(*self.key, w).permutation(len(members))]
            if len(self._window_cache) > 4:
                self._window_cache.popitem(last=False)
        return self._window_cache[w]


class SampleOrder:
    """Maps a slot of the run to (source, sample index within that source)."""

    def __init__(
        self,
        counts: Sequence[Sequence[int]],
        weights: Sequence[float],
        seed: int,
        mode: str = "exact",
    ) -> None:
        if mode not in ("exact", "resampled"):
            raise ValueError(f"sampling mode must be exact or resampled, not {mode!r}")
        self.counts = [np.asarray(c, dtype=np.int64) for c in counts]
        self.starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in self.counts]
        self.sizes = [int(c.sum()) for c in self.counts]
        if any(size == 0 for size in self.sizes):
            raise ValueError("a data source has no samples")
        self.seed, self.mode = seed, mode
        if len(weights) != len(self.counts) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per source, got {list(weights)}")
        # Slots per block for each source: largest-remainder rounding of MIX_BLOCK * weight.
        quotas = [MIX_BLOCK * w / sum(weights) for w in weights]
        per_block = [int(q) for q in quotas]
        shortfall = MIX_BLOCK - sum(per_block)
        by_remainder = sorted(range(len(quotas)), key=lambda i: per_block[i] - quotas[i])
        for i in by_remainder[:shortfall]:
            per_block[i] += 1
        self.per_block = per_block
        self._epochs: OrderedDict[tuple[int, int], _EpochOrder] = OrderedDict()

    @lru_cache(maxsize=8)  # noqa: B019  (one small cache per order object, lives as long)
    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of every slot of a block, and each slot's rank among its source's slots."""
        sources = np.repeat(np.arange(len(self.per_block)), self.per_block)
        sources = sources[_rng(self.seed, 0xB10C, block).permutation(MIX_BLOCK)]
        ranks = np.zeros(MIX_BLOCK, dtype=np.int64)
        for i in range(len(self.per_block)):
            mask = sources == i
            ranks[mask] = np.arange(mask.sum())
        return sources, ranks

    def source_position(self, slot: int) -> tuple[int, int]:
        """(source, how many earlier slots of the run went to that source)."""
        if len(self.per_block) == 1:
            return 0, slot
        block, inner = divmod(slot, MIX_BLOCK)
        sources, ranks = self._block(block)
        source = int(sources[inner])
        return source, block * self.per_block[source] + int(ranks[inner])

    def locate(self, slot: int) -> tuple[int, int]:
        """(source, sample index within the source's concatenated shards) held by `slot`."""
        source, position = self.source_position(slot)
        if self.mode == "resampled":
            return source, seed_for(self.seed, 0x5A3D, slot) % self.sizes[source]
        epoch, offset = divmod(position, self.sizes[source])
        return source, self._epoch(source, epoch).sample(offset)

    def epoch_of(self, slot: int, source: int = 0) -> tuple[int, int]:
        """(epoch, samples into that epoch) of `source` once `slot` slots are consumed."""
        if len(self.per_block) == 1:
            return divmod(slot, self.sizes[0])
        block, inner = divmod(slot, MIX_BLOCK)
        done = block * self.per_block[source]
        if inner:
            sources, _ = self._block(block)
            done += int((sources[:inner] == source).sum())
        return divmod(done, self.sizes[source])

    def _epoch(self, source: int, epoch: int) -> _EpochOrder:
        key = (source, epoch)
        if key not in self._epochs:
            self._epochs[key] = _EpochOrder(
                self.counts[source], self.starts[source], self.seed, source, epoch
            )
            if len(self._epochs) > 2 * len(self.counts):
                self._epochs.popitem(last=False)
        return self._epochs[key]


# ---- reading samples -------------------------------------------------------------------------


class ShardReader:
    """Reads sample i of a source through an LRU of open shard indexes; failures are cached."""

    def __init__(self, manifests: Sequence[Manifest], open_shards: int = 16) -> None:
        self.manifests = list(manifests)
        self.bounds = [np.cumsum([s.nsamples for s in m.shards]) for m in manifests]
        self.open_shards = open_shards
        self._open: OrderedDict[str, TarIndex | Exception] = OrderedDict()

    def read(self, source: int, index: int) -> tuple[str, dict[str, bytes]]:
        bounds = self.bounds[source]
        shard = int(np.searchsorted(bounds, index, side="right"))
        inner = index - (int(bounds[shard - 1]) if shard else 0)
        path = self.manifests[source].shards[shard].path
        tar = self._shard(path)
        if isinstance(tar, Exception):
            raise tar
        if inner >= len(tar):
            raise IndexError(f"{path} holds {len(tar)} samples, the manifest more (truncated?)")
        return tar.read(inner)

    def _shard(self, path: str) -> TarIndex | Exception:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        try:
            tar: TarIndex | Exception = TarIndex(path)
        except Exception as err:
            tar = OSError(f"cannot open shard {path}: {err}")
        self._open[path] = tar
        if len(self._open) > self.open_shards:
            _, old = self._open.popitem(last=False)
            if isinstance(old, TarIndex):
                old.close()
        return tar


def image_and_label(key: str, data: dict[str, bytes]) -> tuple[bytes, int]:
    """The encoded image and integer label of a sample, or a KeyError/ValueError saying which
    member is missing or malformed."""
    image = next((data[ext] for ext in IMAGE_EXTS if ext in data), None)
    if image is None:
        raise KeyError(f"sample {key} has no image member ({', '.join(IMAGE_EXTS)})")
    if "cls" not in data:
        raise KeyError(f"sample {key} has no .cls member (missing label)")
    return image, int(data["cls"].decode().strip())


class _RateLimitedWarning:
    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s, self.last, self.suppressed = interval_s, -1e9, 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            extra = f" (+{self.suppressed} more since the last warning)" if self.suppressed else ""
            log.warning("%s%s", message, extra)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


def _assemble(
    items: list[tuple[str, torch.Tensor, int] | None],
    slots: Sequence[int],
    image_size: int,
    padding: int = 0,
) -> dict:
    """Stack decoded samples; bad ones (None) become copies of a good one with valid=False.

    `padding` trailing rows are fillers, not bad samples (evaluation's last batches)."""
    good = next((item for item in items if item is not None), None)
    filler = good or ("", torch.zeros(3, image_size, image_size, dtype=torch.uint8), 0)
    valid = torch.tensor([item is not None for item in items])
    rows = [item if item is not None else filler for item in items]
    return {
        "image": torch.stack([r[1] for r in rows]),
        "label": torch.tensor([r[2] for r in rows], dtype=torch.long),
        "key": [item[0] if item is not None else "" for item in items],
        "slot": torch.tensor(list(slots), dtype=torch.long),
        "valid": valid,
        "bad": int((~valid).sum()) - padding,
    }


# ---- training batches ------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's slots are cut: global batch G over W ranks, micro-batches of m."""

    global_batch: int
    micro_batch: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        per_rank, rest = divmod(self.global_batch, self.world_size)
        if rest or per_rank % self.micro_batch:
            raise ValueError(
                f"global batch {self.global_batch} does not split into {self.world_size} ranks x "
                f"micro-batches of {self.micro_batch}"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.world_size * self.micro_batch)

    def micro_slots(self, start: int, micro_index: int) -> range:
        """Slots of this rank's `micro_index`-th micro-batch after slot `start`."""
        step, a = divmod(micro_index, self.accumulation)
        first = (
            start
            + step * self.global_batch
            + self.rank * (self.global_batch // self.world_size)
            + a * self.micro_batch
        )
        return range(first, first + self.micro_batch)


class TrainStream(IterableDataset):
    """Infinite stream of this rank's micro-batches from slot `start` on; workers interleave."""

    def __init__(
        self,
        manifests: Sequence[Manifest],
        order: SampleOrder,
        plan: BatchPlan,
        start: int,
        augment: TrainAugment,
    ) -> None:
        super().__init__()
        self.manifests, self.order, self.plan, self.start = list(manifests), order, plan, start
        self.augment = augment

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.manifests)
        randaugment = self.augment.randaugment()
        warn = _RateLimitedWarning()
        micro = worker
        while True:
            slots = self.plan.micro_slots(self.start, micro)
            items = [self._sample(reader, slot, randaugment, warn) for slot in slots]
            yield _assemble(items, slots, self.augment.image_size)
            micro += workers

    def _sample(self, reader, slot, randaugment, warn):
        source, index = self.order.locate(slot)
        per_slot = seed_for(self.order.seed, 0xA06, slot)
        random.seed(per_slot)
        np.random.seed(per_slot % (1 << 32))  # timm's RandAugment picks ops with numpy
        try:
            key, data = reader.read(source, index)
            image, label = image_and_label(key, data)
            return key, decode_train(image, self.augment, randaugment), label
        except Exception as err:
            warn(f"skipping bad sample (source {source}, index {index}): {err}")
            return None


class TrainLoader:
    """A DataLoader over `TrainStream` that knows its position in the run.

    `state_dict()` after N optimizer steps' worth of micro-batches is the resumable position
    (see the module docstring); `load_state_dict` before iterating continues from it, on any
    number of ranks or workers.
    """

    def __init__(
        self,
        manifests: Sequence[Manifest],
        weights: Sequence[float],
        seed: int,
        mode: str,
        plan: BatchPlan,
        augment: TrainAugment,
        num_workers: int,
        max_bad_fraction: float,
    ) -> None:
        self.manifests, self.plan, self.seed, self.mode = list(manifests), plan, seed, mode
        self.augment, self.num_workers = augment, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.order = SampleOrder(
            [[s.nsamples for s in m.shards] for m in manifests], weights, seed, mode
        )
        self.fingerprint = ",".join(m.fingerprint() for m in manifests) + f";{list(weights)}"
        self.start = 0
        self.micro_batches_consumed = 0
        self.samples_seen = 0
        self.bad_samples = 0

    @property
    def samples_consumed(self) -> int:
        """Slots consumed by completed optimizer steps (all ranks together)."""
        steps = self.micro_batches_consumed // self.plan.accumulation
        return self.start + steps * self.plan.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the (first) source, from its manifest."""
        return max(1, self.manifests[0].total_samples // self.plan.global_batch)

    def state_dict(self) -> dict:
        epoch, into = self.order.epoch_of(self.samples_consumed)
        return {
            "samples_consumed": self.samples_consumed,
            "epoch": epoch,
            "samples_into_epoch": into,
            "seed": self.seed,
            "mode": self.mode,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["mode"] != self.mode:
            raise ValueError(
                f"data position was saved with seed {state['seed']} / {state['mode']} sampling, "
                f"this run uses seed {self.seed} / {self.mode}"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "the training data changed since the checkpoint (shard list, counts or weights): "
                "an exact resume is impossible; restore the data or start a new run"
            )
        self.start = int(state["samples_consumed"])
        self.micro_batches_consumed = 0

    def __iter__(self) -> Iterator[dict]:
        stream = TrainStream(self.manifests, self.order, self.plan, self.start, self.augment)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
            generator=_own_generator(),
            worker_init_fn=_ignore_stop_signals,
        )
        self.start = self.samples_consumed
        self.micro_batches_consumed = 0
        for batch in loader:
            self._account(batch)
            # Counted when handed out: once the consumer has taken a step's last micro-batch and
            # finished that step, the position includes it.
            self.micro_batches_consumed += 1
            yield batch

    def _account(self, batch: dict) -> None:
        self.samples_seen += len(batch["valid"])
        self.bad_samples += batch["bad"]
        every_sample_bad = self.bad_samples == self.samples_seen >= 2 * self.plan.micro_batch
        over_limit = (
            self.samples_seen >= MIN_SAMPLES_BEFORE_LIMIT
            and self.bad_samples > self.max_bad_fraction * self.samples_seen
        )
        if every_sample_bad or over_limit:
            raise DataError(
                f"{self.bad_samples} of {self.samples_seen} samples could not be read "
                f"(limit data.max_bad_fraction={self.max_bad_fraction}); check the shards with "
                "`python -m data_tools.verify_shards MANIFEST`"
            )


# ---- evaluation batches ----------------------------------------------------------------------


class EvalStream(IterableDataset):
    """Each validation sample exactly once over all ranks; every rank yields the same number of
    batches, the last ones padded with `valid=False` rows."""

    def __init__(
        self,
        manifest: Manifest,
        micro_batch: int,
        rank: int,
        world_size: int,
        image_size: int,
        crop_pct: float,
    ) -> None:
        super().__init__()
        self.manifest, self.micro_batch = manifest, micro_batch
        total = manifest.total_samples
        self.first = rank * total // world_size
        self.last = (rank + 1) * total // world_size
        per_rank_max = -(-total // world_size)
        self.num_batches = -(-per_rank_max // micro_batch)
        self.image_size, self.crop_pct = image_size, crop_pct

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader([self.manifest])
        warn = _RateLimitedWarning()
        for b in range(worker, self.num_batches, workers):
            start = self.first + b * self.micro_batch
            slots = range(start, start + self.micro_batch)
            items = [self._sample(reader, i, warn) if i < self.last else None for i in slots]
            padding = sum(1 for i in slots if i >= self.last)
            yield _assemble(items, slots, self.image_size, padding)

    def _sample(self, reader, index, warn):
        try:
            key, data = reader.read(0, index)
            image, label = image_and_label(key, data)
            return key, decode_eval(image, self.image_size, self.crop_pct), label
        except Exception as err:
            warn(f"skipping bad validation sample {index}: {err}")
            return None


def eval_loader(
    manifest: Manifest,
    micro_batch: int,
    rank: int,
    world_size: int,
    image_size: int,
    crop_pct: float,
    num_workers: int,
) -> DataLoader:
    stream = EvalStream(manifest, micro_batch, rank, world_size, image_size, crop_pct)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=min(num_workers, len(stream)),
        pin_memory=torch.cuda.is_available(),
        generator=_own_generator(),
        worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process (`coatnet_scale.stop`): DeepSpeed's
    launcher sends SIGTERM to each rank's whole process tree, and Ctrl-C reaches the whole process
    group, but the main process still needs batches to finish its step before it checkpoints. The
    workers exit with the main process (PyTorch's worker watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from the global torch generator each time it is
    iterated, unless given its own. Our samples are seeded per slot, so that draw only perturbs
    the global stream that dropout and stochastic depth use; with a private generator, an eval
    pass or a loader restarted after a resume leaves the training randomness untouched (bitwise
    exact resume)."""
    return torch.Generator().manual_seed(0)


def load_sources(specs: Sequence[str]) -> list[Manifest]:
    """Manifests of the configured sources, with one clear error when none is configured."""
    if not specs:
        raise ValueError(
            "no training data: set data.train_shards to a shard manifest (make one with "
            "`python -m data_tools.make_shards` or `python -m data_tools.make_demo`)"
        )
    return [resolve_shards(spec) for spec in specs]


def build_train_loader(cfg: DataConfig, image_size: int, plan: BatchPlan, seed: int) -> TrainLoader:
    """The training loader of the `data` config section for this rank."""
    manifests = load_sources(cfg.train_shards)
    weights = cfg.train_weights or tuple(float(m.total_samples) for m in manifests)
    augment = TrainAugment(
        image_size,
        cfg.crop_scale_min,
        cfg.randaugment_n,
        cfg.randaugment_m,
        hflip=cfg.hflip,
        interpolation=cfg.train_interpolation,
    )
    return TrainLoader(
        manifests,
        weights,
        seed,
        cfg.sampling,
        plan,
        augment,
        cfg.num_workers,
        cfg.max_bad_fraction,
    )


def build_eval_loader(
    cfg: DataConfig, image_size: int, micro_batch: int, rank: int, world_size: int
) -> DataLoader:
    """The validation loader (every val sample once over all ranks); needs data.val_shards."""
    if not cfg.val_shards:
        raise ValueError("no validation data: set data.val_shards to a shard manifest")
    return eval_loader(
        resolve_shards(cfg.val_shards),
        micro_batch,
        rank,
        world_size,
        image_size,
        cfg.eval_crop_pct,
        cfg.num_workers,
    )
