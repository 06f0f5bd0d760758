"""Stalls end the job, naming the rank: heartbeats, a watchdog thread, stacks of every rank.

A rank that stops (SIGSTOP, a dead node, a hung read, a deadlock in its own code) leaves the
others inside a collective until `distributed.timeout_minutes`, and nothing says which rank it
was. So:

- **Heartbeat.** The training thread marks its phase as it goes (`Heartbeat.enter`: data,
  forward, backward, optimizer, collective, eval, checkpoint) in memory, which costs nothing.
- **Watchdog.** A daemon thread on every rank writes the heartbeat (rank, host, pid, step,
  phase, a count of phase changes, and an `alive` stamp the thread itself renews) to
  RUN/heartbeat/rank-NNNNN.json every `interval` seconds. Ranks 0 and world-1 (on different
  nodes in a multi-node job) watch the files: a rank whose `alive` stamp stops changing (the
  process is frozen or its node gone) or whose phase count stops changing (its training thread
  is stuck) for `distributed.stall_timeout_s` has stalled. Changes are timed on the watcher's
  own clock, so the hosts' clocks need not agree. Which rank is named: a frozen one first, else
  the one furthest behind (step, then phase; the others wait for it in a collective), else the
  one stuck longest.
- **Stacks and the end.** The watcher writes RUN/stall/report.json; every live rank's watchdog
  sees it and writes its own stacks (`faulthandler`, all threads) to
  RUN/stall/stacks-rank-NNNNN.txt; a live rank on the stalled rank's host takes that rank's
  stacks from outside with py-spy (a frozen or stuck process cannot write its own). The watcher
  prints one line naming the rank, host and phase, records exit code 7 (`coatnet_scale.exits`)
  for the SLURM supervisor, and every live rank exits with 7. The launcher (DeepSpeed's, srun
  --kill-on-bad-exit, torchrun) then ends the stalled rank too.

Set-up (process group, engine build, resume) happens before the watchdog starts and is not
watched; everything from the first step to the final barrier is. The attempt's first step
(`torch.compile` of a large model, the first collectives) may take longer: a live rank still in
it is given half the collective timeout instead (a frozen one is not). Heartbeat files are written
only every `interval` (at most 30 s) and read only by two ranks, so a thousand-rank job costs
the filesystem a few small writes per second.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coatnet_scale.exits import EXIT_STALLED, record_exit
from coatnet_scale.files import atomic_write_text

PHASES = ("setup", "data", "forward", "backward", "optimizer", "collective", "eval", "checkpoint")
HEARTBEAT_DIR = "heartbeat"
STALL_DIR = "stall"
REPORT = "report.json"


def heartbeat_interval(stall_timeout_s: float) -> float:
    """How often the heartbeat files are written and read: six chances per timeout, at most
    every 30 s."""
    return min(30.0, stall_timeout_s / 6)


class Heartbeat:
    """The training thread's progress. `enter` is one tuple assignment (atomic under the GIL):
    the watchdog thread reads a consistent (beats, step, phase, since) without a lock. It also
    adds up the time spent in each phase: per log interval for the straggler report
    (`take_phase_times`), and over the whole attempt for the goodput ledger (`total_s`)."""

    def __init__(self) -> None:
        self.state: tuple[int, int, str, float] = (0, 0, "setup", time.time())
        self.phase_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.total_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._mark = time.perf_counter()

    def enter(self, phase: str, step: int | None = None) -> None:
        now = time.perf_counter()
        beats, old_step, old_phase, _ = self.state
        self.phase_s[old_phase] += now - self._mark
        self.total_s[old_phase] += now - self._mark
        self._mark = now
        self.state = (beats + 1, old_step if step is None else step, phase, time.time())

    def take_phase_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (the current phase counted up to now)."""
        self.enter(self.state[2])
        times, self.phase_s = self.phase_s, dict.fromkeys(PHASES, 0.0)
        return times


@dataclass(frozen=True)
class Beat:
    """One rank's heartbeat file."""

    rank: int
    host: str
    pid: int
    token: str
    beats: int
    step: int
    phase: str
    alive: float
    node: str = ""  # SLURMD_NODENAME under SLURM: the name the supervisor excludes nodes by

    @classmethod
    def read(cls, path: Path) -> Beat | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # not there yet, or being replaced

    def where(self) -> tuple[int, int]:
        """How far this rank got: behind means waited for."""
        return self.step, PHASES.index(self.phase) if self.phase in PHASES else 0


