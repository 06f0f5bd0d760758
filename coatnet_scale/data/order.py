"""Which sample each slot of the run holds: pure functions of (seed, sources, weights, slot).

The guarantee
-------------
The run reads an infinite sequence of *slots* 0, 1, 2, ...; slot s holds one sample, and what it
holds is a pure function of (seed, the sources' sample counts, weights, order, s), independent of
the number of ranks and loader workers. Optimizer step k consumes slots [k*G, (k+1)*G) where G is
the global batch: rank r takes the contiguous slice [k*G + r*G/W, k*G + (r+1)*G/W), cut into
micro-batches for gradient accumulation (`BatchPlan`). The position is therefore one number, the
slots consumed, and a resume continues from it whatever W, the micro-batch or the worker count now
are: within each epoch of each source no sample is repeated and none is skipped. Any slot's sample
is computed directly, without visiting earlier slots.

Mixing sources
--------------
Slots are grouped into blocks of about `MIX_BLOCK`. Source i, of weight fraction f_i, holds
floor(b*MIX_BLOCK*f_i + u_i) of the slots of blocks 0..b-1 (u_i in [0, 1) from the seed): after n
slots its share is n*f_i within one slot, exactly n*f_i in expectation, and a positive weight never
rounds to zero (a source of fraction 1e-4 gets one slot every ten blocks). A block holds each
source's increment of that count (so blocks differ in length by a few slots), in an order shuffled
by (seed, block); each source walks its own epochs.

Epoch order of one source (`data.order`)
----------------------------------------
- `window`: shards permuted by (seed, source, epoch), grouped into windows of `window_shards`
  consecutive shards, the samples of each window permuted. Readers stay within one window's shards
  at a time (few open files, mostly sequential reads). Batches have the class mix of a window:
  the whole dataset's when the shards are shuffled (`make_shards` shuffles), a handful of classes
  when the shards are class-sorted.
- `global`: one pseudo-random permutation of all the source's samples (a keyed Feistel network,
  `Permutation`: any position in O(1), no N-entry table). The class mix of i.i.d. sampling on any
  shards, at the cost of a random read per sample.
- `auto`: `global` for a source whose label histograms (the manifest's, else those of a few
  sampled shards) show that a window's batches would hold fewer than 95% of the classes an
  i.i.d. batch holds (`class_mix`), `window` otherwise (and above `GLOBAL_AUTO_LIMIT` samples,
  where it warns instead).

`resampled` sampling draws each slot's sample uniformly with replacement (a hash of seed and slot):
no epochs, still resumable from the same single number.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from coatnet_scale.seeding import rng, seed_for

MIX_BLOCK = 1000  # slots per mixing block, about
DIVERSITY_FLOOR = 0.95  # a window order must reach this share of i.i.d. class diversity
GLOBAL_AUTO_LIMIT = 4_000_000  # samples of a source up to which `auto` may choose global


class Permutation:
    """A pseudo-random bijection of range(n) keyed by integers: `perm(i)` in O(1).

    A balanced Feistel network (6 rounds of a 64-bit hash) on the smallest even bit width that
    covers n is a permutation of [0, 2^bits); cycle walking (re-applying it until the value falls
    below n) restricts it to [0, n) and stays a bijection. 2^bits < 4n, so a walk takes fewer than
    four applications on average.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: Sequence[int]) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = tuple(seed_for(*key, r) for r in range(self.ROUNDS))

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} is outside range({self.n})")
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ (seed_for(key, right) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class WindowOrder:
    """One epoch of one source in window order (see the module docstring)."""

    def __init__(self, counts: np.ndarray, starts: np.ndarray, key: tuple[int, ...], window: int):
        self.key = key
        shard_order = rng(*key).permutation(len(counts))
        self.windows = [shard_order[i : i + window] for i in range(0, len(counts), window)]
        self.window_ends = np.cumsum([counts[w].sum() for w in self.windows])
        self.counts, self.starts = counts, starts
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, offset: int) -> int:
        w = int(np.searchsorted(self.window_ends, offset, side="right"))
        inner = offset - (int(self.window_ends[w - 1]) if w else 0)
        return int(self._window(w)[inner])

    def _window(self, w: int) -> np.ndarray:
        if w not in self._cache:
            members = np.concatenate(
                [
                    np.arange(self.starts[s], self.starts[s] + self.counts[s])
                    for s in self.windows[w]
                ]
            )
            self._cache[w] = members[rng(*self.key, w).permutation(len(members))]
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[w]


