"""Stragglers made visible: which rank makes the others wait, by how much, and why.

Every rank leaves a step at the same moment (they meet in the gradient reduction), so wall time
per step cannot name the slow one. What differs is when each rank *arrives* at that meeting: its
data wait plus its forward pass of the step's micro-batches (under ZeRO 1/2 the first collective
of a step is in the last backward; a slow GPU is slow in forward and backward alike, so forward
is the proxy). The heartbeat (`watchdog.Heartbeat`) already times each phase; on a GPU, forward
is timed on the device with CUDA events instead (the host only queues kernels).

Every `logging.log_every` steps the ranks gather (step time, data wait, forward) per step, one
small all-gather. Arrival = data wait + forward. The slowest rank's arrival minus the median
arrival of the other ranks is the skew; a rank's collective wait is the slowest arrival minus
its own. Logged as metrics (and so to wandb): `straggler_rank`, `straggler_skew_s`,
`straggler_skew_share` (of the step time), `data_wait_max_s`, `collective_wait_mean_s`. A rank
that is the slowest for `PERSISTENT` intervals in a row with a skew of at least `SKEW_SHARE` of
the step is named in a warning (again every `PERSISTENT` intervals while it lasts) and in
RUN/stragglers.jsonl, with its host and phase times beside the median's.

Limits: under ZeRO-3 the forward holds the parameter all-gathers, so every rank's forward
includes the wait for a slow one: the skew is underestimated and the slowest may be misnamed. A
rank slow only in backward or in the optimizer step (CPU Adam under offload) is not seen. The
collective wait is derived from the arrivals, not measured.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from coatnet_scale.distributed.collectives import gather, rank_world
from coatnet_scale.watchdog import Heartbeat

PERSISTENT = 3  # log intervals in a row
SKEW_SHARE = 0.05  # of the step time: below, the slowest rank is noise, not a straggler
STRAGGLERS_FILE = "stragglers.jsonl"
TRAINING_PHASES = ("data", "forward", "backward", "optimizer", "collective")


class DeviceForwardClock:
    """Forward time on a GPU, from CUDA events around each forward (read at the log interval,
    when they have long completed); on a CPU the heartbeat's host time is exact."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> torch.cuda.Event | None:
        if not self.enabled:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start: torch.cuda.Event | None) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((start, end))

    def take(self) -> float | None:
        """Seconds of forward since the last call (None on a CPU)."""
        if not self.enabled:
            return None
        if self.pairs:
            self.pairs[-1][1].synchronize()
        seconds = sum(a.elapsed_time(b) for a, b in self.pairs) / 1000
        self.pairs.clear()
        return seconds


class StragglerWatch:
    """Gathers and judges the per-rank times each log interval (all ranks call `measure`)."""

    def __init__(
        self, heartbeat: Heartbeat, clock: DeviceForwardClock, device: torch.device, run_dir: Path
    ) -> None:
        self.heartbeat, self.clock, self.device, self.run_dir = heartbeat, clock, device, run_dir
        self.rank, self.world = rank_world()
        self.hosts = gather(socket.gethostname())
        self.streak: tuple[int, int] = (-1, 0)  # (rank, intervals in a row as the slowest)
        heartbeat.take_phase_times()  # intervals start now

    def measure(self, steps: int) -> tuple[dict[str, float], str | None]:
        """This interval's metrics (the same on every rank) and a warning naming a persistent
        straggler (or None)."""
        phases = self.heartbeat.take_phase_times()
        forward = self.clock.take()
        if self.world == 1:
            return {}, None
        forward = phases["forward"] if forward is None else forward
        per_step = max(steps, 1)
        step_s = sum(phases[p] for p in TRAINING_PHASES) / per_step  # no eval, no checkpoint
        mine = torch.tensor(
            [step_s, phases["data"] / per_step, forward / per_step],
            dtype=torch.float64,
            device=self.device,
        )
        rows = torch.zeros(self.world * 3, dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(rows, mine)  # flat: gloo wants the output 1-D
        table = rows.view(self.world, 3).cpu().tolist()
        return self.judge(table)

    def judge(self, table: list[list[float]]) -> tuple[dict[str, float], str | None]:
        arrivals = [data + forward for _, data, forward in table]
        slowest = max(range(len(arrivals)), key=arrivals.__getitem__)
        others = [row for rank, row in enumerate(table) if rank != slowest]
        step_s = statistics.median(row[0] for row in table)
        skew = arrivals[slowest] - statistics.median(row[1] + row[2] for row in others)
        share = skew / step_s if step_s > 0 else 0.0
        metrics = {
            "straggler_rank": float(slowest),
            "straggler_skew_s": skew,
            "straggler_skew_share": share,
            "data_wait_max_s": max(row[1] for row in table),
            "collective_wait_mean_s": statistics.fmean(arrivals[slowest] - a for a in arrivals),
        }
        if share < SKEW_SHARE:
            self.streak = (-1, 0)
            return metrics, None
        rank, count = self.streak
        self.streak = (slowest, count + 1 if rank == slowest else 1)
        if self.streak[1] % PERSISTENT:
            return metrics, None
        data_med = statistics.median(row[1] for row in others)
        fwd_med = statistics.median(row[2] for row in others)
        row = table[slowest]
        warning = (
            f"straggler: rank {slowest} (host {self.hosts[slowest]}) was the slowest of "
            f"{len(table)} ranks for {self.streak[1]} log intervals in a row: it reaches the "
            f"gradient reduction {skew:.3f} s per step after the other ranks' median "
            f"({share:.0%} of the {step_s:.3f} s step); data wait {row[1]:.3f} s vs their "
            f"median {data_med:.3f} s, forward {row[2]:.3f} s vs {fwd_med:.3f} s"
        )
        if self.rank == 0:
            record = {"rank": slowest, "host": self.hosts[slowest], "warning": warning}
            record |= {"ranks": [[round(x, 5) for x in r] for r in table]}
            with contextlib.suppress(OSError), open(self.run_dir / STRAGGLERS_FILE, "a") as out:
                out.write(json.dumps(record) + "\n")
        return metrics, warning
