"""Test-only faults for training processes started by the tests: put this folder and the
repository on PYTHONPATH and Python imports this at start-up (tests/faults/hooks.py).

- COATNET_FAULT_BAD_SLOTS="74,77": the targets of those slots are scaled by 1e4: a loss spike.
- COATNET_FAULT_STUCK="RANK:MICRO": that rank's training thread blocks forever in the forward
  phase of that micro-batch (counted from 0; with one micro-batch per step, the step).
"""

import os

if os.environ.get("COATNET_FAULT_BAD_SLOTS") or os.environ.get("COATNET_FAULT_STUCK"):
    from tests.faults.hooks import block_rank, plant_bad_samples

    if os.environ.get("COATNET_FAULT_BAD_SLOTS"):
        plant_bad_samples(tuple(int(s) for s in os.environ["COATNET_FAULT_BAD_SLOTS"].split(",")))
    if os.environ.get("COATNET_FAULT_STUCK"):
        rank, micro_batch = (int(x) for x in os.environ["COATNET_FAULT_STUCK"].split(":"))
        block_rank(rank, micro_batch)
