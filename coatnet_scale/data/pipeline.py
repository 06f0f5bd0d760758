"""The training and evaluation loaders: streams of batches over the shards, loader workers, the
resumable position, bad-sample accounting.

Which sample each slot holds is `order.py`'s (pure, no I/O; its docstring states the exact and
elastic resume guarantee); reading and what counts as bad data is `reader.py`'s; decoding and
augmenting one sample is `transforms.py`'s.

Bad data: a missing shard, a truncated tar, an undecodable image or a missing label makes that
sample "bad": its place in the batch is filled by a copy of a good sample of the same batch with
`valid` False, so batch shapes and counts never change. The first `NAMED_BAD` bad samples of a
run are each named in the log (shard, key, source path, reason), later ones are summarised
(`TrainLoader.bad_summary`). The run stops with `DataError` only when the share of bad samples
exceeds `max_bad_fraction`.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from coatnet_scale.config import DataConfig
from coatnet_scale.data.order import BatchPlan, SampleOrder, choose_order, step_start
from coatnet_scale.data.reader import (
    DATA_ERRORS,
    INDEX_BUDGET,
    ShardReader,
    describe_bad,
    image_and_label,
    sample_shard_labels,
)
from coatnet_scale.data.shards import Manifest, resolve_shards
from coatnet_scale.data.transforms import (
    EncodedCrop,
    TrainAugment,
    crop_for_device,
    decode_eval,
    decode_train,
)
from coatnet_scale.seeding import seed_for
from coatnet_scale.stop import STOP_SIGNALS

log = logging.getLogger("coatnet_scale.data")

MIN_SAMPLES_BEFORE_LIMIT = 1000  # the bad-sample share is enforced after this many samples
SAMPLED_SHARDS = 16  # shards read at start to check class mixing when the manifest has no labels
NAMED_BAD = 20  # bad samples named one by one in the log; later ones are summarised

Item = tuple[str, torch.Tensor, int]


class DataError(RuntimeError):
    """The input data is too damaged to go on (bad share above the configured limit)."""


def _assemble(
    items: list[Item | None],
    bad: list[str],
    slots: Sequence[int],
    image_size: int,
    padding: int = 0,
    draws: list[tuple[list[int], list[float]]] | None = None,
) -> dict:
    """Stack decoded samples; bad ones (None) become copies of a good one with valid=False.

    `padding` trailing rows are fillers, not bad samples (evaluation's last batches). `draws`:
    each slot's augmentation draws (training), as "augment" and "mix" tensors."""
    good = next((item for item in items if item is not None), None)
    filler = good or ("", torch.zeros(3, image_size, image_size, dtype=torch.uint8), 0)
    valid = torch.tensor([item is not None for item in items])
    rows = [item if item is not None else filler for item in items]
    # data.decode=gpu: JPEGs stay encoded and their rows are made on the device (gpu_decode);
    # "image" then holds only the rows decoded here, in row order (no blank rows to ship)
    encoded = [(i, r[1]) for i, r in enumerate(rows) if isinstance(r[1], EncodedCrop)]
    decoded = [r[1] for r in rows if not isinstance(r[1], EncodedCrop)]
    empty = torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    batch = {
        "image": torch.stack(decoded) if decoded else empty,
        "label": torch.tensor([r[2] for r in rows], dtype=torch.long),
        "key": [item[0] if item is not None else "" for item in items],
        "slot": torch.tensor(list(slots), dtype=torch.long),
        "valid": valid,
        "bad": int((~valid).sum()) - padding,
        "bad_reasons": bad,
    }
    if encoded:
        batch["encoded"] = encoded
    if draws is not None:
        batch["augment"] = torch.tensor([d[0] for d in draws], dtype=torch.long)
        batch["mix"] = torch.tensor([d[1] for d in draws], dtype=torch.float32)
    return batch


def _read(reader: ShardReader, source: int, index: int, decode) -> tuple[Item | None, str | None]:
    """One sample through `decode`, or None and the line naming it when its data is bad."""
    key, data = None, None
    try:
        key, data = reader.read(source, index)
        image, label = image_and_label(data)
        return (key, decode(image), label), None
    except DATA_ERRORS as err:
        return None, describe_bad(*reader.where(source, index), key, data, err)


# ---- training batches ------------------------------------------------------------------------


class TrainStream(IterableDataset):
    """Infinite stream of this rank's micro-batches from slot `start` on; workers interleave."""

    def __init__(
        self,
        manifests: Sequence[Manifest],
        order: SampleOrder,
        plan: BatchPlan,
        start: int,
        augment: TrainAugment,
        device_decode: bool = False,
        skipped: Sequence[tuple[int, int]] = (),
    ) -> None:
        super().__init__()
        self.manifests, self.order, self.plan, self.start = list(manifests), order, plan, start
        self.augment, self.device_decode, self.skipped = augment, device_decode, list(skipped)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A global order reads every shard all the time: keep every shard's index (~80 bytes a
        # sample; `auto` chooses it only up to order.GLOBAL_AUTO_LIMIT samples).
        budget = None if "global" in self.order.orders else INDEX_BUDGET
        reader = ShardReader(self.manifests, budget)
        micro = worker
        accumulation = self.plan.accumulation
        while True:
            step, index = divmod(micro, accumulation)
            first = step_start(self.start, step, self.plan.global_batch, self.skipped)
            slots = self.plan.micro_slots(first, index)
            items, bad, draws = [], [], []
            for slot in slots:
                item, reason, drawn = self._sample(reader, slot)
                items.append(item)
                draws.append(drawn)
                if reason is not None:
                    bad.append(reason)
            yield _assemble(items, bad, slots, self.augment.image_size, draws=draws)
            micro += workers

    def _sample(self, reader: ShardReader, slot: int) -> tuple[Item | None, str | None, tuple]:
        """The slot's crop, and its flip, RandAugment and mixing draws (applied on the device)."""
        source, index = self.order.locate(slot)
        random.seed(seed_for(self.order.seed, 0xA06, slot))
        crop = crop_for_device if self.device_decode else decode_train
        item, reason = _read(reader, source, index, lambda b: crop(b, self.augment))
        random.seed(seed_for(self.order.seed, 0xA07, slot))  # whether or not the crop decoded
        return item, reason, self.augment.draw()


def order_key(orders: Sequence[str], window_shards: int) -> str:
    """What identifies the sample sequence besides seed, data and weights: the order of each
    source, the window size where a window order is used, and the mixing of several sources
    (`mix2`: cumulative quotas; positions saved with the earlier per-block rounding differ)."""
    key = ",".join(orders)
    if "window" in orders:
        key += f"/{window_shards}"
    return key + ("/mix2" if len(orders) > 1 else "")


class TrainLoader:
    """A DataLoader over `TrainStream` that knows its position in the run.

    `state_dict()` after N optimizer steps' worth of micro-batches is the resumable position
    (order.py); `load_state_dict` before iterating continues from it, on any number of ranks or
    workers.
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
        order: str = "auto",
        window_shards: int = 8,
        device_decode: bool = False,
    ) -> None:
        self.manifests, self.plan, self.seed, self.mode = list(manifests), plan, seed, mode
        self.device_decode = device_decode  # JPEGs decoded on the training device (gpu_decode)
        self.augment, self.num_workers = augment, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.requested_order, self.window_shards = order, window_shards
        self.weights = list(weights)
        batches = (plan.micro_batch, plan.global_batch)
        choices = []
        for m in manifests:
            labels, sampled = m.shard_labels(), None
            if labels is None and order == "auto":
                labels = sample_shard_labels(m, SAMPLED_SHARDS, seed)
                sampled = min(SAMPLED_SHARDS, len(m.shards)) if labels else None
            choices.append(
                choose_order(
                    order, m.name, labels, window_shards, batches, m.total_samples, sampled
                )
            )
        self.order_notes = [c.note for c in choices]
        self._use_orders([c.order for c in choices])
        self.fingerprint = ",".join(m.fingerprint() for m in manifests) + f";{list(weights)}"
        self.start = 0
        self.skipped: list[tuple[int, int]] = []  # slot ranges a loss-spike rollback skips
        self.micro_batches_consumed = 0
        self.samples_seen = 0
        self.bad_samples = 0
        self.named: list[str] = []
        self._reported_bad = 0

    def _use_orders(self, orders: Sequence[str]) -> None:
        self.order = SampleOrder(
            [[s.nsamples for s in m.shards] for m in self.manifests],
            self.weights,
            self.seed,
            self.mode,
            orders,
            self.window_shards,
        )
        self.order_key = order_key(orders, self.window_shards)

    @property
    def samples_consumed(self) -> int:
        """Slots consumed by completed optimizer steps (all ranks together)."""
        steps = self.micro_batches_consumed // self.plan.accumulation
        return step_start(self.start, steps, self.plan.global_batch, self.skipped)

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
            "order": self.order_key,
            "fingerprint": self.fingerprint,
            "skipped": [list(r) for r in self.skipped],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["mode"] != self.mode:
            raise ValueError(
                f"data position was saved with seed {state['seed']} / {state['mode']} sampling, "
                f"this run uses seed {self.seed} / {self.mode}"
            )
        # Positions saved before data.order existed: window order over 8 shards, and for several
        # sources the earlier per-block mixing, which no longer exists.
        saved_order = state.get("order") or ",".join(["window"] * len(self.manifests)) + "/8"
        saved_orders = saved_order.split("/")[0].split(",")
        if (
            saved_order != self.order_key
            and self.requested_order == "auto"
            and order_key(saved_orders, self.window_shards) == saved_order
        ):
            # auto decides per run (the batch sizes enter the check): a resume keeps the
            # order the run started with, so the sample sequence continues
            chosen = self.order_key
            self._use_orders(saved_orders)
            self.order_notes = [
                f"train: {', '.join(saved_orders)} order kept from the checkpoint (auto would "
                f"choose {chosen.split('/')[0]} for this run's batch sizes)"
            ]
        if saved_order != self.order_key:
            raise ValueError(
                f"data position was saved with sample order {saved_order}, this run resolves to "
                f"{self.order_key} (order per source, window shards, source mixing version): "
                "set data.order and data.window_shards as they were, or start a new run"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "the training data changed since the checkpoint (shard list, counts or weights): "
                "an exact resume is impossible; restore the data or start a new run"
            )
        self.start = int(state["samples_consumed"])
        self.skipped = [(int(a), int(b)) for a, b in state.get("skipped", [])]
        self.micro_batches_consumed = 0
        self.skipped = [r for r in self.skipped if r[1] > self.start]  # the rest is behind
        self._check_skipped()

    def skip(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Never read these slot ranges (whole steps') from here on; before iterating. Ranges
        behind the position are dropped."""
        ahead = {(int(a), int(b)) for a, b in ranges if int(b) > self.start}
        self.skipped = sorted(set(self.skipped) | ahead)
        self._check_skipped()

    def _check_skipped(self) -> None:
        """Skipped ranges are whole steps: with another global batch a step would straddle one
        (reading the bad samples, skipping good ones)."""
        for first, end in self.skipped:
            if end - first != self.plan.global_batch:
                raise ValueError(
                    f"slots {first}-{end - 1} were skipped after a loss spike as one step of "
                    f"{end - first} samples; this run's global batch is "
                    f"{self.plan.global_batch}: keep train.global_batch_size while those "
                    "rollbacks are ahead of the data position"
                )

    def __iter__(self) -> Iterator[dict]:
        stream = TrainStream(
            self.manifests,
            self.order,
            self.plan,
            self.start,
            self.augment,
            self.device_decode,
            self.skipped,
        )
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
        self._bad(batch["bad"], batch["bad_reasons"])

    def count_bad(self, reasons: list[str]) -> None:
        """Bad samples found after the loader handed the batch out (the device's JPEG decoder
        refused them, `gpu_decode`): counted, named and limited like the workers' ones."""
        self._bad(len(reasons), reasons)

    def _bad(self, count: int, reasons: list[str]) -> None:
        self.bad_samples += count
        for reason in reasons:
            if len(self.named) < NAMED_BAD:
                self.named.append(reason)
                log.warning("bad sample %d: %s", len(self.named), reason)
        every_sample_bad = self.bad_samples == self.samples_seen >= 2 * self.plan.micro_batch
        over_limit = (
            self.samples_seen >= MIN_SAMPLES_BEFORE_LIMIT
            and self.bad_samples > self.max_bad_fraction * self.samples_seen
        )
        if every_sample_bad or over_limit:
            manifests = [m.source for m in self.manifests if m.source.endswith(".json")]
            verify = (
                f"`python -m data_tools.verify_shards {' '.join(manifests)}` lists every damaged "
                "sample; "
                if manifests
                else ""
            )
            raise DataError(
                f"{self.bad_samples} of {self.samples_seen} samples on this rank are bad data "
                f"(limit data.max_bad_fraction={self.max_bad_fraction}), e.g. "
                + "; ".join(self.named[:3])
                + f". {verify}rewrite those shards (data_tools.make_shards) or raise the limit"
            )

    def bad_summary(self) -> str | None:
        """Logs (and returns) a line on the bad samples since the previous call, beyond those
        already named one by one; the training loop calls it once per log interval."""
        new = self.bad_samples - max(self._reported_bad, len(self.named))
        self._reported_bad = self.bad_samples
        if new <= 0:
            return None
        line = (
            f"{new} more bad sample(s) on this rank ({self.bad_samples} of "
            f"{self.samples_seen} so far; the first {len(self.named)} are named above)"
        )
        log.warning("%s", line)
        return line


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
        logged = 0
        for b in range(worker, self.num_batches, workers):
            start = self.first + b * self.micro_batch
            slots = range(start, start + self.micro_batch)
            items, bad = [], []
            for i in slots:
                if i >= self.last:
                    items.append(None)
                    continue
                item, reason = _read(
                    reader, 0, i, lambda b: decode_eval(b, self.image_size, self.crop_pct)
                )
                items.append(item)
                if reason is not None:
                    if logged < NAMED_BAD:
                        log.warning("bad validation sample: %s", reason)
                    logged += 1
                    bad.append(reason)
            padding = sum(1 for i in slots if i >= self.last)
            yield _assemble(items, bad, slots, self.image_size, padding)


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


def build_train_loader(
    cfg: DataConfig, image_size: int, plan: BatchPlan, seed: int, device_decode: bool = False
) -> TrainLoader:
    """The training loader of the `data` config section for this rank; `device_decode`: JPEGs
    reach the training loop encoded, with their crop window (`data.decode`, `gpu_decode.py`)."""
    manifests = load_sources(cfg.train_shards)
    weights = cfg.train_weights or tuple(float(m.total_samples) for m in manifests)
    augment = TrainAugment(
        image_size,
        cfg.crop_scale_min,
        cfg.randaugment_n,
        cfg.randaugment_m,
        hflip=cfg.hflip,
        interpolation=cfg.train_interpolation,
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
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
        cfg.order,
        cfg.window_shards,
        device_decode,
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


__all__ = [
    "BatchPlan",
    "DataError",
    "SampleOrder",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "eval_loader",
]
