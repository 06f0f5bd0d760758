"""Which rank the stall watchdog names (coatnet_scale/watchdog.py), the heartbeat's phase
clock, and which rank the straggler report names (coatnet_scale/stragglers.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coatnet_scale.stragglers import StragglerWatch
from coatnet_scale.watchdog import Beat, Heartbeat, Seen, find_stall, heartbeat_interval


def beat(rank: int, step: int, phase: str, beats: int = 1) -> Beat:
    """A heartbeat; `beats`: the phase changes so far (program order)."""
    return Beat(rank, f"h{rank}", 100 + rank, "t", beats, step, phase, 0.0)


def seen(b: Beat, alive_ago: float, beats_ago: float, now: float = 1000.0) -> Seen:
    return Seen(b, now - alive_ago, now - beats_ago)


def test_nothing_is_named_before_the_timeout() -> None:
    ranks = {0: seen(beat(0, 5, "backward"), 1, 29), 1: seen(beat(1, 5, "forward"), 2, 29.9)}
    assert find_stall(ranks, 1000.0, 30) is None


def test_a_frozen_rank_is_named_before_ranks_that_wait_for_it() -> None:
    # rank 1 froze (its watchdog thread stopped too); ranks 0 and 2 wait in a collective,
    # their threads alive but their training stuck just as long
    ranks = {
        0: seen(beat(0, 7, "backward"), 1, 40),
        1: seen(beat(1, 7, "backward"), 35, 35),
        2: seen(beat(2, 6, "data"), 2, 40),
    }
    stall = find_stall(ranks, 1000.0, 30)
    assert (stall.rank, stall.host, stall.frozen, stall.phase) == (1, "h1", True, "backward")
    assert "stopped responding" in stall.line(Path("/r"))


def test_among_live_stuck_ranks_the_one_furthest_behind_is_named() -> None:
    # all alive; rank 2 is stuck reading data of step 7 while the others wait in step 7's
    # gradient reduction (backward): it made the fewest phase changes
    ranks = {
        0: seen(beat(0, 7, "backward", 31), 1, 31),
        1: seen(beat(1, 7, "backward", 31), 1, 31),
        2: seen(beat(2, 7, "data", 29), 1, 45),
        3: seen(beat(3, 7, "backward", 31), 1, 31),
    }
    stall = find_stall(ranks, 1000.0, 30)
    assert (stall.rank, stall.frozen, stall.phase, stall.step) == (2, False, "data", 7)
    assert "stopped making progress" in stall.line(Path("/r"))
    ranks[3] = seen(beat(3, 6, "optimizer", 27), 1, 31)  # a step behind
    assert find_stall(ranks, 1000.0, 30).rank == 3


def test_a_rank_that_never_wrote_a_heartbeat_is_named_as_stuck_in_setup() -> None:
    ranks = {0: seen(beat(0, 0, "data"), 1, 31), 1: Seen(None, 960.0, 960.0)}
    stall = find_stall(ranks, 1000.0, 30)
    assert (stall.rank, stall.phase, stall.host) == (1, "setup", "?")


def test_the_heartbeat_adds_up_time_per_phase() -> None:
    hb = Heartbeat()
    hb.take_phase_times()
    hb.enter("data", 3)
    time.sleep(0.05)
    hb.enter("forward")
    time.sleep(0.1)
    hb.enter("backward")
    times = hb.take_phase_times()
    assert times["data"] >= 0.05 and times["forward"] >= 0.1, times
    assert times["backward"] < 0.05, times  # entered just before the count
    assert hb.state[1:3] == (3, "backward")
    assert hb.take_phase_times()["data"] == 0.0  # counted once


def test_heartbeats_are_written_six_times_per_timeout_at_most_every_30_s() -> None:
    assert heartbeat_interval(30) == 5 and heartbeat_interval(600) == 30


def watch(hosts: list[str]) -> StragglerWatch:
    """The judging half of StragglerWatch, without a process group."""
    w = StragglerWatch.__new__(StragglerWatch)
    w.streak, w.rank, w.hosts, w.run_dir = (-1, 0), 1, hosts, Path("/nonexistent")
    return w


def test_the_straggler_is_the_rank_that_arrives_last_and_is_named_after_three_intervals() -> None:
    # (step s, data wait s, forward s) per rank: rank 2 reads its data 0.3 s late
    table = [[1.0, 0.01, 0.5], [1.0, 0.02, 0.52], [1.0, 0.31, 0.5], [1.0, 0.01, 0.49]]
    w = watch(["a", "b", "c", "d"])
    results = [w.judge(table) for _ in range(6)]
    metrics = results[0][0]
    assert metrics["straggler_rank"] == 2
    assert metrics["straggler_skew_s"] == pytest.approx(0.3, abs=1e-6)  # vs the others' median
    assert metrics["data_wait_max_s"] == 0.31
    assert metrics["collective_wait_mean_s"] == pytest.approx((0.3 + 0.27 + 0 + 0.31) / 4)
    warned = [warning for _, warning in results]
    assert warned[:2] == [None, None] and warned[3:5] == [None, None]
    assert "rank 2 (host c)" in warned[2] and "data wait 0.310 s" in warned[2]
    assert warned[5] is not None  # again every three intervals while it lasts


def test_a_skew_under_five_percent_of_the_step_is_no_straggler() -> None:
    table = [[1.0, 0.01, 0.5], [1.0, 0.01, 0.54]]
    w = watch(["a", "b"])
    assert all(w.judge(table)[1] is None for _ in range(5))
    assert w.judge(table)[0]["straggler_rank"] == 1


def test_a_live_rank_in_the_first_step_gets_the_longer_first_step_timeout() -> None:
    # rank 1 has been compiling step 1 for 100 s: not a stall before the first-step timeout;
    # a frozen rank gets no such grace
    ranks = {
        0: seen(beat(0, 0, "backward", 4), 1, 100),
        1: seen(beat(1, 0, "forward", 3), 1, 100),
    }
    assert find_stall(ranks, 1000.0, 30, first_step=0, first_timeout=900) is None
    assert find_stall(ranks, 1000.0, 30).rank == 1  # without it: the one furthest behind
    ranks[1] = seen(beat(1, 0, "forward"), 40, 100)
    assert find_stall(ranks, 1000.0, 30, first_step=0, first_timeout=900).rank == 1


def test_ranks_stuck_at_the_same_place_name_no_one() -> None:
    # all three alive and stuck in step 7's backward: which one hangs the reduction is unknown
    ranks = {r: seen(beat(r, 7, "backward"), 1, 40 + r) for r in range(3)}
    stall = find_stall(ranks, 1000.0, 30)
    assert stall.tied == (0, 1) and stall.rank == 2  # silent longest, but not blamed
    line = stall.line(Path("/r"))
    assert line.startswith("stall: ranks 0, 1, 2 stopped making progress") and "no one rank" in line


def test_the_rank_named_is_the_one_the_others_wait_for_whatever_its_phase() -> None:
    # rank 0 hangs in its rank-0-only logging after step 7 (phase 'collective'); ranks 1 and 2
    # went on into step 8 and wait for it in the gradient reduction
    ranks = {
        0: seen(beat(0, 7, "collective", 40), 1, 45),
        1: seen(beat(1, 8, "backward", 43), 1, 40),
        2: seen(beat(2, 8, "backward", 43), 1, 40),
    }
    stall = find_stall(ranks, 1000.0, 30)
    assert (stall.rank, stall.tied, stall.phase) == (0, (), "collective")


def test_a_rank_that_left_on_an_error_is_never_named_and_long_phases_wait_longer() -> None:
    ranks = {0: seen(beat(0, 7, "backward"), 1, 20), 1: seen(beat(1, 7, "exited"), 500, 500)}
    assert find_stall(ranks, 1000.0, 30) is None
    # a synchronous save of a large model: rank 1 writes, rank 0 waits for it at the barrier
    ranks = {
        0: seen(beat(0, 9, "checkpoint", 41), 1, 100),
        1: seen(beat(1, 9, "checkpoint", 40), 1, 100),
    }
    assert find_stall(ranks, 1000.0, 30, first_timeout=900) is None
    assert find_stall(ranks, 1000.0, 30, first_timeout=90).rank == 1  # the save itself hung
    ranks[1] = seen(beat(1, 9, "checkpoint", 40), 40, 100)  # frozen while saving: no grace
    assert find_stall(ranks, 1000.0, 30, first_timeout=900).rank == 1
