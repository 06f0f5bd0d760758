"""DeepSpeed's universal-checkpoint converter, tied to the trainer that started it.

`python -m deepspeed.checkpoint.ds_to_universal` forks worker processes. Started as a plain child
of the trainer, a SIGKILL of the trainer left the converter and its workers running (measured),
and the next start converted into the same folder while they could still write to it. So the
trainer runs the converter through this module, which

1. asks the kernel for SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`, Linux), and
   exits at once if the parent is already gone;
2. leads its own session (the trainer starts it with `start_new_session`), so the converter's
   workers are in its process group;
3. on SIGTERM kills that whole group (itself, the workers) with SIGKILL;
4. runs DeepSpeed's converter in this process.

The trainer also gives every conversion its own temporary folder (`resume.convert_to_universal`),
so even a writer that survived some other way never mixes into a new conversion.

    python -m coatnet_scale.checkpoint.converter PARENT_PID ds_to_universal-arguments...
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """SIGTERM when `parent` dies (best effort where prctl is missing); exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the trainer's own cleanup still applies
    if os.getppid() != parent:  # died before prctl took effect
        raise SystemExit(1)


def kill_group(signum: int, frame: FrameType | None) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    parent, args = int(argv[0]), argv[1:]
    signal.signal(signal.SIGTERM, kill_group)
    die_with_parent(parent)
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *args]
    ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    main(sys.argv[1:])
