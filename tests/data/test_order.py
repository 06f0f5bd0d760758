"""The sample order's semantics, on synthetic datasets (no files): class diversity per micro-batch
and per global batch against i.i.d. sampling, on shuffled and on class-sorted shards; mixing
weights honoured exactly in expectation; the global permutation is a bijection; the order choice
from label histograms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from coatnet_scale.data.order import (
    GLOBAL_AUTO_LIMIT,
    BatchPlan,
    Permutation,
    SampleOrder,
    choose_order,
    class_mix,
    distinct_in_subset,
    expected_distinct,
)

CLASSES, PER_CLASS, SHARD = 100, 60, 100  # 6,000 samples in 60 shards of 100


def dataset(sorted_by_class: bool, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Labels of every sample in shard order, and the shard sizes. Sorted: each shard holds the
    samples of about two classes (an ImageFolder written class by class); shuffled: a random mix."""
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    if not sorted_by_class:
        labels = np.random.default_rng(1000 + seed).permutation(labels)
    return labels, [SHARD] * (len(labels) // SHARD)


def histograms(labels: np.ndarray, shards: list[int]) -> list[dict[int, int]]:
    bounds = np.cumsum([0, *shards])
    return [dict(Counter(labels[a:b].tolist())) for a, b in zip(bounds, bounds[1:], strict=False)]


def diversity(
    labels: np.ndarray, shards: list[int], order: str, seed: int, world: int, steps: int = 12
) -> tuple[float, float]:
    """Mean distinct classes per rank micro-batch (64) and per global batch (256)."""
    sample_order = SampleOrder([shards], [1.0], seed, orders=[order], window_shards=8)
    micro, per_step = [], []
    for step in range(steps):
        step_classes: set[int] = set()
        for rank in range(world):
            plan = BatchPlan(256, 64, rank, world)
            for a in range(plan.accumulation):
                slots = plan.micro_slots(0, step * plan.accumulation + a)
                batch = {int(labels[sample_order.locate(s)[1]]) for s in slots}
                micro.append(len(batch))
                step_classes |= batch
        per_step.append(len(step_classes))
    return float(np.mean(micro)), float(np.mean(per_step))


IID = (
    expected_distinct(np.full(CLASSES, PER_CLASS), 64),
    expected_distinct(np.full(CLASSES, PER_CLASS), 256),
)


@pytest.mark.parametrize(
    ("sorted_by_class", "order"),
    [(False, "window"), (False, "global"), (True, "global")],
    ids=["shuffled-window", "shuffled-global", "sorted-global"],
)
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_hold_the_class_diversity_of_iid_sampling(sorted_by_class, order, world, seed):
    labels, shards = dataset(sorted_by_class, seed)
    micro, step = diversity(labels, shards, order, seed, world)
    assert micro >= 0.95 * IID[0], (micro, IID[0])
    assert step >= 0.95 * IID[1], (step, IID[1])


def test_the_window_order_alone_does_not_mix_class_sorted_shards() -> None:
    """Why the global order and the check exist: 8 class-sorted shards hold ~16 classes."""
    labels, shards = dataset(sorted_by_class=True)
    micro, step = diversity(labels, shards, "window", seed=0, world=2)
    assert micro < 0.5 * IID[0] and step < 0.5 * IID[1]


def test_the_choice_reads_the_manifests_histograms() -> None:
    shuffled = histograms(*dataset(sorted_by_class=False))
    sorted_ = histograms(*dataset(sorted_by_class=True))
    window, iid = class_mix(sorted_, window_shards=8, batch=64)
    assert window < 0.5 * iid
    assert choose_order("auto", "in1k", shuffled, 8, (64, 256), 6000).order == "window"
    chosen = choose_order("auto", "in1k", sorted_, 8, (64, 256), 6000)
    assert chosen.order == "global" and "class-sorted" in chosen.note
    assert "make_shards" in chosen.note  # what to do about it
    forced = choose_order("window", "in1k", sorted_, 8, (64, 256), 6000)
    assert forced.order == "window" and forced.note.startswith("WARNING")
    assert "\n" not in forced.note
    assert "data.order=global" in forced.note and "make_shards" in forced.note
    unknown = choose_order("auto", "in1k", None, 8, (64, 256), 6000)
    assert unknown.order == "window" and "no labels" in unknown.note
    # a source too large for every loader worker to keep every shard's index: a warning
    huge = choose_order("auto", "jft", sorted_, 8, (64, 256), GLOBAL_AUTO_LIMIT + 1)
    assert huge.order == "window" and huge.note.startswith("WARNING")
    assert "make_shards" in huge.note
    sampled = choose_order("auto", "x", sorted_[:16], 8, (64,), 6000, sampled_from=16)
    assert sampled.order == "global" and "16 sampled shards" in sampled.note


def test_many_classes_on_shuffled_shards_count_as_mixed() -> None:
    """21,000 classes over shuffled 1000-sample shards, batch 4096: half a window holds as many
    classes as an i.i.d. batch. (A with-replacement estimate of the window's batches said 80%,
    and would have called such shards class-sorted.)"""
    rng = np.random.default_rng(0)
    shards = []
    for _ in range(300):
        labels, counts = np.unique(rng.integers(0, 21_000, 1000), return_counts=True)
        shards.append(dict(zip(labels.tolist(), counts.tolist(), strict=True)))
    window, iid = class_mix(shards, 8, 4096)
    assert window >= 0.98 * iid
    assert choose_order("auto", "in21k", shards, 8, (128, 4096), 300_000).order == "window"
    # the subset formula against brute force on a small pool
    pool = np.repeat(np.arange(5), [1, 2, 3, 4, 10])
    draws = [len(set(rng.permutation(pool)[:6].tolist())) for _ in range(20_000)]
    assert distinct_in_subset([1, 2, 3, 4, 10], 6) == pytest.approx(np.mean(draws), abs=0.02)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_the_global_permutation_is_a_bijection(n: int) -> None:
    perm = Permutation(n, (7, 0, 1))
    values = [perm(i) for i in range(n)]
    assert sorted(values) == list(range(n))
    assert values == [Permutation(n, (7, 0, 1))(i) for i in range(n)]  # any process, same order
    if n > 16:
        assert values != [Permutation(n, (8, 0, 1))(i) for i in range(n)]  # another seed
        assert values != list(range(n))


def test_a_small_weight_never_rounds_to_zero() -> None:
    """0.9985 / 0.0015 and sizes 14M / 5k mixed by size (3.6e-4): the old per-block rounding to
    1/1000 gave the second source 0.001 and 0 of the slots."""
    counts = [[100_000] * 140, [1000] * 5]
    for weights, share in (([0.9985, 0.0015], 0.0015), ([14e6, 5e3], 5e3 / (14e6 + 5e3))):
        order = SampleOrder(counts, weights, seed=3)
        for n in (1_000_000, 10_000_000):
            realised = order.mix.consumed(n, 1)
            assert abs(realised - n * share) <= 1, (weights, n, realised)
            assert order.mix.consumed(n, 0) + realised == n


def test_the_mix_counts_agree_with_slot_by_slot_locations() -> None:
    order = SampleOrder([[50, 30], [7], [20]], [5.0, 0.3, 2.0], seed=1)
    seen = Counter()
    positions: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for slot in range(12_000):
        source, position = order.source_position(slot)
        positions[source].append(position)
        seen[source] += 1
        if slot % 997 == 0:
            assert [order.mix.consumed(slot + 1, s) for s in range(3)] == [
                seen[s] for s in range(3)
            ]
    for got in positions.values():
        assert got == list(range(len(got)))  # each source's slots in order, none skipped
    shares = np.array([seen[s] for s in range(3)]) / 12_000
    np.testing.assert_allclose(shares, np.array([5.0, 0.3, 2.0]) / 7.3, atol=2 / 12_000)


def test_the_order_math_does_no_io() -> None:
    """order.py stays pure (no files, no processes, no torch): what it imports, it computes with."""
    import ast

    import coatnet_scale.data.order as order

    tree = ast.parse(Path(order.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    pure = {"__future__", "collections", "dataclasses", "functools", "math", "numpy", "typing"}
    assert imported <= pure | {"coatnet_scale"}
    assert {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module.startswith("coatnet_scale")
    } <= {"coatnet_scale.seeding"}
