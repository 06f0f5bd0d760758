"""The train/eval pipelines: exact and elastic resume, equal batches, mixing, bad data, decode."""

import dataclasses
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coatnet_scale.config import load_config
from coatnet_scale.data.pipeline import (
    BatchPlan,
    DataError,
    SampleOrder,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    eval_loader,
)
from coatnet_scale.data.shards import Manifest, load_manifest, write_manifest
from coatnet_scale.data.transforms import (
    TrainAugment,
    decode_eval,
    decode_region,
    normalize,
    open_image,
)
from tests.data.conftest import jpeg_bytes, shard_set

UNEVEN = [11, 2, 7, 1, 9]  # 30 samples in shards of very different sizes
AUG = TrainAugment(image_size=16, randaugment_n=2, randaugment_m=9)


def loader(
    manifests, plan, workers=0, seed=0, mode="exact", weights=None, order="window", augment=AUG
) -> TrainLoader:
    weights = weights or [float(m.total_samples) for m in manifests]
    return TrainLoader(manifests, weights, seed, mode, plan, augment, workers, 0.5, order, 2)


ORDERS = pytest.mark.parametrize("order", ["window", "global"])


def take_steps(ld: TrainLoader, steps: int) -> list[list[str]]:
    """Keys of each micro-batch for `steps` optimizer steps of this loader's rank."""
    out = []
    for batch in ld:
        out.append(batch["key"])
        if len(out) == steps * ld.plan.accumulation:
            break
    return out


def run_ranks(manifests, world, steps, global_batch, micro, workers, state=None, **kw):
    """Simulate `world` ranks (each its own loader) for `steps`; returns per-step key sets and the
    last state (identical on every rank)."""
    per_step: list[list[str]] = [[] for _ in range(steps)]
    states = []
    for rank in range(world):
        ld = loader(manifests, BatchPlan(global_batch, micro, rank, world), workers, **kw)
        if state is not None:
            ld.load_state_dict(state)
        micro_batches = take_steps(ld, steps)
        assert len(micro_batches) == steps * ld.plan.accumulation  # equal batch counts
        for i, keys in enumerate(micro_batches):
            per_step[i // ld.plan.accumulation].extend(keys)
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states)
    return per_step, states[0]


@pytest.fixture
def uneven(tmp_path: Path):
    return [load_manifest(shard_set(tmp_path, UNEVEN))]


@ORDERS
def test_every_rank_gets_equal_batches_with_uneven_shards(uneven, order: str) -> None:
    per_step, state = run_ranks(
        uneven, world=2, steps=7, global_batch=8, micro=2, workers=2, order=order
    )
    keys = [k for step in per_step for k in step]
    assert len(keys) == 56
    first_epoch, second = keys[:30], keys[30:]
    assert len(set(first_epoch)) == 30  # every sample once, none repeated
    assert len(set(second)) == len(second)
    assert state["samples_consumed"] == 56 and state["epoch"] == 1
    assert state["samples_into_epoch"] == 26