class SourceMix:
    """How the slots are shared between sources: cumulative quotas (module docstring)."""

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per source, got {list(weights)}")
        total = sum(weights)
        self.fractions = [w / total for w in weights]
        self.offsets = [(seed_for(seed, 0x0FF5E7, i) >> 11) / 2**53 for i in range(len(weights))]
        self.seed = seed

    def before(self, source: int, block: int) -> int:
        """Slots of `source` in blocks 0..block-1."""
        return math.floor(block * MIX_BLOCK * self.fractions[source] + self.offsets[source])

    def block_start(self, block: int) -> int:
        return sum(self.before(i, block) for i in range(len(self.fractions)))

    def block_of(self, slot: int) -> int:
        block = slot // MIX_BLOCK
        while block > 0 and self.block_start(block) > slot:
            block -= 1
        while self.block_start(block + 1) <= slot:
            block += 1
        return block

    @lru_cache(maxsize=8)  # noqa: B019  (one small cache per mix, lives as long)
    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of every slot of `block`, and each slot's rank among its source's slots."""
        quotas = [
            self.before(i, block + 1) - self.before(i, block) for i in range(len(self.fractions))
        ]
        sources = np.repeat(np.arange(len(quotas)), quotas)
        sources = sources[rng(self.seed, 0xB10C, block).permutation(len(sources))]
        ranks = np.zeros(len(sources), dtype=np.int64)
        for i in range(len(quotas)):
            mask = sources == i
            ranks[mask] = np.arange(mask.sum())
        return sources, ranks

    def locate(self, slot: int) -> tuple[int, int]:
        """(source, how many earlier slots of the run went to that source)."""
        if len(self.fractions) == 1:
            return 0, slot
        block = self.block_of(slot)
        sources, ranks = self.block(block)
        inner = slot - self.block_start(block)
        source = int(sources[inner])
        return source, self.before(source, block) + int(ranks[inner])

    def consumed(self, slot: int, source: int) -> int:
        """Slots of `source` among slots 0..slot-1."""
        if len(self.fractions) == 1:
            return slot
        block = self.block_of(slot)
        inner = slot - self.block_start(block)
        sources, _ = self.block(block)
        return self.before(source, block) + int((sources[:inner] == source).sum())


class SampleOrder:
    """Maps a slot of the run to (source, sample index within that source's shards)."""

    def __init__(
        self,
        counts: Sequence[Sequence[int]],
        weights: Sequence[float],
        seed: int,
        mode: str = "exact",
        orders: Sequence[str] | None = None,
        window_shards: int = 8,
    ) -> None:
        if mode not in ("exact", "resampled"):
            raise ValueError(f"sampling mode must be exact or resampled, not {mode!r}")
        self.counts = [np.asarray(c, dtype=np.int64) for c in counts]
        self.starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in self.counts]
        self.sizes = [int(c.sum()) for c in self.counts]
        if any(size == 0 for size in self.sizes):
            raise ValueError("a data source has no samples")
        if len(weights) != len(self.counts):
            raise ValueError(f"need one weight per source, got {list(weights)}")
        self.orders = tuple(orders or ["window"] * len(self.counts))
        if any(o not in ("window", "global") for o in self.orders):
            raise ValueError(f"orders must be window or global, got {self.orders}")
        self.seed, self.mode, self.window_shards = seed, mode, window_shards
        self.mix = SourceMix(weights, seed)
        self._epochs: OrderedDict[tuple[int, int], WindowOrder | Permutation] = OrderedDict()

    def source_position(self, slot: int) -> tuple[int, int]:
        """(source, how many earlier slots of the run went to that source)."""
        return self.mix.locate(slot)

    def locate(self, slot: int) -> tuple[int, int]:
        """(source, sample index within the source's concatenated shards) held by `slot`."""
        source, position = self.mix.locate(slot)
        if self.mode == "resampled":
            return source, seed_for(self.seed, 0x5A3D, slot) % self.sizes[source]
        epoch, offset = divmod(position, self.sizes[source])
        return source, self._epoch(source, epoch)(offset)

    def epoch_of(self, slot: int, source: int = 0) -> tuple[int, int]:
        """(epoch, samples into that epoch) of `source` once `slot` slots are consumed."""
        return divmod(self.mix.consumed(slot, source), self.sizes[source])

    def _epoch(self, source: int, epoch: int) -> WindowOrder | Permutation:
        key = (source, epoch)
        if key not in self._epochs:
            if self.orders[source] == "global":
                order: WindowOrder | Permutation = Permutation(
                    self.sizes[source], (self.seed, source, epoch, 0x610BA1)
                )
            else:
                order = WindowOrder(
                    self.counts[source],
                    self.starts[source],
                    (self.seed, source, epoch),
                    self.window_shards,
                )
            self._epochs[key] = order
            if len(self._epochs) > 2 * len(self.counts):
                self._epochs.popitem(last=False)
        return self._epochs[key]


# ---- how well an order mixes classes ----------------------------------------------------------


def expected_distinct(class_counts: np.ndarray, batch: int) -> float:
    """Expected number of distinct classes in `batch` draws from these class frequencies."""
    p = class_counts[class_counts > 0] / class_counts.sum()
    return float((1 - (1 - p) ** batch).sum())