@dataclass
class Seen:
    """What a watcher saw of one rank, on the watcher's clock."""

    beat: Beat | None = None
    alive_changed: float = 0.0
    beats_changed: float = 0.0


@dataclass(frozen=True)
class Stall:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    frozen: bool  # the whole process stopped, not only its training thread
    silent_s: float
    node: str = ""

    def line(self, run_dir: Path) -> str:
        what = (
            "stopped responding (its process is frozen or its node is gone)"
            if self.frozen
            else "stopped making progress"
        )
        return (
            f"stall: rank {self.rank} (host {self.host}, pid {self.pid}) {what} for "
            f"{self.silent_s:.0f} s, last heard in phase '{self.phase}' of step {self.step + 1}; "
            f"every rank's stacks are in {run_dir / STALL_DIR}"
        )


def find_stall(
    seen: dict[int, Seen],
    now: float,
    timeout: float,
    first_step: int = -1,
    first_timeout: float | None = None,
) -> Stall | None:
    """The rank to name, when any rank has been silent for `timeout` seconds (see the module
    docstring for the order), else None. A live rank still in the attempt's first step
    (`first_step`: compiling, the first collectives) is given `first_timeout` instead."""
    silent = []
    for rank, s in seen.items():
        frozen_s, stuck_s = now - s.alive_changed, now - s.beats_changed
        first = s.beat is None or s.beat.step <= first_step
        stuck_after = first_timeout if first and first_timeout else timeout
        if frozen_s >= timeout or stuck_s >= stuck_after:
            silent.append((rank, frozen_s >= timeout, max(frozen_s, stuck_s)))
    if not silent:
        return None

    def blame(item: tuple[int, bool, float]) -> tuple:
        rank, frozen, silent_s = item
        beat = seen[rank].beat
        where = beat.where() if beat is not None else (-1, 0)
        return (not frozen, where, -silent_s, rank)

    rank, frozen, silent_s = min(silent, key=blame)
    beat = seen[rank].beat
    if beat is None:  # never wrote a heartbeat: stuck before the first step
        return Stall(rank, "?", 0, -1, "setup", frozen, silent_s)
    return Stall(rank, beat.host, beat.pid, beat.step, beat.phase, frozen, silent_s, beat.node)


