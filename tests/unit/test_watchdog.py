"""Which rank the stall watchdog names (coatnet_scale/watchdog.py), and the heartbeat's phase
clock the straggler report adds up."""

from __future__ import annotations

import time
from pathlib import Path

from coatnet_scale.watchdog import Beat, Heartbeat, Seen, find_stall, heartbeat_interval


def beat(rank: int, step: int, phase: str, host: str = "h") -> Beat:
    return Beat(rank, f"{host}{rank}", 100 + rank, "t", 1, step, phase, 0.0)


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
    # gradient reduction (backward)
    ranks = {
        0: seen(beat(0, 7, "backward"), 1, 31),
        1: seen(beat(1, 7, "backward"), 1, 31),
        2: seen(beat(2, 7, "data"), 1, 45),
        3: seen(beat(3, 7, "backward"), 1, 31),
    }
    stall = find_stall(ranks, 1000.0, 30)
    assert (stall.rank, stall.frozen, stall.phase, stall.step) == (2, False, "data", 7)
    assert "stopped making progress" in stall.line(Path("/r"))
    # a rank an earlier step behind is further behind than any phase of the current step
    ranks[3] = seen(beat(3, 6, "optimizer"), 1, 31)
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
