"""`checkpoint.init_from` that scales (checkpoint/init_from.py): the consolidated weights are
memory-mapped, not copied; a foreign checkpoint cannot run code when it is read; a bad source is
refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coatnet_scale.checkpoint.init_from import (
    consolidated_file,
    deepspeed_classes_allowed,
    initial_state,
    mapped_safetensors,
)
from coatnet_scale.checkpoint.layout import CheckpointError


def test_mapped_tensors_equal_the_file_and_share_its_pages(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "h": torch.randn(7).half(),
        "b": torch.randn(2, 2).bfloat16(),
        "n": torch.arange(6, dtype=torch.int64).view(2, 3),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    mapped = mapped_safetensors(path)
    reference = load_file(str(path))
    assert mapped.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    # views of the file's memory map, not copies: each tensor's data lies in the mapping
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    assert ranges, "the file is not mapped"
    for name in ("w", "h", "b", "n", "flag"):
        pointer = mapped[name].data_ptr()
        assert any(start <= pointer < end for start, end in ranges), name


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_foreign_pickle_cannot_run_code_when_read(tmp_path: Path, monkeypatch) -> None:
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False); inside the block every
    load is weights_only=True with only DeepSpeed's own small classes allowed."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload()}, path)
    with deepspeed_classes_allowed(), pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(path, weights_only=False)
    assert not (tmp_path / "pwned").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the block
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum(2), "w": torch.ones(2)}, path)
    with deepspeed_classes_allowed():
        assert torch.load(path, weights_only=False)["zero_stage"] == ZeroStageEnum(2)


def test_weights_files_are_used_as_they_are_and_bad_sources_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    assert consolidated_file(path, False, tmp_path / "run", True, print) == path
    assert torch.equal(initial_state(path)["w"], torch.ones(2))
    torch.save({"w": torch.ones(3)}, tmp_path / "w.pt")
    assert torch.equal(initial_state(tmp_path / "w.pt")["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match="init_ema needs a training checkpoint"):
        consolidated_file(path, True, tmp_path / "run", True, print)
    with pytest.raises(CheckpointError, match="no such file"):
        consolidated_file(tmp_path / "nothing", False, tmp_path / "run", True, print)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        consolidated_file(tmp_path / "empty_run", False, tmp_path / "run", True, print)


def test_a_merge_that_fails_is_an_error_for_every_rank_and_leaves_nothing(tmp_path: Path) -> None:
    """The failure note (what the other ranks wait for) is written even on a fresh run folder,
    and no weights-sized temporary file is left behind."""
    from tests.unit.test_checkpoint_files import fake_checkpoint

    fake_checkpoint(tmp_path / "src" / "checkpoints" / "step00000010", 10)  # not torch files
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="consolidating .*step00000010 failed"):
        consolidated_file(tmp_path / "src", False, run, True, print)
    assert [p.name for p in (run / "init").iterdir()] == []  # the note is removed too


def test_a_damaged_source_is_refused_after_shared_verification(tmp_path: Path) -> None:
    from tests.unit.test_checkpoint_files import fake_checkpoint

    ckpt = fake_checkpoint(tmp_path / "src" / "checkpoints" / "step00000010", 10)
    (ckpt / "rng" / "rank00000.pt").write_bytes(b"other")
    messages: list[str] = []
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        consolidated_file(tmp_path / "src", False, tmp_path / "run", True, messages.append)
    assert "rank00000.pt" in messages[0]
