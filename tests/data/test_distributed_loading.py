"""Two real ranks (gloo) x two loader workers on uneven shards: lockstep collectives, no hang."""

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coatnet_scale.data.pipeline import BatchPlan, TrainLoader
from coatnet_scale.data.shards import load_manifest
from coatnet_scale.data.transforms import TrainAugment
from tests.data.conftest import shard_set

pytestmark = pytest.mark.distributed

STEPS, GLOBAL, MICRO = 9, 8, 2


def _rank(rank: int, world: int, manifest_path: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    manifest = load_manifest(manifest_path)
    plan = BatchPlan(GLOBAL, MICRO, rank, world)
    loader = TrainLoader(
        [manifest],
        [1.0],
        0,
        "exact",
        plan,
        TrainAugment(16, randaugment_n=0),
        num_workers=2,
        max_bad_fraction=0.0,
    )
    keys = []
    for i, batch in enumerate(loader):
        keys.extend(batch["key"])
        if (i + 1) % plan.accumulation == 0:
            total = torch.tensor([len(keys)])
            dist.all_reduce(total)  # a rank without data would hang here
            if (i + 1) // plan.accumulation == STEPS:
                break
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_two_ranks_two_workers_uneven_shards(tmp_path: Path) -> None:
    manifest = shard_set(tmp_path, [13, 1, 6, 2, 8])  # 30 samples
    out = tmp_path / "keys.pt"
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank, args=(2, str(manifest), port, str(out)), nprocs=2, join=True)
    per_rank = torch.load(out)
    assert [len(k) for k in per_rank] == [STEPS * GLOBAL // 2] * 2  # equal counts
    steps = [
        per_rank[0][s * 4 : (s + 1) * 4] + per_rank[1][s * 4 : (s + 1) * 4] for s in range(STEPS)
    ]
    flat = [k for step in steps for k in step]
    assert len(set(flat[:30])) == 30  # first epoch: every sample exactly once
    assert len(set(flat[30:60])) == 30
