"""Loss-spike rollback: back to the last good state, past the samples that spiked, at a lower LR.

Large runs spike: a step whose loss jumps far above its recent level (bad samples, an unlucky
batch on an unstable recipe), after which the run may never recover. The usual remedy is done by
hand: restart from a checkpoint before the spike, skip the data around it, lower the LR for a
while. Here it is automatic (`spike.rollback`):

- **Detection** (`SpikeDetector`), the same on every rank (the loss is the mean over ranks and
  the gradient norm is global): a loss above the median + `spike.loss_mads` x the median absolute
  deviation of the last `spike.window` steps and above `spike.loss_min_ratio` x that median, or
  a gradient norm above `spike.grad_factor` x its median over them, once `spike.min_history`
  steps are known. Spikes do not enter the history. The relative floor and the gradient factor
  depart from the plain 6-MAD / 10x rule by measurement (`bench/spike_thresholds.py`): near
  convergence the losses sit at the label-smoothing floor, the MAD collapses and a 20% rise was
  58 MADs; clean gradient norms reached 17x their median.
- **The last good state** is an in-memory snapshot (`checkpoint/snapshot.py`: DeepSpeed's own
  checkpoint captured in host memory, as the asynchronous save captures it), taken when the loop
  starts and every `spike.snapshot_every` steps, with the data position, the step guard's
  counters and the EMA of the BatchNorm statistics.
- **The rollback** restores the snapshot, and the data position skips the slots of the step that
  spiked: the sample order is addressable (`data/order.py`), so skipping is a range of slots, and
  the next step reads the slots the spiking step would have been followed by. The LR is
  multiplied by `spike.cooldown_factor` for `spike.cooldown_steps` steps from the snapshot's step,
  then returns to the schedule linearly over `spike.rampup_steps`.
- **The record** (`RUN/rollbacks.json`, every rollback with the skipped slots, sample keys and
  reason) is read when a run starts, and the skipped ranges are also in every checkpoint's data
  position: a resume, from before or after the rollback, skips the same slots and cools the LR at
  the same steps. A run started with another run's record is "told up front" and trains exactly
  as the run that rolled back (the test of this module compares their weights bitwise).
- A spike within 2 x the rollback distance of an earlier rollback's spike means skipping did not
  help: the run stops (`SpikeError`, exit code 8) with what to look at.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coatnet_scale.checkpoint.save import host_copy
from coatnet_scale.checkpoint.snapshot import Snapshot
from coatnet_scale.config import SpikeConfig
from coatnet_scale.files import atomic_write_text

ROLLBACKS_FILE = "rollbacks.json"
KEYS_SHOWN = 8  # sample keys in the log line; RUN/rollbacks.json has them all


class SpikeError(RuntimeError):
    """Loss spikes came back near the place a rollback skipped."""


@dataclass(frozen=True)
class Rollback:
    spike_step: int  # the step (counted from 1) whose loss or gradient norm spiked
    to_step: int  # the snapshot's step: training continued from there
    slots: tuple[int, int]  # the spiking step's slots [first, end), never read again
    reason: str
    keys: tuple[str, ...] = ()

    @property
    def distance(self) -> int:
        return self.spike_step - self.to_step

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollback:
        return cls(
            int(d["spike_step"]),
            int(d["to_step"]),
            (int(d["slots"][0]), int(d["slots"][1])),
            str(d["reason"]),
            tuple(d.get("keys", ())),
        )


def read_rollbacks(run_dir: Path) -> list[Rollback]:
    try:
        data = json.loads((run_dir / ROLLBACKS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [Rollback.from_dict(d) for d in data.get("rollbacks", [])]


def write_rollbacks(run_dir: Path, rollbacks: Sequence[Rollback]) -> None:
    record = {"rollbacks": [asdict(r) for r in rollbacks]}
    atomic_write_text(run_dir / ROLLBACKS_FILE, json.dumps(record, indent=1) + "\n")


def lr_factor(step: int, rollbacks: Sequence[Rollback], cfg: SpikeConfig) -> float:
    """The LR multiplier of step `step` (counted from 0): `cooldown_factor` for `cooldown_steps`
    steps from each rollback's snapshot step, then a linear return to 1 over `rampup_steps`."""
    factor = 1.0
    for rollback in rollbacks:
        since = step - rollback.to_step
        if 0 <= since < cfg.cooldown_steps:
            factor = min(factor, cfg.cooldown_factor)
        elif 0 <= since - cfg.cooldown_steps < cfg.rampup_steps:
            ramp = (since - cfg.cooldown_steps + 1) / (cfg.rampup_steps + 1)
            factor = min(factor, cfg.cooldown_factor + (1 - cfg.cooldown_factor) * ramp)
    return factor


