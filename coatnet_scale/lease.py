"""One owner per run folder: a lease in RUN/owner.json.

Two runs in one folder destroy each other: the start-up recovery of one deletes the other's
checkpoint being written, retention deletes its checkpoints, both append to one metrics file.
`flock` alone does not guard this: it is not reliable across the nodes of every shared
filesystem, and a frozen node keeps its lock. So the owner writes a lease (host, pid, SLURM job
and attempt, a random token) with O_EXCL, never rewrites it, renews its heartbeat (the file's
modification time: a late renewal can only refresh, never overwrite, a new owner's lease) every
`HEARTBEAT_S` from a thread, and removes it on any exit it survives. A second run refuses within
seconds, naming the owner. A lease is taken over, with a message, when its owner is provably
gone:

- its process no longer exists on this host (a SIGKILL, an OOM kill);
- it belongs to an earlier attempt of this SLURM job (`SLURM_RESTART_COUNT` below ours: a
  requeue runs on other nodes; two runs inside one allocation still refuse each other);
- its heartbeat is older than `STALE_S` (a dead or unreachable node elsewhere).

The owner notices if its lease was taken over while it was frozen (`lost`); the trainer then stops
before its next checkpoint instead of writing into a folder someone else now owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from coatnet_scale.checkpoint.layout import Log

LEASE_FILE = "owner.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: no live owner is that late, even on a loaded filesystem


class RunFolderBusy(RuntimeError):
    """The run folder belongs to another live run; the message names it."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    job: str  # SLURM_JOB_ID, or "" outside SLURM
    attempt: int  # SLURM_RESTART_COUNT (0 outside SLURM)
    token: str
    started: float
    heartbeat: float  # the lease file's modification time when read

    @classmethod
    def me(cls) -> Owner:
        now = time.time()
        job = os.environ.get("SLURM_JOB_ID", "")
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        return cls(socket.gethostname(), os.getpid(), job, attempt, secrets.token_hex(8), now, now)

    def describe(self, now: float) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return (
            f"pid {self.pid} on {self.host}{job}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last heartbeat "
            f"{now - self.heartbeat:.0f} s ago"
        )


def read_owner(run_dir: Path) -> Owner | None:
    """The folder's lease; None when there is none."""
    return read_lease(run_dir / LEASE_FILE)


def read_lease(path: Path) -> Owner | None:
    """A lease file; None when there is none. One being written (cut JSON) reads as an owner of
    unknown identity whose heartbeat is the file's modification time."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return Owner(**(json.loads(text) | {"heartbeat": mtime}))
    except (json.JSONDecodeError, TypeError):
        return Owner("?", -1, "", 0, "", mtime, mtime)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def gone_because(owner: Owner, me: Owner, now: float) -> str | None:
    """Why `owner` provably no longer runs, or None if it may still."""
    if owner.host == me.host and owner.pid > 0 and not process_alive(owner.pid):
        return f"its process {owner.pid} on {owner.host} is gone"
    if owner.job and owner.job == me.job and owner.attempt < me.attempt:
        return f"it is an earlier attempt ({owner.attempt}) of SLURM job {owner.job}"
    if now - owner.heartbeat > STALE_S:
        return f"its heartbeat is {now - owner.heartbeat:.0f} s old (> {STALE_S:.0f} s)"
    return None


def busy_message(run_dir: Path, owner: Owner, now: float) -> str:
    return (
        f"the run folder {run_dir} is in use by another run ({owner.describe(now)}). Wait for "
        "it to end, stop it, or train elsewhere: leave train.run_dir at auto (a folder per "
        "experiment) or name another folder"
    )


def live_owner(run_dir: Path) -> Owner | None:
    """The folder's owner if it may still be running (for a check before starting ranks)."""
    owner = read_owner(run_dir)
    if owner is None or gone_because(owner, Owner.me(), time.time()) is not None:
        return None
    return owner


def may_write(run_dir: Path) -> bool:
    """Whether this process may leave a note in `run_dir`: nobody owns it, or this run does (this
    process, or another task of this SLURM job attempt). An error before the lease was taken
    must not write into another live run's folder."""
    owner = live_owner(run_dir)
    if owner is None:
        return True
    me = Owner.me()
    same_attempt = bool(owner.job) and (owner.job, owner.attempt) == (me.job, me.attempt)
    return owner.pid == me.pid and owner.host == me.host or same_attempt


class Lease:
    """This process's ownership of a run folder; `take` it, `release` it on the way out."""

    def __init__(self, run_dir: Path, owner: Owner) -> None:
        self.run_dir, self.owner = run_dir, owner
        self.lost: str | None = None  # why the lease is no longer ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-folder-lease", daemon=True)

    @property
    def path(self) -> Path:
        return self.run_dir / LEASE_FILE

    @classmethod
    def take(cls, run_dir: Path, log: Log) -> Lease:
        """Own `run_dir` (created if needed) or raise `RunFolderBusy` naming its live owner."""
        run_dir.mkdir(parents=True, exist_ok=True)
        me = Owner.me()
        path = run_dir / LEASE_FILE
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(run_dir)
                if owner is None:
                    continue  # released meanwhile
                now = time.time()
                why = gone_because(owner, me, now)
                if why is None:
                    if owner.host == "?" and now - owner.heartbeat < 5:
                        time.sleep(1)  # being written right now
                        continue
                    raise RunFolderBusy(busy_message(run_dir, owner, now)) from None
                if cls._evict(path, owner):
                    log(f"taking over the run folder from {owner.describe(now)}: {why}")
                continue
            with os.fdopen(fd, "w") as out:
                json.dump(asdict(me), out)
                out.flush()
                os.fsync(out.fileno())
            lease = cls(run_dir, me)
            lease._thread.start()
            return lease
        raise RunFolderBusy(f"could not take the run folder {run_dir}: its owner keeps changing")

    @staticmethod
    def _evict(path: Path, judged: Owner) -> bool:
        """Move the lease judged dead aside; put it back if it changed meanwhile (another run
        took the folder first). True when the judged lease is gone."""
        aside = path.with_name(f"{LEASE_FILE}.evicted-{secrets.token_hex(4)}")
        try:
            path.rename(aside)
        except FileNotFoundError:
            return False
        moved = read_lease(aside)
        if moved is not None and moved.token != judged.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # not ours to remove: restore it (no-clobber)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def renew(self) -> None:
        """Refresh the heartbeat if the lease is still ours; otherwise record that it was lost.
        (Between the check and the touch another run may have taken the folder over: the touch
        then refreshes its lease, which is harmless, and the next renewal finds it lost.)"""
        self.lost = self.still_ours()
        if self.lost is None:
            os.utime(self.path)

    def still_ours(self) -> str | None:
        """None while the lease is this run's; otherwise why not (checked before a publish)."""
        current = read_owner(self.run_dir)
        if current is None or current.token != self.owner.token:
            holder = current.describe(time.time()) if current else "nobody"
            return f"the run folder's lease was taken over (now held by {holder})"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self.lost is None:
            with contextlib.suppress(OSError):  # a filesystem hiccup: the next beat retries
                self.renew()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        current = read_owner(self.run_dir)
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