def dump_own_stacks(path: Path) -> None:
    with open(path, "w") as out:
        out.write(f"# rank stacks, pid {os.getpid()} on {socket.gethostname()}\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)


def dump_stacks_from_outside(pid: int, path: Path) -> None:
    """The stacks of another process on this host, taken with py-spy (a frozen or stuck
    process cannot write its own). `--nonblocking` reads its memory without stopping it, which
    also works on a SIGSTOPped process."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        path.write_text(f"py-spy is not installed: no stacks of pid {pid} (pip install py-spy)\n")
        return
    try:
        out = subprocess.run(
            [spy, "dump", "--nonblocking", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        path.write_text(f"# py-spy dump of pid {pid}\n{out.stdout}{out.stderr}")
    except (OSError, subprocess.SubprocessError) as err:
        path.write_text(f"py-spy dump --pid {pid} failed: {err}\n")


def create_exclusive(path: Path, text: str) -> bool:
    """Write `path` only if it does not exist yet (one writer wins); True for the winner."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return True


class Watchdog:
    """The thread described in the module docstring; `start()` once training begins, `stop()`
    after the final barrier."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        run_dir: Path,
        rank: int,
        world_size: int,
        token: str,
        stall_timeout_s: float,
        first_step: int = -1,
        first_step_timeout_s: float | None = None,
    ) -> None:
        self.heartbeat, self.run_dir, self.rank = heartbeat, run_dir, rank
        self.world_size, self.token, self.timeout = world_size, token, stall_timeout_s
        self.first_step, self.first_timeout = first_step, first_step_timeout_s
        self.interval = heartbeat_interval(stall_timeout_s)
        self.watching = rank in (0, world_size - 1)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.node = os.environ.get("SLURMD_NODENAME", "")
        self.beat_dir = run_dir / HEARTBEAT_DIR
        self.stall_dir = run_dir / STALL_DIR
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coatnet-watchdog", daemon=True)
        self.seen: dict[int, Seen] = {}

    @staticmethod
    def clear(run_dir: Path) -> None:
        """Rank 0, before the ranks start their watchdogs: an earlier attempt's RUN/stall/ is
        kept as RUN/stall.<time> (what the requeue was about), so this run's report is new."""
        old = run_dir / STALL_DIR
        if old.is_dir():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
            with contextlib.suppress(OSError):
                old.rename(run_dir / f"{STALL_DIR}.{stamp}")

    def start(self) -> Watchdog:
        self.beat_dir.mkdir(exist_ok=True)
        started = time.monotonic()
        self.seen = {r: Seen(None, started, started) for r in range(self.world_size)}
        self._write_beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.interval + 5)

    def _path(self, rank: int) -> Path:
        return self.beat_dir / f"rank-{rank:05d}.json"

    def _write_beat(self) -> None:
        beats, step, phase, _ = self.heartbeat.state
        beat = Beat(
            self.rank, self.host, self.pid, self.token, beats, step, phase, time.time(), self.node
        )
        with contextlib.suppress(OSError):  # a full or flaky filesystem: retried next interval
            atomic_write_text(self._path(self.rank), json.dumps(beat.__dict__))

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._write_beat()
            record = self._read_report()
            if record is not None:
                self._end(record, named_by_me=False)
            if self.watching:
                stall = self._check()
                if stall is not None:
                    self._report(stall)

    def _read_report(self) -> dict | None:
        """This run's stall report, once a watcher wrote it (`Watchdog.clear` moved older ones
        aside at start)."""
        try:
            record = json.loads((self.stall_dir / REPORT).read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("token") == self.token else None

    def _check(self) -> Stall | None:
        now = time.monotonic()
        for rank, seen in self.seen.items():
            beat = Beat.read(self._path(rank))
            if beat is None or beat.token != self.token:
                continue  # not written yet in this run (an older run's file is ignored)
            old = seen.beat
            if old is None or beat.alive != old.alive:
                seen.alive_changed = now
            if old is None or beat.beats != old.beats:
                seen.beats_changed = now
            seen.beat = beat
        return find_stall(self.seen, now, self.timeout, self.first_step, self.first_timeout)

    def _report(self, stall: Stall) -> None:
        self.stall_dir.mkdir(exist_ok=True)
        line = stall.line(self.run_dir)
        record = {**stall.__dict__, "line": line, "by_rank": self.rank, "token": self.token}
        named_by_me = create_exclusive(self.stall_dir / REPORT, json.dumps(record))
        self._end(self._read_report() or record, named_by_me)

    def _end(self, record: dict, named_by_me: bool) -> None:
        """Stacks (own; the stalled rank's when it lives on this host), the line, exit 7."""
        stalled = int(record["rank"])
        with contextlib.suppress(OSError):
            self.stall_dir.mkdir(exist_ok=True)
            # The stalled rank itself, when it wakes (srun sends SIGCONT before it kills),
            # writes beside the stacks taken from outside while it was stuck.
            own = "resumed.txt" if stalled == self.rank else "txt"
            dump_own_stacks(self.stall_dir / f"stacks-rank-{self.rank:05d}.{own}")
            theirs = self.stall_dir / f"stacks-rank-{stalled:05d}.txt"
            if (
                stalled != self.rank
                and record["host"] == self.host
                and create_exclusive(theirs, "")
            ):
                dump_stacks_from_outside(int(record["pid"]), theirs)
        if named_by_me:
            # the other live ranks write their stacks within an interval of seeing the report
            deadline = time.monotonic() + 2 * self.interval + 5
            while time.monotonic() < deadline:
                if len(list(self.stall_dir.glob("stacks-rank-*.txt"))) >= self.world_size:
                    break
                time.sleep(0.5)
            print(f"rank {self.rank}: {record['line']}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                node = record.get("node") or record["host"]  # SLURM's name for it, when known
                record_exit(self.run_dir, EXIT_STALLED, record["line"], record["rank"], node)
        else:
            print(
                f"rank {self.rank}: ending: rank {record['rank']} stalled "
                f"({self.stall_dir / REPORT})",
                file=sys.stderr,
                flush=True,
            )
        sys.stdout.flush()
        os._exit(EXIT_STALLED)
