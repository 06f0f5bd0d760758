"""Setup errors are found before anything starts: one line per problem naming the key, exit code
2, no process group, no run folder, an existing run's files untouched; the SLURM supervisor stops
before srun."""

from __future__ import annotations

from pathlib import Path

import pytest

from coatnet_scale.config import load_config
from coatnet_scale.preflight import setup_problems
from tests.data.conftest import shard_set


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return shard_set(tmp_path_factory.mktemp("preflight"), [6, 4])


def problems(*overrides: str, world: int = 2) -> list[str]:
    return setup_problems(load_config(model="coatnet_debug", overrides=list(overrides)), world)


def test_a_runnable_setup_has_no_problems(manifest: Path) -> None:
    assert problems(f"data.train_shards={manifest}", f"data.val_shards={manifest}") == []


def test_each_setup_error_is_one_line_naming_its_key(manifest: Path, tmp_path: Path) -> None:
    ok = f"data.train_shards={manifest}"
    cases = {
        "train.global_batch_size=64 does not split into 3 ranks x train.micro_batch_size=8": (
            [ok, "train.global_batch_size=64", "train.micro_batch_size=8"],
            3,
        ),
        "data.train_shards: no training data": ([], 2),
        f"data.train_shards={manifest.parent} is a folder: give the shard manifest JSON inside "
        f"it, e.g. {manifest}": ([f"data.train_shards={manifest.parent}"], 2),
        "data.train_shards: shard manifest": ([f"data.train_shards={tmp_path}/typo.json"], 2),
        "data.val_shards=": ([ok, f"data.val_shards={tmp_path}/val-{{0..3}}.tar"], 2),
        "train.micro_batch_size=3 is odd": (
            [ok, "train.global_batch_size=6", "train.micro_batch_size=3", "data.mixup_alpha=0.8"],
            2,
        ),
        f"checkpoint.resume={tmp_path}/gone: no such file or folder": (
            [ok, f"checkpoint.resume={tmp_path}/gone"],
            2,
        ),
        f"checkpoint.init_from={tmp_path}/w.safetensors: no such file": (
            [ok, f"checkpoint.init_from={tmp_path}/w.safetensors"],
            2,
        ),
        "checkpoint.init_ema=true takes the EMA weights of checkpoint.init_from": (
            [ok, "checkpoint.init_ema=true"],
            2,
        ),
        "precision.dtype=fp16 needs GPUs and runs on distributed.device=cpu": (
            [ok, "precision.dtype=fp16", "distributed.device=cpu"],
            2,
        ),
    }
    for expected, (overrides, world) in cases.items():
        found = problems(*overrides, world=world)
        assert len(found) == 1 and expected in found[0], (expected, found)
        assert "\n" not in found[0]
    # several problems: all of them, at once
    many = problems("train.global_batch_size=64", "train.micro_batch_size=8", world=3)
    assert len(many) == 2


def test_a_manifest_moved_away_from_its_shards_is_named(manifest: Path, tmp_path: Path) -> None:
    moved = tmp_path / "train.json"
    moved.write_text(manifest.read_text())
    [problem] = problems(f"data.train_shards={moved}")
    assert "does not exist (moved without its shards?)" in problem


def test_the_entry_point_stops_before_the_run_folder_is_touched(
    manifest: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A batch that does not split over the launcher's 3 ranks (torchrun's variables), and a typo
    in the shards path while continuing an existing run: exit 2, one line each, nothing
    created, the existing config.yaml unchanged."""
    from launch.pretrain import main

    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as info:
        main(
            ["--model", "coatnet_debug", f"data.train_shards={manifest}", f"train.run_dir={fresh}"]
        )
    assert info.value.code == 2 and not fresh.exists()
    assert capsys.readouterr().err.count("config error:") == 1

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("the config that ran\n")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--model",
                "coatnet_debug",
                f"data.train_shards={manifest.parent}/trian.json",
                "train.global_batch_size=96",
                f"train.run_dir={existing}",
            ]
        )
    assert info.value.code == 2
    assert (existing / "config.yaml").read_text() == "the config that ran\n"
    assert sorted(p.name for p in existing.iterdir()) == ["config.yaml"]
    err = capsys.readouterr().err
    assert "data.train_shards" in err and "Traceback" not in err


def test_the_slurm_supervisor_stops_before_srun(manifest: Path, monkeypatch, capsys) -> None:
    from launch.slurm import supervisor as slurm

    def no_srun(*args, **kwargs):
        raise AssertionError("srun must not start")

    monkeypatch.setattr(slurm.subprocess, "run", no_srun)
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    code = slurm.main(["--model", "coatnet_debug", f"data.train_shards={manifest}"])
    assert code == 2
    assert "config error: train.global_batch_size" in capsys.readouterr().out
