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
  the one furthest behind in program order (the fewest phase changes: every rank makes the same
  sequence of them, and the others wait for the laggard in a collective), else the
  one stuck longest.
- **Stacks and the end.** The first watcher to create RUN/stall/report.json prints one line
  naming the rank, host and phase and records exit code 7 (`coatnet_scale.exits`, with the
  rank's node for the SLURM supervisor) at once, before anything a launcher could cut short.
  Every live rank's watchdog then writes its own stacks (`faulthandler`, all threads) to
  RUN/stall/stacks-rank-NNNNN.txt, and a live rank on the stalled rank's host takes that rank's
  stacks from outside with py-spy (a frozen or stuck process cannot write its own). The naming
  watcher exits (7) last, once every live rank's stacks are in (RUN/stall/done); the others wait
  for that, so the launcher (DeepSpeed's, srun --kill-on-bad-exit, torchrun), which ends every
  rank once one exits, cuts nothing short.
- **Whom to blame.** A rank that left on an error of its own says so in its last heartbeat
  ("exited") and is never named; its error's exit record stands (the watchdog does not replace
  it). When several live ranks are stuck at the same place (phase and step) no one rank can be
  named: the line says so and no node is blamed.

Set-up (process group, engine build, resume) happens before the watchdog starts and is not
watched; everything from the first step to the final barrier is. The attempt's first step
(`torch.compile` of a large model, the first collectives) may take longer: a live rank still in
it is given half the collective timeout instead (a frozen one is not). Heartbeat files are written
only every `interval` (at most 30 s) and read only by two ranks, so a thousand-rank job costs
the filesystem a few small writes per second.
"""

from __future__ import annotations

import contextlib
import ctypes
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

from coatnet_scale.exits import EXIT_REASON_FILE, EXIT_STALLED, record_exit
from coatnet_scale.files import atomic_write_text

PHASES = (
    "setup",
    "data",
    "forward",
    "backward",
    "optimizer",
    "collective",
    "eval",
    "checkpoint",
    "exited",  # the rank left training on an error: never the one named
)
# Phases that may legitimately last long without a heartbeat (a synchronous save of a large
# model, waiting for a background save, a snapshot restore, wandb's finish, the first batch of
# an evaluation): while a live rank is in one, the first step's longer timeout applies.
LONG_PHASES = ("setup", "checkpoint", "eval")  # eval: loader start-up, a compile for eval
HEARTBEAT_DIR = "heartbeat"
STALL_DIR = "stall"
REPORT = "report.json"
DONE = "done"  # the naming watcher's marker: every live rank's stacks are in


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
        self.total_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._taken = dict(self.total_s)  # the totals at the last `take_phase_times`
        self._mark = time.perf_counter()

    def enter(self, phase: str, step: int | None = None) -> None:
        now = time.perf_counter()
        beats, old_step, old_phase, _ = self.state
        self.total_s[old_phase] += now - self._mark
        self._mark = now
        self.state = (beats + 1, old_step if step is None else step, phase, time.time())

    def take_phase_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (the current phase counted up to now)."""
        self.enter(self.state[2])
        times = {p: self.total_s[p] - self._taken[p] for p in PHASES}
        self._taken = dict(self.total_s)
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
    tied: tuple[int, ...] = ()  # other ranks stuck at the same place: no one rank to blame

    def line(self, run_dir: Path) -> str:
        stacks = f"every rank's stacks are in {run_dir / STALL_DIR}"
        if self.tied:
            ranks = ", ".join(map(str, sorted((self.rank, *self.tied))))
            return (
                f"stall: ranks {ranks} stopped making progress for {self.silent_s:.0f} s, all in "
                f"phase '{self.phase}' of step {self.step + 1}; no one rank can be named (the "
                f"stacks show where each waits); {stacks}"
            )
        what = (
            "stopped responding (its process is frozen or its node is gone)"
            if self.frozen
            else "stopped making progress"
        )
        return (
            f"stall: rank {self.rank} (host {self.host}, pid {self.pid}) {what} for "
            f"{self.silent_s:.0f} s, last heard in phase '{self.phase}' of step {self.step + 1}; "
            f"{stacks}"
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
    (`first_step`: compiling, the first collectives), or while any rank is in a long phase
    (`LONG_PHASES`), is given `first_timeout` instead; a frozen one never is."""
    silent = []
    # a rank in a long phase makes the others wait for it (at the save's barrier): all get time
    anyone_long = any(s.beat is not None and s.beat.phase in LONG_PHASES for s in seen.values())
    for rank, s in seen.items():
        if s.beat is not None and s.beat.phase == "exited":
            continue  # it left on an error of its own, which says what happened
        frozen_s, stuck_s = now - s.alive_changed, now - s.beats_changed
        long = anyone_long or s.beat is None or s.beat.step <= first_step
        stuck_after = first_timeout if long and first_timeout else timeout
        due = frozen_s >= timeout or stuck_s >= stuck_after
        # Changes are seen at poll times, each rank's file written on its own clock: ranks that
        # stopped together cross the limit up to two intervals apart. Once one crosses it, every
        # rank silent for half of it is a candidate, and the blame order below decides.
        if frozen_s >= timeout / 2 or stuck_s >= stuck_after / 2:
            silent.append((rank, frozen_s >= timeout, max(frozen_s, stuck_s), due))
    if not any(item[3] for item in silent):
        return None
    silent = [item[:3] for item in silent]

    def progress(rank: int) -> int:
        """How far the rank got in program order: every rank makes the same sequence of
        `Heartbeat.enter` calls, so the one with the fewest is the one the others wait for."""
        beat = seen[rank].beat
        return beat.beats if beat is not None else -1

    def blame(item: tuple[int, bool, float]) -> tuple:
        rank, frozen, silent_s = item
        return (not frozen, progress(rank), -silent_s, rank)

    rank, frozen, silent_s = min(silent, key=blame)
    tied = (
        ()
        if frozen
        else tuple(r for r, f, _ in silent if r != rank and progress(r) == progress(rank))
    )
    beat = seen[rank].beat
    if beat is None:  # never wrote a heartbeat: stuck before the first step
        return Stall(rank, "?", 0, -1, "setup", frozen, silent_s, "", tied)
    return Stall(
        rank, beat.host, beat.pid, beat.step, beat.phase, frozen, silent_s, beat.node, tied
    )


def dump_own_stacks(path: Path) -> None:
    """Written under a temporary name and renamed: a stacks file that exists is complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as out:
        out.write(f"# rank stacks, pid {os.getpid()} on {socket.gethostname()}\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
    os.replace(tmp, path)


def dump_stacks_from_outside(pid: int, path: Path) -> None:
    """The stacks of another process on this host, taken with py-spy (a frozen or stuck
    process cannot write its own). `--nonblocking` reads its memory without stopping it, which
    also works on a SIGSTOPped process."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        text = f"py-spy is not installed: no stacks of pid {pid} (pip install py-spy)\n"
    else:
        try:
            out = subprocess.run(
                [spy, "dump", "--nonblocking", "--pid", str(pid)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            text = f"# py-spy dump of pid {pid}\n{out.stdout}{out.stderr}"
        except (OSError, subprocess.SubprocessError) as err:
            text = f"py-spy dump --pid {pid} failed: {err}\n"
    atomic_write_text(path, text, durable=False)  # a stacks file that exists is complete


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
        kept as RUN/stall.<time> (what the requeue was about), so this run's report is new; if
        it cannot be moved, it goes (a stale report or stacks would pass for this run's)."""
        old = run_dir / STALL_DIR
        if old.is_dir():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
            try:
                old.rename(run_dir / f"{STALL_DIR}.{stamp}-{os.getpid()}")
            except OSError:  # its report and stacks would pass for this run's
                shutil.rmtree(old, ignore_errors=True)

    def start(self) -> Watchdog:
        self.beat_dir.mkdir(exist_ok=True)
        self.started_at = time.time()
        allow_stack_readers()
        started = time.monotonic()
        self.seen = {r: Seen(None, started, started) for r in range(self.world_size)}
        self._write_beat()
        self._thread.start()
        return self

    def stop(self, leaving_on_error: bool = False) -> None:
        """End the thread; a rank leaving on an error says so in its last heartbeat, so the
        watchers do not name it as stalled while the launcher ends the job."""
        self._stopped.set()
        self._thread.join(timeout=self.interval + 5)
        if leaving_on_error:
            self.heartbeat.enter("exited")
            self._write_beat()

    def _path(self, rank: int) -> Path:
        return self.beat_dir / f"rank-{rank:05d}.json"

    def _write_beat(self) -> None:
        """Replace this rank's heartbeat file. No fsync: a heartbeat is worth nothing after a
        crash, and a filesystem that stalls on fsync would stall the watchdog too."""
        beats, step, phase, _ = self.heartbeat.state
        beat = Beat(
            self.rank, self.host, self.pid, self.token, beats, step, phase, time.time(), self.node
        )
        with contextlib.suppress(OSError):  # a full or flaky filesystem: retried next interval
            atomic_write_text(self._path(self.rank), json.dumps(beat.__dict__), durable=False)

    def _run(self) -> None:
        waited_from = time.monotonic()
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            held_up = now - waited_from > self.interval + self.timeout / 3
            self._write_beat()
            record = self._read_report()
            if record is not None:
                self._follow(record)
            if self.watching:
                if held_up:
                    # this thread itself was held up (a frozen host): what it did not see in
                    # that time is no evidence against the other ranks
                    for seen in self.seen.values():
                        seen.alive_changed = seen.beats_changed = now
                stall = self._check()
                if stall is not None:
                    self._report(stall)
            waited_from = time.monotonic()

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
        """Name the stall (once: the first watcher to create the report), at once: the line and
        the exit record come before any stacks work, which a launcher may cut short. Then the
        stacks, and this rank exits last, once every live rank's stacks are in."""
        line = stall.line(self.run_dir)
        record = {**stall.__dict__, "line": line, "by_rank": self.rank, "token": self.token}
        try:
            self.stall_dir.mkdir(exist_ok=True)
            named_by_me = create_exclusive(self.stall_dir / REPORT, json.dumps(record))
        except OSError:
            named_by_me = True  # nowhere to write: say it here, and end the job anyway
        if not named_by_me:
            self._follow(self._read_report() or record)
            return
        print(f"rank {self.rank}: {line}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # a tie names no rank: no node is blamed for it
            who = (None, None) if stall.tied else (stall.rank, stall.node or stall.host)
            record_exit_once(self.run_dir, line, *who, since=self.started_at)
        self._stacks(record)
        # every rank that did not leave on its own error: its own stacks, or (the stalled one)
        # the ones taken from outside; py-spy may take up to 60 s
        expected = {r for r, s in self.seen.items() if s.beat is None or s.beat.phase != "exited"}
        deadline = time.monotonic() + 2 * self.interval + 65
        while time.monotonic() < deadline and not expected <= self._stacks_in():
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            (self.stall_dir / DONE).touch()
        self._exit()

    def _follow(self, record: dict) -> None:
        """Another watcher named the stall: write this rank's stacks, then wait for the naming
        watcher to finish collecting them (or be killed by the launcher when it exits)."""
        print(f"rank {self.rank}: stopping: {record['line']}", file=sys.stderr, flush=True)
        self._stacks(record)
        deadline = time.monotonic() + 2 * self.interval + 75
        while time.monotonic() < deadline and not (self.stall_dir / DONE).exists():
            time.sleep(0.5)
        self._exit()

    def _stacks_in(self) -> set[int]:
        """Ranks whose stacks are written (complete files only: they are renamed into place)."""
        return {
            int(path.name.split("-")[2].split(".")[0])
            for path in self.stall_dir.glob("stacks-rank-*.txt")
        }

    def _stacks(self, record: dict) -> None:
        """This rank's own stacks, and the stalled rank's when it lives on this host."""
        stalled = int(record["rank"])
        with contextlib.suppress(OSError):
            self.stall_dir.mkdir(exist_ok=True)
            # The stalled rank itself, when it wakes (srun sends SIGCONT before it kills),
            # writes beside the stacks taken from outside while it was stuck.
            own = "resumed.txt" if stalled == self.rank else "txt"
            dump_own_stacks(self.stall_dir / f"stacks-rank-{self.rank:05d}.{own}")
            theirs = self.stall_dir / f"stacks-rank-{stalled:05d}.txt"
            claim = self.stall_dir / f".py-spy-rank-{stalled:05d}.claim"  # one rank runs it
            if (
                stalled != self.rank
                and record["host"] == self.host
                and create_exclusive(claim, str(self.rank))
            ):
                dump_stacks_from_outside(int(record["pid"]), theirs)

    @staticmethod
    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STALLED)


def record_exit_once(
    run_dir: Path, line: str, rank: int | None, host: str | None, since: float
) -> None:
    """Exit code 7 for the SLURM supervisor, unless a rank of this run (a record written since
    `since`) already recorded why it left (a data or checkpoint error that left the others
    waiting): that reason stands. An older record is another run's."""
    try:
        recorded = (run_dir / EXIT_REASON_FILE).stat().st_mtime >= since
    except OSError:
        recorded = False
    if not recorded:
        record_exit(run_dir, EXIT_STALLED, line, rank, host)


def allow_stack_readers() -> None:
    """Let any process of this user read this one's stacks (py-spy from a sibling rank): with
    Yama's ptrace_scope=1, the common default, only a parent may attach otherwise
    (PR_SET_PTRACER, PR_SET_PTRACER_ANY; Linux only, a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)
