"""Loss-spike rollback's parts (coatnet_scale/spikes.py): what counts as a spike, the LR
cooldown, the slots a rollback skips (the loader reads exactly the others, also after a resume),
the record, and the stop when a spike comes back where one was skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from coatnet_scale.config import SpikeConfig
from coatnet_scale.data.order import step_start
from coatnet_scale.data.pipeline import BatchPlan
from coatnet_scale.data.shards import load_manifest
from coatnet_scale.spikes import (
    Rollback,
    SpikeDetector,
    SpikeError,
    SpikeRollback,
    lr_factor,
    read_rollbacks,
    write_rollbacks,
)
from tests.data.conftest import shard_set
from tests.data.test_pipeline import loader

CFG = SpikeConfig(rollback=True, window=50, min_history=10)


def noisy_losses(n: int, level: float = 2.0) -> list[float]:
    """A slowly falling loss with +-2% of deterministic noise."""
    return [level - 0.001 * i + 0.04 * ((i * 7919) % 11 - 5) / 5 for i in range(n)]


def test_a_loss_far_above_its_recent_spread_is_a_spike_and_ordinary_noise_is_not() -> None:
    detector = SpikeDetector(CFG)
    for loss in noisy_losses(200):
        assert detector.spike(loss, 1.0) is None
    assert detector.spike(3.2, 1.0) is not None  # 1.8x the median, ~40 MADs above
    assert detector.spike(1.95, 1.0) is None  # the history kept no spike
    assert detector.spike(1.9, 25.0) is None
    reason = detector.spike(1.9, 31.0)
    assert reason is not None and reason.startswith("gradient norm 31 above 30 x its median 1")


def test_a_rise_of_many_mads_but_few_percent_is_not_a_spike() -> None:
    """Near convergence the losses sit at the label-smoothing floor and the MAD collapses: on the
    measured curve a 20% rise was 58 MADs (bench/spike_thresholds.py)."""
    detector = SpikeDetector(CFG)
    for i in range(100):
        detector.spike(0.5 + 0.001 * (i % 3), 1.0)  # MAD 0.001
    assert detector.spike(0.55, 1.0) is None  # 50 MADs, 1.1x the median
    assert detector.spike(0.76, 1.0) is not None  # 1.5x


def test_nothing_is_a_spike_before_min_history_steps() -> None:
    detector = SpikeDetector(CFG)
    for loss in noisy_losses(CFG.min_history - 1):
        detector.spike(loss, 1.0)
    assert detector.spike(1e6, 1e6) is None


def test_the_lr_cools_for_cooldown_steps_then_ramps_back() -> None:
    cfg = SpikeConfig(cooldown_steps=3, cooldown_factor=0.1, rampup_steps=2)
    rollbacks = [Rollback(spike_step=10, to_step=8, slots=(72, 80), reason="r")]
    factors = [lr_factor(step, rollbacks, cfg) for step in range(6, 15)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.4, 0.7, 1, 1])
    assert lr_factor(9, [], cfg) == 1.0


def test_steps_jump_over_skipped_slots() -> None:
    skipped = [(40, 50), (20, 30)]
    assert [step_start(0, j, 10, skipped) for j in range(5)] == [0, 10, 30, 50, 60]
    assert step_start(30, 1, 10, skipped) == 50  # from a position past the first range
    assert step_start(60, 2, 10, skipped) == 80  # ranges behind the position do not count


def test_the_loader_reads_exactly_the_slots_not_skipped_also_after_a_resume(tmp_path) -> None:
    manifest = shard_set(tmp_path, [12, 12])

    plan = BatchPlan(4, 2, 0, 1)
    whole = loader([load_manifest(manifest)], plan)
    slots = []
    for batch in whole:
        slots += batch["slot"].tolist()
        if len(slots) >= 6 * 4:
            break
    skipping = loader([load_manifest(manifest)], plan)
    skipping.skip([(8, 12)])
    seen = []
    for i, batch in enumerate(skipping):
        seen += batch["slot"].tolist()
        if i == 3:  # two steps: the position is a state to resume from
            state = skipping.state_dict()
            break
    assert seen == slots[:8] and state["samples_consumed"] == 12  # the next slot to read
    assert state["skipped"] == [[8, 12]]
    resumed = loader([load_manifest(manifest)], plan)
    resumed.load_state_dict(state)
    for batch in resumed:
        seen += batch["slot"].tolist()
        if len(seen) >= 5 * 4:
            break
    assert seen == slots[:8] + slots[12:24]
    assert resumed.samples_consumed == 24


def test_the_record_round_trips(tmp_path: Path) -> None:
    rollbacks = [Rollback(10, 8, (72, 80), "loss 9 above 2", ("a", "b"))]
    write_rollbacks(tmp_path, rollbacks)
    assert read_rollbacks(tmp_path) == rollbacks
    assert read_rollbacks(tmp_path / "nowhere") == []


def test_a_spike_near_a_skipped_one_stops_the_run(tmp_path: Path) -> None:
    earlier = Rollback(spike_step=100, to_step=80, slots=(0, 8), reason="r")
    rollback = SpikeRollback(CFG, tmp_path, True, None, None, None, None, [earlier])
    for loss in noisy_losses(50):
        assert rollback.check(130, loss, 1.0, (0, 8), list) is None
    with pytest.raises(SpikeError, match="within 40 steps of the step-100 spike"):
        rollback.check(139, 50.0, 1.0, (8, 16), list)


def test_skipped_steps_must_keep_their_global_batch(tmp_path) -> None:
    plan = BatchPlan(4, 2, 0, 1)
    ld = loader([load_manifest(shard_set(tmp_path, [12, 12]))], plan)
    ld.skip([(0, 4)])  # one step of 4: fine
    with pytest.raises(ValueError, match="global batch is 4"):
        ld.skip([(8, 16)])  # skipped by a run at global batch 8
