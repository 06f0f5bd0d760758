"""The run folder: one per experiment by default (its fingerprint), one owner at a time (its
lease), and a resume that refuses another experiment's checkpoint unless told."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from coatnet_scale.checkpoint import CheckpointError, check_compatible, config_changes
from coatnet_scale.config import load_config, to_dict
from coatnet_scale.lease import LEASE_FILE, STALE_S, Lease, Owner, RunFolderBusy, read_owner
from coatnet_scale.run_folder import run_folder


def folder(*overrides: str) -> Path:
    return run_folder(load_config([], ["model.name=coatnet_debug", *overrides]))


def test_the_default_folder_is_one_per_experiment() -> None:
    base = folder()
    assert base.parent == Path("runs") and base.name.startswith("coatnet_debug-")
    assert folder() == base  # the same command, a new sbatch of it included
    # extended, re-scheduled, saved, logged or laid out differently: the same experiment
    for same in (
        "train.total_steps=500000",
        "schedule.warmup_steps=7",
        "schedule.decay=linear",
        "optim.lr=3e-4",
        "checkpoint.every_steps=10",
        "logging.log_every=1",
        "logging.wandb_mode=offline",
        "train.micro_batch_size=8",
        "zero.offload_optimizer=cpu",
        "activation_checkpointing.policy=all",
        "distributed.timeout_minutes=5",
        "data.num_workers=1",
        "train.ema_decay=0.9999",
        "spike.rollback=true",  # the recipes turned it on: their runs stay where they were
        "spike.loss_mads=8",
        "distributed.stall_timeout_s=300",
    ):
        assert folder(same) == base, same
    # anything else is another experiment, in another folder
    others = {
        folder(other)
        for other in (
            "optim.weight_decay=0.1",
            "train.seed=1",
            "train.global_batch_size=1024",
            "data.train_shards=/data/other.json",
            "data.mixup_alpha=0",
            "precision.dtype=fp32",
            "zero.stage=3",
            "model.drop_path_rate=0.2",
            "checkpoint.init_from=/runs/pretrained",
        )
    }
    assert len(others) == 9 and base not in others
    assert folder("train.run_dir=/ckpt/mine") == Path("/ckpt/mine")


def test_a_new_option_at_its_default_leaves_the_folder_where_it_was(monkeypatch) -> None:
    """Options added in a later version (with their defaults) must not move a campaign to a new
    folder, which would restart it from step 0."""
    import coatnet_scale.run_folder as run_folder_module

    cfg = load_config([], ["model.name=coatnet_debug", "optim.weight_decay=0.1"])
    before = run_folder(cfg)
    real = run_folder_module.saved_form

    def with_a_new_option(config):
        return real(config) | {"data.new_option": 0.5}  # as if the option had always existed

    monkeypatch.setattr(run_folder_module, "saved_form", with_a_new_option)
    assert run_folder(cfg) == before


def test_resuming_another_experiment_is_refused_naming_the_override(tmp_path: Path) -> None:
    from coatnet_scale.checkpoint import TrainerState

    saved = load_config([], ["model.name=coatnet_debug", "optim.weight_decay=0.05"])
    state = TrainerState.of(saved, 10, {}, 0, None, 1, 0)
    changed = ["model.name=coatnet_debug", "optim.weight_decay=0.1", "train.total_steps=90000"]
    with pytest.raises(CheckpointError) as refused:
        check_compatible(tmp_path, state, load_config([], changed))
    message = str(refused.value)
    assert "optim.weight_decay: checkpoint 0.05, this run 0.1" in message
    assert "checkpoint.allow_changes=optim.weight_decay" in message
    assert "total_steps" not in message  # free keys are not in the way
    allowed = load_config([], [*changed, "checkpoint.allow_changes=optim.weight_decay"])
    lines = check_compatible(tmp_path, state, allowed)
    assert any(line.startswith("optim.weight_decay") for line in lines)
    assert any(line.startswith("train.total_steps") for line in lines)
    # a prefix allows the keys under it; the model never (the checkpoint cannot load)
    assert not config_changes(
        state.config, load_config([], [*changed, "checkpoint.allow_changes=optim"])
    ).guarded
    # the initial weights matter only to a fresh run: a resume without init_from is no change
    finetune = load_config([], ["model.name=coatnet_debug", "checkpoint.init_from=/w.safetensors"])
    assert not config_changes(
        to_dict(finetune), load_config([], ["model.name=coatnet_debug"])
    ).guarded
    other_model = load_config([], ["model.name=coatnet0", "checkpoint.allow_changes=model"])
    assert config_changes(state.config, other_model).blocking


def test_an_option_the_checkpoint_predates_is_not_a_change() -> None:
    cfg = load_config([], ["model.name=coatnet_debug"])
    saved = to_dict(cfg)
    del saved["data"]["hflip"]  # as if written before the option existed
    changes = config_changes(saved, cfg)
    assert not changes.guarded and any(x.startswith("data.hflip") for x in changes.allowed)


def test_a_second_run_on_a_live_folder_is_refused_naming_the_owner(tmp_path: Path) -> None:
    first = Lease.take(tmp_path, print)
    try:
        owner = read_owner(tmp_path)
        assert owner is not None and owner.pid == os.getpid()
        assert owner.host == socket.gethostname()
        # another process on this host tries the same folder
        probe = (
            "import sys; from pathlib import Path; from coatnet_scale.lease import Lease\n"
            "Lease.take(Path(sys.argv[1]), print)"
        )
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True
        )
        assert proc.returncode != 0
        assert "RunFolderBusy" in proc.stderr
        assert f"is in use by another run (pid {os.getpid()} on {owner.host}" in proc.stderr
        assert time.monotonic() - started < 60  # refused at once, not after a timeout
    finally:
        first.release()
    assert not (tmp_path / LEASE_FILE).exists()  # released on the way out


def plant(run: Path, **fields) -> Owner:
    """A lease as another run would have left it."""
    owner = replace(Owner.me(), token="planted", **fields)
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_FILE).write_text(json.dumps(asdict(owner)))
    return owner


def test_a_lease_whose_owner_is_gone_is_taken_over_with_a_message(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    messages: list[str] = []
    # SIGKILLed on this host: its process is gone
    plant(tmp_path / "a", pid=dead.pid)
    Lease.take(tmp_path / "a", messages.append).release()
    assert f"its process {dead.pid} on" in messages[-1]
    # an earlier attempt of this SLURM job, on another node; the same attempt (another run in
    # the same allocation) is refused
    os.environ.update(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="2")
    try:
        plant(tmp_path / "b", host="node-that-died", pid=1, job="4242", attempt=1)
        Lease.take(tmp_path / "b", messages.append).release()
        assert "earlier attempt (1) of SLURM job 4242" in messages[-1]
        plant(tmp_path / "b2", host="other-node", pid=1, job="4242", attempt=2)
        with pytest.raises(RunFolderBusy, match="SLURM job 4242"):
            Lease.take(tmp_path / "b2", messages.append)
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]
    # another node whose heartbeat (the lease file's modification time) stopped
    old = time.time() - STALE_S - 5
    plant(tmp_path / "c", host="frozen-node", pid=1)
    os.utime(tmp_path / "c" / LEASE_FILE, (old, old))
    Lease.take(tmp_path / "c", messages.append).release()
    assert "heartbeat is" in messages[-1]
    # another node that is alive: refused
    plant(tmp_path / "d", host="busy-node", pid=1, job="77")
    with pytest.raises(RunFolderBusy, match="pid 1 on busy-node, SLURM job 77"):
        Lease.take(tmp_path / "d", messages.append)
    assert read_owner(tmp_path / "d").token == "planted"  # untouched


def test_an_owner_whose_lease_was_taken_over_knows_it_and_leaves_it(tmp_path: Path) -> None:
    lease = Lease.take(tmp_path, print)
    written = (tmp_path / LEASE_FILE).read_text()
    os.utime(tmp_path / LEASE_FILE, (1.0, 1.0))
    lease.renew()
    assert lease.lost is None
    beat = read_owner(tmp_path)
    assert beat is not None and beat.heartbeat >= lease.owner.heartbeat  # renewed
    assert (tmp_path / LEASE_FILE).read_text() == written  # touched, never rewritten
    thief = plant(tmp_path, host="elsewhere", pid=1)
    lease.renew()
    assert lease.lost is not None and "elsewhere" in lease.lost
    lease.release()
    assert read_owner(tmp_path).token == thief.token  # not ours to remove