class SpikeDetector:
    """Median/MAD of the recent losses and the median of the recent gradient norms."""

    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)

    def spike(self, loss: float, grad_norm: float | None) -> str | None:
        """Why this step is a spike, or None (then it joins the history)."""
        cfg, n = self.cfg, len(self.losses)
        if n >= cfg.min_history:
            median = statistics.median(self.losses)
            mad = statistics.median(abs(x - median) for x in self.losses)
            limit = max(median + cfg.loss_mads * mad, cfg.loss_min_ratio * median)
            if loss > limit:
                return (
                    f"loss {loss:.4g} above {limit:.4g} (the larger of median {median:.4g} + "
                    f"{cfg.loss_mads:g} x MAD {mad:.3g} and {cfg.loss_min_ratio:g} x the median, "
                    f"of the last {n} steps)"
                )
        if grad_norm is not None and math.isfinite(grad_norm):
            if len(self.grad_norms) >= cfg.min_history:
                median = statistics.median(self.grad_norms)
                if median > 0 and grad_norm > cfg.grad_factor * median:
                    return (
                        f"gradient norm {grad_norm:.4g} above {cfg.grad_factor:g} x its median "
                        f"{median:.4g} of the last {len(self.grad_norms)} steps"
                    )
            self.grad_norms.append(grad_norm)
        self.losses.append(loss)
        return None


@dataclass
class GoodState:
    """What a rollback returns to besides the engine: data position, counters, BatchNorm EMA."""

    snapshot: Snapshot
    data: dict[str, Any]
    counters: tuple[int, int, int]  # the step guard's skipped, loss_scale_skips, in_a_row
    stats_ema: dict[str, Any] | None


class SpikeRollback:
    """The loop's side of the rollback: `lr_factor` for every step, `keep` the good state at a
    step boundary, `check` a finished step (restoring the good state on a spike)."""

    def __init__(
        self,
        cfg: SpikeConfig,
        run_dir: Path,
        is_main: bool,
        engine,
        loader,
        stats_ema,
        guard,
        rollbacks: list[Rollback],
    ) -> None:
        self.cfg, self.run_dir, self.is_main = cfg, run_dir, is_main
        self.engine, self.loader, self.stats_ema, self.guard = engine, loader, stats_ema, guard
        self.rollbacks = rollbacks
        self.detector = SpikeDetector(cfg)
        self.good: GoodState | None = None

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.rollbacks, self.cfg)

    def keep_due(self, done: int) -> bool:
        return self.cfg.rollback and (self.good is None or done % self.cfg.snapshot_every == 0)

    def keep(self, done: int) -> None:
        """Snapshot the state after step `done` (all ranks together)."""
        if self.good is not None:  # freed first: never two snapshots in host memory
            self.good.snapshot.close()
            self.good = None
        guard = self.guard
        self.good = GoodState(
            Snapshot.take(self.engine, done),
            self.loader.state_dict(),
            (guard.skipped, guard.loss_scale_skips, guard.in_a_row),
            host_copy(self.stats_ema.shadow) if self.stats_ema is not None else None,
        )

    def check(
        self,
        done: int,
        loss: float,
        grad_norm: float | None,
        slots: tuple[int, int],
        gather_keys: Callable[[], list[str]],
    ) -> Rollback | None:
        """Step `done` (its slots [first, end)) is finished: on a spike, the good state is
        restored with those slots skipped, the rollback recorded and returned."""
        if not self.cfg.rollback:
            return None
        reason = self.detector.spike(loss, grad_norm)
        if reason is None:
            return None
        for earlier in self.rollbacks:
            if abs(done - earlier.spike_step) <= 2 * max(earlier.distance, 1):
                raise SpikeError(
                    f"step {done}: {reason}, within {2 * earlier.distance} steps of the step-"
                    f"{earlier.spike_step} spike that a rollback already skipped: skipping "
                    "samples did not help; lower optim.lr, raise schedule.warmup_steps or "
                    f"inspect the samples named in {self.run_dir / ROLLBACKS_FILE}"
                )
        assert self.good is not None, "a snapshot is kept when the loop starts"
        rollback = Rollback(done, self.good.snapshot.step, slots, reason, tuple(gather_keys()))
        self.rollbacks.append(rollback)
        if self.is_main:  # rank 0 only: an error here must not leave the others in a collective
            with contextlib.suppress(OSError):
                write_rollbacks(self.run_dir, self.rollbacks)
        self.restore()
        return rollback

    def restore(self) -> None:
        good = self.good
        good.snapshot.restore(self.engine)
        self.loader.load_state_dict(good.data)
        self.loader.skip([r.slots for r in self.rollbacks])
        self.guard.skipped, self.guard.loss_scale_skips, self.guard.in_a_row = good.counters
        if self.stats_ema is not None and good.stats_ema is not None:
            self.stats_ema.load(good.stats_ema)

    def describe(self, rollback: Rollback) -> str:
        first, end = rollback.slots
        shown = ", ".join(k for k in rollback.keys[:KEYS_SHOWN] if k)
        more = len(rollback.keys) - KEYS_SHOWN
        cfg = self.cfg
        return (
            f"loss spike at step {rollback.spike_step}: {rollback.reason}; rolled back to step "
            f"{rollback.to_step} (in-memory snapshot), skipping its {end - first} samples "
            f"(slots {first}-{end - 1}: {shown}{f' and {more} more' if more > 0 else ''}; all "
            f"in {self.run_dir / ROLLBACKS_FILE}); LR x{cfg.cooldown_factor:g} for "
            f"{cfg.cooldown_steps} steps, back to the schedule over {cfg.rampup_steps}"
        )

    def close(self) -> None:
        if self.good is not None:
            self.good.snapshot.close()
