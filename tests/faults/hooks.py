"""Test-only faults patched into a training process (the library has no fault paths): by the
in-process scenarios (tests/distributed/scenarios.py) and, through sitecustomize.py, by launched
training processes."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from coatnet_scale.data.batch_augment import BatchAugment


def plant_bad_samples(slots: tuple[int, ...]) -> None:
    """The targets of these slots are scaled by 1e4, so their loss (and its gradient) is 1e4
    times a normal one, as a corrupted record's would be. Scaled pixels do not make the debug
    model spike (measured: the loss stayed at 1.15 with pixels x1e4): its BatchNorm and its
    head's LayerNorm normalise them away."""
    original = BatchAugment.__call__

    def scaled(self, crops, augment, mix, slot, labels, valid):
        images, targets = original(self, crops, augment, mix, slot, labels, valid)
        bad = torch.isin(slot, torch.tensor(slots)).to(targets.device)
        targets[bad] = targets[bad] * 1e4
        return images, targets

    BatchAugment.__call__ = scaled


def block_rank(rank: int, micro_batch: int) -> None:
    """That rank's training thread blocks forever in the forward phase of its `micro_batch`-th
    micro-batch (counted from 0), alive otherwise (its watchdog thread keeps writing): a
    deadlock or a hung read, not a frozen process."""
    original = BatchAugment.__call__
    calls = {"n": 0}

    def faulty(self, *args):
        if dist.is_initialized() and dist.get_rank() == rank:
            if calls["n"] == micro_batch:
                threading.Event().wait()
            calls["n"] += 1
        return original(self, *args)

    BatchAugment.__call__ = faulty
