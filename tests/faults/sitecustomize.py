"""Test-only faults for training processes started by the tests: put this folder on PYTHONPATH
and Python imports it at start-up (the library has no fault paths of its own).

- COATNET_FAULT_BAD_SLOTS="74,77": the targets of those slots are scaled by 1e4 (their loss and
  gradient 1e4 times a normal one, as a corrupted record's would be): a loss spike.
- COATNET_FAULT_STUCK="RANK:STEP": that rank's training thread blocks forever in the forward
  phase of that step (counted from 0), alive otherwise (its watchdog thread keeps writing): a
  deadlock or a hung read, not a frozen process.
"""

import os

if os.environ.get("COATNET_FAULT_BAD_SLOTS") or os.environ.get("COATNET_FAULT_STUCK"):
    import threading

    import torch

    from coatnet_scale.data.batch_augment import BatchAugment

    bad = [int(s) for s in os.environ.get("COATNET_FAULT_BAD_SLOTS", "").split(",") if s]
    stuck = os.environ.get("COATNET_FAULT_STUCK", "")
    stuck_rank, stuck_step = (int(x) for x in stuck.split(":")) if stuck else (-1, -1)
    original = BatchAugment.__call__
    calls = {"n": 0}

    def faulty(self, crops, augment, mix, slot, labels, valid):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == stuck_rank:
            # micro-batches of this rank so far: with one micro-batch per step, the step
            if calls["n"] == stuck_step:
                threading.Event().wait()
            calls["n"] += 1
        images, targets = original(self, crops, augment, mix, slot, labels, valid)
        if bad:
            rows = torch.isin(slot, torch.tensor(bad)).to(targets.device)
            targets[rows] = targets[rows] * 1e4
        return images, targets

    BatchAugment.__call__ = faulty
