"""Checkpoint bookkeeping in one process: manifests and verification, recovery of killed saves,
fallback from damaged checkpoints, retention, resume selection, config compatibility, metrics
rewind and stop signals. (Real DeepSpeed saves are in tests/distributed.)"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from coatnet_scale import checkpoint
from coatnet_scale.checkpoint import CheckpointError, step_name
from coatnet_scale.checkpoint.__main__ import main as checkpoint_cli
from coatnet_scale.config import load_config, to_dict
from coatnet_scale.logging import rewind_metrics
from coatnet_scale.stop import StopRequest


def fake_checkpoint(folder: Path, step: int, commit: bool = True) -> Path:
    """A folder shaped like a checkpoint: two shard files and (if committed) a manifest."""
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_optim_states.pt").write_bytes(os.urandom(5000))
    (folder / "rng").mkdir()
    (folder / "rng" / "rank00000.pt").write_bytes(b"state" * 10)
    if commit:
        files = checkpoint.files_under(folder)
        checkpoint.write_manifest(folder, step, 1, checkpoint.file_records(folder, files))
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        fake_checkpoint(root / step_name(step), step)
    return root


def shard(ckpt: Path) -> Path:
    return ckpt / "zero_pp_rank_0_optim_states.pt"


def test_a_complete_checkpoint_verifies(root: Path) -> None:
    assert checkpoint.verify(root / step_name(30)) == []
    manifest = checkpoint.read_manifest(root / step_name(30))
    assert set(manifest["files"]) == {"zero_pp_rank_0_optim_states.pt", "rng/rank00000.pt"}


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "no_manifest"])
def test_verification_names_the_damage(root: Path, damage: str) -> None:
    ckpt = root / step_name(30)
    data = shard(ckpt).read_bytes()
    if damage == "truncate":
        shard(ckpt).write_bytes(data[:100])
    elif damage == "delete":
        shard(ckpt).unlink()
    elif damage == "flip":
        shard(ckpt).write_bytes(bytes([data[0] ^ 1]) + data[1:])
    else:
        (ckpt / "manifest.json").unlink()
    problems = checkpoint.verify(ckpt)
    expected = {
        "truncate": "100 bytes, expected 5000",
        "delete": "missing",
        "flip": "checksum differs",
        "no_manifest": "never completed",
    }[damage]
    assert len(problems) == 1 and expected in problems[0]
    if damage == "flip":
        assert checkpoint.verify(ckpt, checksums=False) == []  # sizes only


def test_verification_can_be_shared_between_ranks(root: Path) -> None:
    ckpt = root / step_name(30)
    shard(ckpt).unlink()
    parts = [checkpoint.verify(ckpt, part=(i, 2)) for i in range(2)]
    assert sorted(len(p) for p in parts) == [0, 1]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(root: Path) -> None:
    shard(root / step_name(30)).unlink()
    messages: list[str] = []
    assert checkpoint.newest_valid(root, True, messages.append) == root / step_name(20)
    assert "is damaged" in messages[0] and "missing" in messages[0]
    assert (root / f"{step_name(30)}.damaged").is_dir()  # kept for inspection, not deleted
    assert (root / "latest").read_text() == step_name(20)


def test_auto_resume_of_an_empty_run_starts_fresh(tmp_path: Path) -> None:
    cfg = load_config([], ["checkpoint.resume=auto"])
    assert checkpoint.find_resume(cfg.checkpoint, tmp_path / "new", print) is None


def test_resume_none_ignores_checkpoints(root: Path) -> None:
    cfg = load_config([], ["checkpoint.resume=none"])
    assert checkpoint.find_resume(cfg.checkpoint, root.parent, print) is None


def test_resume_from_an_explicit_older_checkpoint_sets_newer_ones_aside(root: Path) -> None:
    cfg = load_config([], [f"checkpoint.resume={root / step_name(20)}"])
    assert checkpoint.find_resume(cfg.checkpoint, root.parent, print) == root / step_name(20)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == [step_name(10), step_name(20)]
    assert (root / f"{step_name(30)}.superseded").is_dir()


def test_an_explicit_damaged_or_missing_checkpoint_is_an_error(root: Path) -> None:
    shard(root / step_name(20)).unlink()
    for path in (root / step_name(20), root / "step99999999"):
        cfg = load_config([], [f"checkpoint.resume={path}"])
        with pytest.raises(CheckpointError, match="checkpoint.resume"):
            checkpoint.find_resume(cfg.checkpoint, root.parent, print)


def test_recovery_rolls_a_committed_save_forward_and_removes_incomplete_ones(root: Path) -> None:
    fake_checkpoint(root / f".tmp-{step_name(40)}", 40)  # killed between commit and publish
    fake_checkpoint(root / f".tmp-{step_name(50)}", 50, commit=False)  # killed while writing
    (root / ".trash-step00000005").mkdir()  # killed while deleting
    messages: list[str] = []
    checkpoint.recover(root, messages.append)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", *(step_name(s) for s in (10, 20, 30, 40))]
    assert checkpoint.verify(root / step_name(40)) == []
    assert (root / "latest").read_text() == step_name(40)
    assert len(messages) == 2


def test_a_republished_step_leaves_no_replaced_folder_behind(root: Path) -> None:
    """A run resumed from before step 30 saves step 30 again: the old folder is moved aside
    and deleted once the new one is published; one left by a kill is cleaned up at the next
    start (deleted when superseded, put back when it is the only step 30)."""
    old = shard(root / step_name(30)).read_bytes()
    fake_checkpoint(root / f".tmp-{step_name(30)}", 30)
    checkpoint.publish(root / f".tmp-{step_name(30)}", root / step_name(30))
    assert sorted(p.name for p in root.iterdir()) == [step_name(s) for s in (10, 20, 30)]
    assert shard(root / step_name(30)).read_bytes() != old
    # killed mid-publish of a new step 20 whose files then fail verification: the old one stays
    (root / step_name(20)).rename(root / f"{step_name(20)}.replaced")
    fake_checkpoint(root / f".tmp-{step_name(20)}", 20, commit=False)
    fake_checkpoint(root / f"{step_name(30)}.replaced", 30)  # killed after the publish
    fake_checkpoint(root / f"{step_name(40)}.replaced", 40)  # stale: no step 40 being saved
    messages: list[str] = []
    checkpoint.recover(root, messages.append)
    assert len(messages) == 4  # the incomplete save, the kept step 20, two removed folders
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        *(step_name(s) for s in (10, 20, 30)),
    ]
    assert checkpoint.verify(root / step_name(20)) == []


def test_retention_keeps_the_newest_and_every_nth(tmp_path: Path) -> None:
    committed = [tmp_path / step_name(s) for s in range(100, 1100, 100)]
    doomed = checkpoint.retention(committed, keep_last=3, keep_every=500)
    assert [checkpoint.checkpoint_step(p) for p in doomed] == [100, 200, 300, 400, 600, 700]
    assert checkpoint.retention(committed[:2], keep_last=3, keep_every=0) == []


def test_config_changes_split_into_blocking_guarded_and_allowed() -> None:
    saved = to_dict(load_config([], ["model.name=coatnet0"]))
    cfg = load_config(
        [], ["model.name=coatnet1", "optim.lr=5e-4", "zero.stage=3", "optim.eps=1e-6"]
    )
    changes = checkpoint.config_changes(saved, cfg)
    blocking, allowed = changes.blocking, changes.allowed
    assert [line.split(":")[0] for line in changes.guarded] == ["optim.eps"]
    assert any(
        line.startswith("model.name: checkpoint 'coatnet0', this run 'coatnet1'")
        for line in blocking
    )
    assert any(line.startswith("zero.stage") for line in blocking)
    assert any(line.startswith("optim.lr") for line in allowed)
    assert not any(line.startswith("optim") for line in blocking)


def test_metrics_after_the_resumed_step_are_moved_aside_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # the last line cut by a kill
    assert rewind_metrics(path, 5) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()[:5]] == [1, 2, 3, 4, 5]
    assert path.read_text().endswith("\n")
    moved = (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in moved] == [6, 7]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_sets_the_flag_and_close_restores_the_handler(sig) -> None:
    """USR1: SLURM's warning before a time limit; TERM: preemption, scancel, the launchers."""
    previous = signal.getsignal(sig)
    stop = StopRequest()
    assert not stop.requested
    os.kill(os.getpid(), sig)
    assert stop.requested and stop.received == sig
    stop.close()
    assert signal.getsignal(sig) == previous


