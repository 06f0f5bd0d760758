"""Elastic conversion (`checkpoint/resume.py`, `checkpoint/converter.py`): the ranks that wait
for rank 0's conversion wait on the filesystem, so a conversion longer than the process group's
timeout completes; a conversion failure reaches every rank; and a converter dies with the
trainer that started it (SIGKILL during the conversion leaves no converter process, and the next
start converts afresh, loads and completes); a fine-tune from a training checkpoint merges it
once for all ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coatnet_scale import checkpoint
from coatnet_scale.checkpoint import resume
from coatnet_scale.checkpoint.init_from import mapped_safetensors
from coatnet_scale.checkpoint.layout import UNIVERSAL, CheckpointError
from coatnet_scale.distributed.env import free_port
from tests.data.conftest import shard_set
from tests.processes import run_bounded, stop_tree

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT_S = 3  # the process group's timeout; the fake conversion takes 3x as long


def slow_conversion(ckpt: Path) -> str | None:
    time.sleep(3 * TIMEOUT_S)
    if (ckpt / "fail").exists():
        return "the converter failed: no space left on device"
    (ckpt / UNIVERSAL).mkdir()
    return None


def _rank(rank: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    resume.convert_to_universal = slow_conversion
    try:
        plan = resume.prepare_load(Path(ckpt), saved_world=1, world=2, log=print)
        result = f"{plan.tag} {plan.universal}"
    except CheckpointError as err:
        result = f"error: {err}"
    Path(f"{out}.{rank}").write_text(result)
    dist.destroy_process_group()


@pytest.mark.parametrize("outcome", ["converted", "failed"])
def test_a_conversion_longer_than_the_collective_timeout_completes(
    tmp_path: Path, outcome: str
) -> None:
    ckpt = tmp_path / "step00000004"
    ckpt.mkdir()
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if outcome == "failed":
        (ckpt / "fail").touch()
    out = tmp_path / "result"
    mp.spawn(_rank, args=(free_port(), str(ckpt), str(out)), nprocs=2, join=True)
    results = [Path(f"{out}.{rank}").read_text() for rank in (0, 1)]
    if outcome == "converted":
        assert results == ["universal True"] * 2
    else:  # every rank raises the converter's message
        assert all(r.endswith("no space left on device") for r in results), results
    assert not list(ckpt.glob(".tmp-failed-*"))  # the note is cleaned up


def pretrain(run: Path, manifest: Path, total_steps: int, launcher: list[str]) -> list[str]:
    return [
        *launcher,
        "launch/pretrain.py",
        "--model",
        "coatnet_debug",
        "--config",
        "configs/debug.yaml",
        f"data.train_shards={manifest}",
        "data.num_workers=0",
        "model.image_size=32",
        "model.num_classes=3",
        "precision.dtype=fp32",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        f"train.total_steps={total_steps}",
        "train.eval_every=0",
        "logging.wandb_mode=disabled",
        "checkpoint.every_steps=2",
        "checkpoint.every_minutes=0",
        f"train.run_dir={run}",
    ]


def converters() -> list[int]:
    """Processes of our converter (its forked workers share its command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"coatnet_scale.checkpoint.converter" in cmdline:
            found.append(int(proc.name))
    return found


def test_a_converter_dies_with_its_trainer_and_the_next_start_converts_afresh(
    tmp_path: Path,
) -> None:
    manifest = shard_set(tmp_path / "data", [20, 12])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    two_ranks = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    first = run_bounded(pretrain(run, manifest, 4, two_ranks), REPO, env)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run / "checkpoints" / "step00000004"

    one_rank = [sys.executable]
    trainer = subprocess.Popen(
        pretrain(run, manifest, 6, one_rank),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        # inside the conversion: the converter and its two extraction workers are running
        while len(converters()) < 3:
            assert trainer.poll() is None, "the trainer ended before the conversion's workers"
            assert time.monotonic() < deadline, "no conversion workers started"
            time.sleep(0.01)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    finally:
        stop_tree(trainer)
    deadline = time.monotonic() + 30
    while converters() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert converters() == [], "converter processes outlived their trainer"
    assert not (ckpt / UNIVERSAL).exists()  # the killed conversion never published

    # The resumed run also meets a loss spike (slot 42 of step 6, tests/faults): its rollback
    # restores the in-memory snapshot of step 4 in DeepSpeed's ordinary layout, although this
    # engine loaded the universal one.
    spiking = pretrain(run, manifest, 6, one_rank)
    spiking += ["spike.rollback=true", "spike.min_history=1", "spike.snapshot_every=2"]
    faults = {"PYTHONPATH": f"{REPO / 'tests' / 'faults'}:{REPO}", "COATNET_FAULT_BAD_SLOTS": "42"}
    again = run_bounded(spiking, REPO, env | faults)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "converting" in log and "converted to" in log and "resumed from" in log
    assert "loss spike at step 6" in log and "rolled back to step 4" in log, log[-3000:]
    assert (ckpt / UNIVERSAL).is_dir() and not list(ckpt.glob(".tmp-universal*"))
    assert (run / "checkpoints" / "step00000006").is_dir()

    # A fine-tune from that run folder on 2 ranks: the checkpoint is merged once into the new
    # run's folder and both ranks start from it (mapped), not each merging it.
    tuned = tmp_path / "tuned"
    finetune = pretrain(tuned, manifest, 2, two_ranks[:-1] + [str(free_port())])
    finetune += [f"checkpoint.init_from={run}", "model.num_classes=4"]
    result = run_bounded(finetune, REPO, env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("initial weights consolidated once from") == 1
    assert "newly initialised: head.fc.weight, head.fc.bias" in log  # 3 -> 4 classes
    (merged,) = (tuned / "init").glob("step00000006-*.safetensors")
    source = checkpoint.consolidated_state_dict(run / "checkpoints" / "step00000006")
    mapped = mapped_safetensors(merged)
    assert all(torch.equal(mapped[k], source[k]) for k in source)