@ORDERS
@pytest.mark.parametrize(("before", "after"), [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_exact_resume_continues_with_unseen_samples(
    uneven, before: int, after: int, order: str
) -> None:
    straight, _ = run_ranks(
        uneven, world=1, steps=6, global_batch=8, micro=4, workers=0, order=order
    )
    head, state = run_ranks(
        uneven, world=before, steps=2, global_batch=8, micro=4 // before, workers=2, order=order
    )
    tail, _ = run_ranks(
        uneven,
        world=after,
        steps=4,
        global_batch=8,
        micro=4 // after,
        workers=1 + after % 2,
        state=state,
        order=order,
    )
    resumed = head + tail
    # Same samples step by step as the uninterrupted run, whatever the ranks and workers.
    assert [sorted(s) for s in resumed] == [sorted(s) for s in straight]
    epoch = [k for step in resumed for k in step][:30]
    assert len(set(epoch)) == 30


def test_same_seed_same_order_other_seed_other_order(uneven) -> None:
    plan = BatchPlan(6, 3, 0, 1)
    a = take_steps(loader(uneven, plan, seed=1), 3)
    b = take_steps(loader(uneven, plan, workers=2, seed=1), 3)
    c = take_steps(loader(uneven, plan, seed=2), 3)
    assert a == b
    assert a != c


def test_augmentation_depends_only_on_the_slot(uneven) -> None:
    one = next(iter(loader(uneven, BatchPlan(4, 4, 0, 1))))
    two = [next(iter(loader(uneven, BatchPlan(4, 2, r, 2), workers=1))) for r in (0, 1)]
    assert torch.equal(one["image"], torch.cat([two[0]["image"], two[1]["image"]]))


def test_resampled_mode_resumes_and_repeats(uneven) -> None:
    straight, _ = run_ranks(uneven, 1, 10, 8, 8, 0, mode="resampled")
    head, state = run_ranks(uneven, 2, 4, 8, 4, 0, mode="resampled")
    tail, _ = run_ranks(uneven, 1, 6, 8, 8, 0, state=state, mode="resampled")
    assert [sorted(s) for s in head + tail] == [sorted(s) for s in straight]
    keys = [k for step in straight for k in step][:30]
    assert len(set(keys)) < 30  # with replacement


def test_a_position_of_another_order_is_refused(uneven) -> None:
    _, state = run_ranks(uneven, 1, 1, 4, 4, 0, order="window")
    with pytest.raises(ValueError, match="sample order window/2"):
        loader(uneven, BatchPlan(4, 4, 0, 1), order="global").load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "order"}  # saved before data.order existed
    with pytest.raises(ValueError, match="window/8"):
        loader(uneven, BatchPlan(4, 4, 0, 1)).load_state_dict(old)


def test_sources_mix_by_weight_deterministically(tmp_path: Path) -> None:
    big = load_manifest(shard_set(tmp_path / "a", [40, 40], name="big"))
    small = load_manifest(shard_set(tmp_path / "b", [5], name="small"))
    order = SampleOrder([[40, 40], [5]], [3.0, 1.0], seed=0)
    sources = Counter(order.source_position(s)[0] for s in range(2000))
    assert sources == {0: 1500, 1: 500}
    per_step, state = run_ranks([big, small], 1, 10, 8, 8, 0, weights=[3.0, 1.0])
    keys = [k for step in per_step for k in step]
    small_keys = [k for k in keys if k.startswith("small")]
    assert 10 <= len(small_keys) <= 30  # about a quarter of 80
    # the small source cycles through whole epochs: every 5 of its draws are 5 distinct samples
    for i in range(0, len(small_keys) - 4, 5):
        assert len(set(small_keys[i : i + 5])) == 5
    head, mid = run_ranks([big, small], 2, 4, 8, 4, 0, weights=[3.0, 1.0])
    tail, _ = run_ranks([big, small], 1, 6, 8, 8, 0, weights=[3.0, 1.0], state=mid)
    assert [sorted(s) for s in head + tail] == [sorted(s) for s in per_step]


def test_resume_refuses_changed_data(uneven, tmp_path: Path) -> None:
    _, state = run_ranks(uneven, 1, 1, 4, 4, 0)
    other = [load_manifest(shard_set(tmp_path / "o", [5, 5]))]
    with pytest.raises(ValueError, match="training data changed"):
        loader(other, BatchPlan(4, 4, 0, 1)).load_state_dict(state)


def test_bad_samples_are_counted_replaced_and_limited(uneven, tmp_path: Path) -> None:
    manifest = uneven[0]
    Path(manifest.shards[1].path).unlink()  # 2 samples gone
    broken = Path(manifest.shards[3].path)  # 1 sample: garbage instead of a tar
    broken.write_bytes(b"x" * 100)
    ld = loader(uneven, BatchPlan(10, 10, 0, 1))
    batches = take_steps(ld, 3)
    assert all(len(keys) == 10 for keys in batches)
    assert ld.bad_samples == 3 and ld.samples_seen == 30
    assert sum(1 for keys in batches for k in keys if k == "") == 3
    strict = TrainLoader(uneven, [30.0], 0, "exact", BatchPlan(10, 10, 0, 1), AUG, 0, 0.0)
    strict_iter = iter(strict)
    with pytest.raises(DataError, match="verify_shards"):
        for _ in range(200):
            next(strict_iter)


def test_every_sample_bad_stops_quickly(tmp_path: Path) -> None:
    manifest = load_manifest(shard_set(tmp_path, [6]))
    Path(manifest.shards[0].path).unlink()
    with pytest.raises(DataError, match="bad data"):
        take_steps(loader([manifest], BatchPlan(2, 2, 0, 1)), 5)


def test_eval_covers_every_sample_once_with_equal_batches(uneven) -> None:
    manifest = uneven[0]
    seen, counts = [], []
    for rank in range(4):
        batches = list(eval_loader(manifest, 3, rank, 4, 16, 0.875, num_workers=2))
        counts.append(len(batches))
        for b in batches:
            seen.extend(k for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v)
            assert b["image"].shape == (3, 3, 16, 16)
            assert b["bad"] == 0  # padding rows are not bad samples
    assert len(set(counts)) == 1
    assert sorted(seen) == sorted(f"train{i:06d}" for i in range(30))


def test_loaders_from_config_and_missing_data_message(uneven) -> None:
    path = uneven[0].source
    cfg = load_config(
        model="coatnet_debug", overrides=[f"data.train_shards={path}", f"data.val_shards={path}"]
    )
    ld = build_train_loader(cfg.data, 16, BatchPlan(4, 4, 0, 1), seed=0)
    assert next(iter(ld))["image"].shape == (4, 3, 16, 16)
    assert len(list(build_eval_loader(cfg.data, 16, 8, 0, 1))) == 4
    with pytest.raises(ValueError, match="set data.train_shards"):
        build_train_loader(load_config().data, 16, BatchPlan(4, 4, 0, 1), seed=0)


def test_draft_decoding_keeps_output_size_and_content() -> None:
    gradient = np.tile(np.linspace(0, 255, 1024, dtype=np.uint8), (768, 1))
    rgb = np.stack([gradient, 255 - gradient, gradient], -1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    img, box = decode_region(data, open_image(data), (0, 0, 1024, 768), 64)
    assert img.size == (128, 96) and box == (0, 0, 128, 96)  # 1/8-scale DCT decode
    img, box = decode_region(data, open_image(data), (0, 0, 200, 200), 64)
    assert box == (0, 0, 100, 100)  # 1/2 scale: 1/4 would leave the box < 64 px
    # only the region (plus the resize's margin, to an MCU boundary) of the 512x384 is decoded
    assert 100 < img.size[0] <= 128 and 100 < img.size[1] <= 112
    small = decode_eval(data, 64, 1.0)
    full = (
        Image.open(io.BytesIO(data))
        .convert("RGB")
        .resize((64, 64), Image.BICUBIC, box=(128, 0, 896, 768))
    )
    reference = torch.from_numpy(np.asarray(full)).permute(2, 0, 1)
    assert small.shape == (3, 64, 64)
    assert (small.float() - reference.float()).abs().mean() < 3.0


def test_normalize() -> None:
    images = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32 and out[:, 0].max() == pytest.approx((1 - 0.485) / 0.229)
    assert jpeg_bytes(0)[:2] == b"\xff\xd8"


def test_batches_carry_each_slots_augmentation_draws(uneven) -> None:
    """Flip, RandAugment and mixing are drawn per slot in the workers and travel with the batch:
    the same slot has the same draws in any batch, on any rank."""
    aug = TrainAugment(16, randaugment_n=2, randaugment_m=9, mixup_alpha=0.8)
    batch = next(iter(loader(uneven, BatchPlan(8, 4, 0, 1), augment=aug)))
    assert batch["augment"].shape == (4, 1 + 2 * 5) and batch["mix"].shape == (4, 4)
    other = next(iter(loader(uneven, BatchPlan(8, 4, 1, 2), augment=aug)))  # rank 1 of 2
    assert torch.equal(other["slot"], batch["slot"] + 4)
    single = loader(uneven, BatchPlan(8, 8, 0, 1), augment=aug)
    whole = next(iter(single))
    assert torch.equal(whole["augment"][:4], batch["augment"])
    assert torch.equal(whole["augment"][4:], other["augment"])
    assert torch.equal(whole["mix"][4:], other["mix"])


@pytest.mark.parametrize("magnitude", [0, 1, 5, 15, 30])
def test_randaugment_never_crashes_at_any_magnitude(magnitude: int) -> None:
    import random

    ra = TrainAugment(32, randaugment_n=4, randaugment_m=magnitude).randaugment()
    img = Image.open(io.BytesIO(jpeg_bytes(3, (32, 32)))).convert("RGB")
    for seed in range(50):
        random.seed(seed)
        np.random.seed(seed)
        assert ra(img).size == (32, 32)


def test_brace_pattern_counts_samples_like_the_manifest(uneven) -> None:
    from coatnet_scale.data.shards import resolve_shards

    manifest = uneven[0]
    folder = Path(manifest.shards[0].path).parent
    pattern = str(folder / "train-{000000..000004}.tar")
    listed = resolve_shards(pattern)
    assert [s.nsamples for s in listed.shards] == UNEVEN
    assert listed.fingerprint() == manifest.fingerprint()
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(str(folder / "train-{000000..000009}.tar"))


def test_loader_workers_ignore_stop_signals_so_the_step_can_finish(uneven) -> None:
    """A launcher signals the whole process tree; the workers must keep feeding the main process
    until it has finished its step and checkpoint."""
    import os
    import signal

    import psutil

    ld = loader(uneven, BatchPlan(4, 4, 0, 1), workers=1)
    batches = iter(ld)
    next(batches)
    workers = psutil.Process().children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR1)
    for _ in range(3):
        assert len(next(batches)["label"]) == 4
    assert all(w.is_running() for w in workers)


def test_bad_samples_are_named_with_shard_key_source_and_reason(
    shards: Path, caplog, capsys
) -> None:
    """make_shards wrote KEY.json with the source path: a sample whose image bytes were damaged
    after writing is named by shard, key, source file and reason; later ones are summarised;
    verify_shards, which the error message points to, finds the same sample."""
    from data_tools import verify_shards
    from tests.data.test_shard_tools import _rewrite_member

    manifest = load_manifest(shards)
    damaged = _rewrite_member(manifest.shards[0].path, ".jpg", b"\xff\xd8garbage")
    ld = TrainLoader([manifest], [12.0], 0, "exact", BatchPlan(12, 12, 0, 1), AUG, 0, 0.5)
    with caplog.at_level("WARNING", logger="coatnet_scale.data"):
        batch = next(iter(ld))
    assert batch["bad"] == 1 and ld.bad_samples == 1
    [named] = [r.getMessage() for r in caplog.records if "bad sample 1:" in r.getMessage()]
    assert f"train-000000.tar {damaged} (" in named and "not an image" in named
    assert ".jpg)" in named  # the source file from KEY.json
    assert ld.bad_summary() is None  # nothing beyond the named ones
    ld.bad_samples += 25  # as if 25 more came after the first 20 were named
    assert "25 more bad sample(s)" in ld.bad_summary()
    assert verify_shards.main([str(shards), "--quiet"]) == 1
    assert f"sample {damaged} (" in capsys.readouterr().out


def test_only_the_first_20_bad_samples_are_named_then_summarised(tmp_path: Path, caplog) -> None:
    """30 real bad samples (three shards gone): 20 warnings naming one sample each, then one
    summary line for the other 10, and every one counted."""
    manifest = load_manifest(shard_set(tmp_path, [10, 10, 10, 10]))
    for shard in manifest.shards[1:]:
        Path(shard.path).unlink()
    ld = TrainLoader([manifest], [40.0], 0, "exact", BatchPlan(8, 8, 0, 1), AUG, 0, 0.9)
    with caplog.at_level("WARNING", logger="coatnet_scale.data"):
        take_steps(ld, 5)
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad sample ")]
    assert ld.bad_samples == 30 and ld.samples_seen == 40
    assert len(named) == 20 and all("cannot open the shard" in line for line in named)
    assert ld.bad_summary().startswith("10 more bad sample(s) on this rank (30 of 40 so far")
    assert ld.bad_summary() is None  # each bad sample reported once


def sorted_shards(tmp_path: Path, classes: int = 6, per_class: int = 10) -> Manifest:
    """One class per shard, as an ImageFolder written class by class elsewhere."""
    from data_tools.writer import ShardJob, SourceSample, write_shard

    infos = []
    for c in range(classes):
        samples = tuple(
            SourceSample(f"s{c}x{i:03d}", c, jpeg_bytes(100 * c + i)) for i in range(per_class)
        )
        infos.append(write_shard(ShardJob(str(tmp_path / f"sorted-{c:06d}.tar"), samples)).info)
    return write_manifest(tmp_path / "sorted.json", "sorted", infos, [str(c) for c in range(6)])


def test_auto_order_detects_class_sorted_shards_with_or_without_histograms(tmp_path) -> None:
    manifest = sorted_shards(tmp_path)
    plan = BatchPlan(12, 6, 0, 1)
    with_labels = TrainLoader([manifest], [60.0], 0, "exact", plan, AUG, 0, 0.5, "auto", 2)
    assert with_labels.order.orders == ("global",)
    assert "class-sorted" in with_labels.order_notes[0]
    bare = dataclasses.replace(
        manifest, shards=tuple(dataclasses.replace(s, labels=None) for s in manifest.shards)
    )
    sampled = TrainLoader([bare], [60.0], 0, "exact", plan, AUG, 0, 0.5, "auto", 2)
    assert sampled.order.orders == ("global",)
    assert "6 sampled shards" in sampled.order_notes[0]
    distinct = [len(set(b["label"].tolist())) for b, _ in zip(sampled, range(10), strict=False)]
    assert np.mean(distinct) >= 3.3  # i.i.d.: ~4.0 of 6; the window order: 2 at most


def test_auto_keeps_the_order_a_resumed_run_started_with(uneven) -> None:
    """auto's check depends on the batch sizes, which an elastic resume may change: the saved
    order wins; an explicitly requested other order is refused."""
    _, state = run_ranks(uneven, 1, 1, 4, 4, 0, order="global")
    adopting = TrainLoader(uneven, [30.0], 0, "exact", BatchPlan(4, 2, 0, 1), AUG, 0, 0.5)
    assert adopting.order.orders == ("window",)  # what auto chooses for these shards
    adopting.load_state_dict(state)
    assert adopting.order.orders == ("global",)
    assert adopting.order_notes == [
        "train: global order kept from the checkpoint (auto would choose window for this run's "
        "batch sizes)"
    ]
    with pytest.raises(ValueError, match="sample order global"):
        loader(uneven, BatchPlan(4, 2, 0, 1), order="window").load_state_dict(state)


def test_positions_of_the_earlier_multi_source_mixing_are_refused(tmp_path: Path) -> None:
    big = load_manifest(shard_set(tmp_path / "a", [40, 40], name="big"))
    small = load_manifest(shard_set(tmp_path / "b", [5], name="small"))
    plan = BatchPlan(8, 8, 0, 1)
    ld = loader([big, small], plan, weights=[3.0, 1.0])
    state = ld.state_dict()
    assert state["order"].endswith("/mix2")
    del state["order"]  # as saved before the cumulative mixing
    with pytest.raises(ValueError, match="mixing"):
        loader([big, small], plan, weights=[3.0, 1.0]).load_state_dict(state)


def test_a_bug_in_our_decoding_propagates_instead_of_counting_as_bad_data(
    uneven, monkeypatch
) -> None:
    import coatnet_scale.data.pipeline as pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("our arithmetic")

    monkeypatch.setattr(pipeline, "decode_train", broken)
    with pytest.raises(ZeroDivisionError, match="our arithmetic"):
        next(iter(loader(uneven, BatchPlan(4, 4, 0, 1))))


def test_sources_mixed_by_size_from_manifests_give_a_small_one_its_share(tmp_path: Path) -> None:
    """The config's default weights (each source's size) through manifests, as a run reads
    them: 14M images in 140 shards and 5k in 5. The small source gets 5k / (14M + 5k) of every
    window of slots, anywhere in the order, within one sample (never 0, as rounding the
    weights to 1/1000 gave)."""
    from coatnet_scale.data.shards import ShardInfo

    specs = []
    for name, shards, per_shard in (("big", 140, 100_000), ("small", 5, 1000)):
        infos = [ShardInfo(str(tmp_path / f"{name}-{i:06d}.tar"), per_shard) for i in range(shards)]
        write_manifest(tmp_path / f"{name}.json", name, infos, ["a", "b"])
        specs.append(str(tmp_path / f"{name}.json"))
    cfg = load_config(overrides=[f"data.train_shards=[{','.join(specs)}]", "data.order=window"])
    ld = build_train_loader(cfg.data, 16, BatchPlan(4096, 64, 0, 64), seed=3)
    share = 5e3 / (14e6 + 5e3)
    consumed = ld.order.mix.consumed
    for start in (0, 123_457, 9_876_543):
        for n in (1_000_000, 10_000_000):
            assert abs(consumed(start + n, 1) - consumed(start, 1) - n * share) <= 1