def distinct_in_subset(class_counts: Sequence[int], batch: int) -> float:
    """Expected distinct classes in `batch` samples drawn without replacement from a pool with
    these per-class counts (what a batch of consecutive slots in one window is): a class of k
    among T samples is missed with probability C(T-k, n) / C(T, n)."""
    total = int(sum(class_counts))
    n = min(batch, total)
    hit: dict[int, float] = {}
    expected = 0.0
    for k in class_counts:
        if k <= 0:
            continue
        if k not in hit:
            if total - k < n:
                hit[k] = 1.0
            else:
                log_missed = (
                    math.lgamma(total - k + 1)
                    - math.lgamma(total - k - n + 1)
                    - math.lgamma(total + 1)
                    + math.lgamma(total - n + 1)
                )
                hit[k] = 1.0 - math.exp(log_missed)
        expected += hit[k]
    return expected


def class_mix(
    shard_labels: Sequence[Mapping[int, int]],
    window_shards: int,
    batch: int,
    seed: int = 0,
    windows_checked: int = 64,
) -> tuple[float, float]:
    """(expected distinct classes in a batch of the window order, in an i.i.d. batch), from
    per-shard label histograms: the window order's batch is a random subset of one window's
    samples; i.i.d. draws from the whole dataset's class frequencies. Averaged over (up to
    `windows_checked`) windows of one epoch."""
    overall: dict[int, int] = {}
    for labels in shard_labels:
        for c, n in labels.items():
            overall[c] = overall.get(c, 0) + n
    iid = expected_distinct(np.array(list(overall.values()), dtype=np.float64), batch)
    order = rng(seed, 0x5EED).permutation(len(shard_labels))
    windows = [order[i : i + window_shards] for i in range(0, len(order), window_shards)]
    if len(windows) > windows_checked:
        windows = [windows[i] for i in rng(seed, 0xC4EC).choice(len(windows), windows_checked)]
    values, sizes = [], []
    for window in windows:
        counts: dict[int, int] = {}
        for s in window:
            for c, n in shard_labels[s].items():
                counts[c] = counts.get(c, 0) + n
        values.append(distinct_in_subset(list(counts.values()), batch))
        sizes.append(sum(counts.values()))
    return float(np.average(values, weights=sizes)), iid


@dataclass(frozen=True)
class OrderChoice:
    order: str  # window or global
    note: str  # one line for the log


def choose_order(
    requested: str,
    name: str,
    shard_labels: Sequence[Mapping[int, int]] | None,
    window_shards: int,
    batches: Sequence[int],
    samples: int,
    sampled_from: int | None = None,
) -> OrderChoice:
    """The epoch order of one source: `requested`, or for `auto` the cheap window order unless
    the label histograms show it would not mix classes (class-sorted shards), then global, up
    to `GLOBAL_AUTO_LIMIT` samples (beyond, a global order's shard indexes outgrow a loader
    worker's memory: re-sharding is the answer). `sampled_from`: the histograms are of that
    many randomly chosen shards, not the manifest's."""
    if not shard_labels or not any(shard_labels):
        if requested == "auto":
            return OrderChoice(
                "window", f"{name}: window order (no labels to check how the shards mix classes)"
            )
        return OrderChoice(requested, f"{name}: {requested} order")
    mixes_by_batch = [(*class_mix(shard_labels, window_shards, b), b) for b in batches]
    window, iid, batch = min(mixes_by_batch, key=lambda m: m[0] / m[1])
    mixes = window >= DIVERSITY_FLOOR * iid
    source = f" (labels of {sampled_from} sampled shards)" if sampled_from else ""
    if mixes:
        order = "window" if requested == "auto" else requested
        return OrderChoice(order, f"{name}: {order} order (the shards mix classes{source})")
    detail = (
        f"{name}: the shards are class-sorted{source}: a batch of {batch} in window order would "
        f"hold ~{window:.0f} classes where an i.i.d. batch holds ~{iid:.0f}"
    )
    order = requested
    if requested == "auto":
        order = "global" if samples <= GLOBAL_AUTO_LIMIT else "window"
    if order == "global":
        return OrderChoice(
            order,
            f"{detail}; using the global order (a random read per sample); to read shards "
            "sequentially again, rewrite them with python -m data_tools.make_shards (it "
            "shuffles)",
        )
    too_big = (
        f" (auto keeps window above {GLOBAL_AUTO_LIMIT:,} samples: the global order's shard "
        "indexes, ~80 bytes per sample, would be kept by every loader worker)"
        if requested == "auto"
        else ""
    )
    return OrderChoice(
        order,
        f"WARNING: {detail}; rewrite them with python -m data_tools.make_shards, which shuffles, "
        f"or set data.order=global{too_big}",
    )


# ---- how a step's slots are cut ---------------------------------------------------------------


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


def step_start(
    position: int, steps: int, global_batch: int, skipped: Sequence[tuple[int, int]] = ()
) -> int:
    """The first slot of the `steps`-th step after the step starting at slot `position`: steps
    take `global_batch` consecutive slots and jump over `skipped` ranges (whole steps' slots, as
    a loss-spike rollback skips them; sorted). Ranges before `position` are behind the run."""
    slot = position + steps * global_batch
    for first, end in sorted(skipped):
        if first >= position and slot >= first:
            slot += end - first
    return slot
