"""Stop requests: a signal asks the run to stop at the next step boundary, after a checkpoint.

A signal handler only sets a flag (nothing else is safe inside one); the training loop reads the
flag once per step and the ranks agree with one all-reduce, so every rank stops after the same
step even when only some of them were signalled (SLURM's `--signal` reaches the batch step or the
tasks depending on `B:`; `scancel --signal` reaches what it is told). SIGUSR1 is SLURM's usual
warning signal before a time limit or preemption; SIGTERM is what SLURM, Kubernetes and the
DeepSpeed launcher send before killing. A second SIGINT (Ctrl-C) still interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# RUN/stop_signal.json: the signal that stopped the run, when rank 0 got it, after which step
STOP_FILE = "stop_signal.json"


class StopRequest:
    """Installs flag-setting handlers for `STOP_SIGNALS` until `close()`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self.received_at: float | None = None  # wall clock (the SLURM job's times are too)
        self._previous: dict[signal.Signals, object] = {}
        for sig in signals:
            # Outside the main thread signal.signal raises: the signals are not ours to handle.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user means it
        self.received = signal.Signals(signum)
        self.received_at = time.time()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