def test_cli_lists_verifies_and_reports_damage(root: Path, capsys) -> None:
    shard(root / step_name(30)).write_bytes(b"x")
    assert checkpoint_cli(["list", str(root.parent)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].endswith("ok") and "DAMAGED" in listing[2]
    assert checkpoint_cli(["verify", str(root / step_name(30))]) == 1
    assert checkpoint_cli(["verify", str(root / step_name(20))]) == 0


def test_a_data_position_this_run_cannot_continue_is_a_checkpoint_error(
    root: Path, monkeypatch
) -> None:
    """The loader refuses the saved position (another seed, order or data): the run stops with a
    checkpoint error (exit 4, not requeued), naming the checkpoint and the loader's reason."""
    from types import SimpleNamespace

    import coatnet_scale.checkpoint.resume as resume

    monkeypatch.setattr(resume, "load", lambda engine, plan: None)

    class Loader:
        def load_state_dict(self, state):
            raise ValueError("data position was saved with seed 1 / exact sampling")

    ckpt = root / step_name(30)
    saved = SimpleNamespace(data={}, skipped_steps=0, loss_scale_skips=0, world_size=1, step=30)
    start = resume.Resume(ckpt, saved, resume.LoadPlan(root, ckpt.name, universal=False))
    with pytest.raises(checkpoint.CheckpointError, match=f"{ckpt}: data position was saved"):
        start.restore(None, Loader(), None, None, print)


def test_an_asynchronous_saves_snapshot_does_not_change_with_training() -> None:
    """What a background save writes is the state at the save: the next steps change the
    optimizer's tensors and the loss scaler in place."""
    from coatnet_scale.checkpoint.save import host_copy

    class Scaler:
        def __init__(self) -> None:
            self.scale = 2.0**16

    moments, scaler = torch.ones(4), Scaler()
    state = {"state": {0: {"exp_avg": moments}}, "groups": [{"lr": 1e-3}], "scaler": scaler}
    snapshot = host_copy(state)
    moments.mul_(3)
    scaler.scale = 1.0
    state["groups"][0]["lr"] = 0.5
    assert torch.equal(snapshot["state"][0]["exp_avg"], torch.ones(4))
    assert snapshot["scaler"].scale == 2.0**16 and snapshot["groups"][0]["lr"] == 1e-3


def test_a_background_save_that_fails_is_raised_in_the_training_thread(tmp_path: Path) -> None:
    from coatnet_scale.checkpoint.save import BackgroundSaver

    class Failing:
        final = tmp_path / "step00000001"

        def run(self) -> None:
            raise OSError(28, "No space left on device")

    saver = BackgroundSaver()
    saver.start(Failing())
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        saver.wait()
    saver.wait()  # reported once


def background_job(tmp: Path, rank: int, world: int, may_publish=None):
    from coatnet_scale.checkpoint.save import SaveJob

    return SaveJob(
        tmp,
        tmp.parent / "step00000001",
        1,
        rank,
        world,
        [],
        {"python": 1},
        '{"step": 1}' if rank == 0 else None,
        None,
        3,
        0,
        print,
        background=True,
        may_publish=may_publish,
    )


def test_a_rank_whose_background_part_failed_stops_rank_0s_commit(tmp_path: Path) -> None:
    """Rank 0 waits for every rank's records in the folder: a rank that failed leaves its error
    there instead, so rank 0 reports it rather than waiting forever, and publishes nothing."""
    tmp = tmp_path / "checkpoints" / ".tmp-step00000001"
    tmp.mkdir(parents=True)
    failing = background_job(tmp, 1, 2)
    failing.write = lambda: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        failing.run()
    with pytest.raises(CheckpointError, match="rank 1 failed to write step00000001"):
        background_job(tmp, 0, 2).run()
    assert not (tmp_path / "checkpoints" / "step00000001").exists()


def test_a_background_save_does_not_publish_into_a_folder_no_longer_ours(tmp_path: Path) -> None:
    tmp = tmp_path / "checkpoints" / ".tmp-step00000001"
    tmp.mkdir(parents=True)
    job = background_job(tmp, 0, 1, may_publish=lambda: "the lease was taken over")
    with pytest.raises(CheckpointError, match="not published: the lease was taken over"):
        job.run()
    assert not (tmp_path / "checkpoints" / "step00000001").exists()
    assert not (tmp / "manifest.json").exists()
    background_job(tmp, 0, 1).run()  # ours again: committed and published
    assert checkpoint.verify(tmp_path / "checkpoints" / "step00000001") == []
