"""Checkpoints with real DeepSpeed ranks on CPU: bitwise exact resume after a stop signal, elastic
resume 2->1, 2->4 and 1->2 (ZeRO 0-3 for 2->1), fallback from a damaged checkpoint, refusal of an
incompatible one, export to safetensors (our loader and timm's), fine-tuning at another resolution
and class count (ZeRO-2 and ZeRO-3).

Four launches (2, 1, 4, 2 ranks) run the scenarios of `resume_scenarios.py`; the assertions read
what they left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

from coatnet_scale import checkpoint
from coatnet_scale.models import create_model
from coatnet_scale.models.layers import resize_rel_pos_table
from tests.data.conftest import debug_data
from tests.distributed.test_training_2ranks import BIN, launch

pytestmark = pytest.mark.distributed

STEPS = 6
STEP3, STEP6 = checkpoint.step_name(3), checkpoint.step_name(6)
# bf16 2->1: measured 2.8e-4 (losses) and 5e-3 of the update size (weights; EMA 1e-3) on
# 2026-11-29; a lost optimizer state or EMA is ~2 (fp32 runs agree to 1e-6)
BF16_LOSS_REL, BF16_WEIGHTS_REL = 2e-3, 3e-2


def run_scenarios(tmp: Path, ranks: int, names: list[str]) -> str:
    proc = launch(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "tests/distributed/resume_scenarios.py",
            str(tmp),
            str(tmp / "data"),
            ",".join(names),
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def cut_back(tmp: Path, source: str, target: str, step: int) -> None:
    """A copy of run `source` as it was when its checkpoint `step` was the newest."""
    shutil.copytree(tmp / source, tmp / target)
    for ckpt in checkpoint.list_checkpoints(tmp / target / "checkpoints"):
        if checkpoint.checkpoint_step(ckpt) > step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    debug_data(tmp)  # tmp/data, read by the scenarios
    logs = {}
    logs[2] = run_scenarios(
        tmp,
        2,
        [
            "straight",
            "stop",
            "resume",
            "plain",
            "plain_z0",
            "plain_z1",
            "plain_z3",
            "plain_z1_bf16",
            "stop_z3",
            "resume_z3",
            "plain_global",
            "stop_global",
            "resume_global",
        ],
    )
    for stage in ("", "_z0", "_z1", "_z3", "_global", "_z1_bf16"):
        cut_back(tmp, f"plain{stage}", f"to1{stage}", 3)
    cut_back(tmp, "plain", "to4", 3)
    shutil.copytree(tmp / "straight", tmp / "damaged")
    victim = tmp / "damaged" / "checkpoints" / STEP6 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])  # a truncated shard in the newest checkpoint
    checkpoint.export(tmp / "plain" / "checkpoints" / STEP6, tmp / "export_plain")
    logs[1] = run_scenarios(
        tmp, 1, ["to1", "to1_z0", "to1_z1", "to1_z3", "to1_global", "to1_z1_bf16", "single"]
    )
    logs[4] = run_scenarios(tmp, 4, ["to4"])
    cut_back(tmp, "single", "single_to2", 3)
    shutil.copytree(tmp / "plain", tmp / "incompatible")
    logs["2b"] = run_scenarios(
        tmp, 2, ["to2", "damaged", "incompatible", "finetune", "finetune_z3"]
    )
    return {"tmp": tmp, "logs": logs}


def result(out: dict, name: str) -> dict:
    return json.loads((out["tmp"] / f"{name}.json").read_text())


def consumed(out: dict, name: str) -> list[tuple[int, str]]:
    """(slot, key) of every sample the scenario's ranks consumed, sorted by slot."""
    records = []
    for path in out["tmp"].glob(f"{name}.rank*.slots.json"):
        records += [tuple(r) for r in json.loads(path.read_text())]
    return sorted(records)


def weights(out: dict, run: str, step: int = 6, ema: bool = False) -> dict[str, torch.Tensor]:
    return checkpoint.consolidated_state_dict(
        out["tmp"] / run / "checkpoints" / checkpoint.step_name(step), use_ema=ema
    )


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without BatchNorm statistics: those are rank 0's own (no SyncBN), so they legitimately
    depend on how the micro-batches were spread over ranks."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def relative_difference(a: dict, b: dict, scale: float) -> float:
    """Mean absolute parameter difference, relative to `scale`."""
    a, b = parameters(a), parameters(b)
    assert a.keys() == b.keys()
    total = sum((a[k].double() - b[k].double()).abs().sum().item() for k in a)
    return total / sum(v.numel() for v in a.values()) / scale


def update_size(out: dict, run: str) -> float:
    """Mean absolute change of the parameters over steps 4-6 of `run`: what a lost optimizer
    state or a wrong step would disturb at full scale (summation-order noise is ~1e-6 of it)."""
    return relative_difference(weights(out, run, 3), weights(out, run, 6), 1.0)


# ---- exact resume ------------------------------------------------------------------------------


def test_stop_signal_stops_every_rank_after_the_same_step_with_a_checkpoint(out) -> None:
    stopped = result(out, "stop")["final"]
    assert stopped["stopped"] == 1.0 and stopped["step"] == 3.0
    ckpts = checkpoint.list_checkpoints(out["tmp"] / "stop_resume" / "checkpoints")
    assert [c.name for c in ckpts] == [STEP3, STEP6]
    assert "stop requested (SIGUSR1)" in out["logs"][2]


def test_stop_and_resume_ends_bitwise_identical_to_a_straight_run(out) -> None:
    assert_bitwise_equal(weights(out, "straight"), weights(out, "stop_resume"))
    assert_bitwise_equal(weights(out, "straight", ema=True), weights(out, "stop_resume", ema=True))
    losses = result(out, "straight")["losses"]
    assert losses == result(out, "resume")["losses"]  # all six steps, the same floats
    assert len(losses) == STEPS


def test_stop_and_resume_is_bitwise_exact_under_zero3_too(out) -> None:
    assert_bitwise_equal(weights(out, "plain_z3"), weights(out, "stop_resume_z3"))
    assert_bitwise_equal(
        weights(out, "plain_z3", ema=True), weights(out, "stop_resume_z3", ema=True)
    )
    assert result(out, "plain_z3")["losses"] == result(out, "resume_z3")["losses"]


def test_stop_and_resume_is_bitwise_exact_in_the_global_order_too(out) -> None:
    assert_bitwise_equal(weights(out, "plain_global"), weights(out, "stop_resume_global"))
    assert result(out, "plain_global")["losses"] == result(out, "resume_global")["losses"]
    straight = consumed(out, "plain_global")
    assert straight == sorted(consumed(out, "stop_global") + consumed(out, "resume_global"))
    window = consumed(out, "plain")
    assert [s for s, _ in straight] == [s for s, _ in window]  # the same slots...
    assert [k for _, k in straight] != [k for _, k in window]  # ...holding other samples


def test_stop_and_resume_reads_the_same_samples_once(out) -> None:
    straight = consumed(out, "straight")
    assert straight == sorted(consumed(out, "stop") + consumed(out, "resume"))
    assert [slot for slot, _ in straight] == list(range(STEPS * 8))


def drop_path_masks(out: dict, name: str, rank: int) -> list[list[bool]]:
    return json.loads((out["tmp"] / f"{name}.rank{rank}.masks.json").read_text())


def test_stochastic_depth_differs_between_ranks_and_repeats_on_resume(out) -> None:
    """Each rank draws its own stochastic-depth masks (a per-rank seed: with one seed for all,
    every rank dropped the same blocks at the same batch position), and a resumed run draws the
    masks the uninterrupted run drew."""
    straight = [drop_path_masks(out, "straight", rank) for rank in (0, 1)]
    assert len(straight[0]) == len(straight[1]) > 0
    assert straight[0] != straight[1]
    assert 0 < sum(map(sum, straight[0])) < sum(map(len, straight[0]))  # some dropped, not all
    for rank in (0, 1):
        resumed = drop_path_masks(out, "stop", rank) + drop_path_masks(out, "resume", rank)
        assert resumed == straight[rank]


def test_the_resumed_run_continues_the_same_wandb_run(out) -> None:
    run = out["tmp"] / "stop_resume"
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    run_id = (run / "wandb_run_id").read_text().strip()
    assert all(s.name.endswith(run_id) for s in segments)
    for step in (3, 6):
        state = checkpoint.TrainerState.read(run / "checkpoints" / checkpoint.step_name(step))
        assert state.wandb_run_id == run_id


def test_checkpoint_holds_the_documented_state(out) -> None:
    ckpt = out["tmp"] / "straight" / "checkpoints" / STEP3
    state = checkpoint.TrainerState.read(ckpt)
    assert state.step == 3 and state.world_size == 2
    assert state.data["samples_consumed"] == 24
    assert state.config["model"]["name"] == "coatnet_debug"
    assert len(state.config_hash) == 16 and state.code_version
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    manifest = checkpoint.read_manifest(ckpt)
    assert set(manifest["files"]) == set(checkpoint.files_under(ckpt))
    assert (ckpt.parent / "latest").read_text() == STEP6


# ---- elastic resume --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("to1", "plain"),
        ("to4", "plain"),
        ("to2", "plain"),
        ("to1_z0", "plain_z0"),
        ("to1_z1", "plain_z1"),
        ("to1_z3", "plain_z3"),
        ("to1_global", "plain_global"),
    ],
)
def test_elastic_resume_continues_equivalently(out, name, reference) -> None:
    """2->1, 2->4, 1->2 ranks (and ZeRO 0/1/3 for 2->1): same samples, same losses and weights
    as the uninterrupted 2-rank run up to float summation order."""
    losses, expected = result(out, name)["losses"], result(out, reference)["losses"]
    for step in ("4", "5", "6"):
        assert losses[step] == pytest.approx(expected[step], rel=1e-4), step
    scale = update_size(out, reference)
    assert relative_difference(weights(out, run_of(name)), weights(out, reference), scale) < 1e-3
    # the EMA continues (re-partitioned); restarted from the step-3 weights it is 2x the update
    # size apart (measured by removing the EMA from the universal checkpoint)
    ema, expected_ema = weights(out, run_of(name), ema=True), weights(out, reference, ema=True)
    assert relative_difference(ema, expected_ema, scale) < 1e-3
    slots = consumed(out, name)
    assert [slot for slot, _ in slots] == list(range(24, 48))
    assert slots == consumed(out, reference)[24:]


def test_bf16_zero1_checkpoints_export_and_resume_on_another_world_size(out) -> None:
    """bf16 ZeRO-1 runs DeepSpeed's BF16_Optimizer (fp32 gradient accumulation), whose files
    DeepSpeed's zero_to_fp32 cannot read: our consolidation exports them, EMA included, and the
    2->1 resume continues like the 2-rank run (bf16: to bf16 precision)."""
    ckpt = out["tmp"] / "plain_z1_bf16" / "checkpoints" / STEP6
    assert any(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    trained, ema = weights(out, "plain_z1_bf16"), weights(out, "plain_z1_bf16", ema=True)
    assert trained.keys() == ema.keys()
    assert relative_difference(trained, ema, update_size(out, "plain_z1_bf16")) > 0.1
    losses, expected = result(out, "to1_z1_bf16")["losses"], result(out, "plain_z1_bf16")["losses"]
    for step in ("4", "5", "6"):
        assert losses[step] == pytest.approx(expected[step], rel=BF16_LOSS_REL), step
    scale = update_size(out, "plain_z1_bf16")
    for ema_too in (False, True):
        got, want = (weights(out, run, ema=ema_too) for run in ("to1_z1_bf16", "plain_z1_bf16"))
        assert relative_difference(got, want, scale) < BF16_WEIGHTS_REL, ema_too


def test_an_elastic_zero3_resume_keeps_each_groups_step_count_and_weight_decay(out) -> None:
    """DeepSpeed's universal load under ZeRO-3 shared one step tensor between the parameter
    groups (AdamW counted every step twice: step 9 after 6 steps) and gave the no-decay group the
    decay of the first; both repaired in checkpoint.load."""
    ckpt = out["tmp"] / "to1_z3" / "checkpoints" / STEP6
    [optim] = ckpt.glob("*optim_states.pt")
    state = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    inner = state["optimizer_state_dict"]
    assert [float(s["step"]) for s in inner["state"].values()] == [6.0, 6.0]
    assert [g["weight_decay"] for g in inner["param_groups"]] == [0.05, 0.0]


def run_of(name: str) -> str:
    return "single_to2" if name == "to2" else name


def test_elastic_resume_converts_only_where_the_optimizer_is_partitioned(out) -> None:
    tmp = out["tmp"]
    for run in ("to1", "to4", "to1_z1", "to1_z3", "single_to2"):
        assert (tmp / run / "checkpoints" / STEP3 / "universal").is_dir(), run
    assert not (tmp / "to1_z0" / "checkpoints" / STEP3 / "universal").exists()


def test_plain_runs_do_not_depend_on_the_rank_layout(out) -> None:
    """Before the resume the 1-rank run equals the 2-rank one: the plain runs are independent of
    the rank layout, which is what makes the elastic comparison above meaningful."""
    single, plain = result(out, "single")["losses"], result(out, "plain")["losses"]
    for step in ("1", "2", "3"):
        assert single[step] == pytest.approx(plain[step], rel=1e-4)


# ---- damaged and incompatible checkpoints ------------------------------------------------------


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(out) -> None:
    root = out["tmp"] / "damaged" / "checkpoints"
    assert "checkpoint" in out["logs"]["2b"] and "is damaged" in out["logs"]["2b"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: 1000 bytes" in out["logs"]["2b"]
    assert len(list(root.glob(f"{STEP6}.damaged*"))) == 1
    assert checkpoint.verify(root / STEP6) == []
    # It resumed from step 3 and redid steps 4-6 exactly.
    assert_bitwise_equal(weights(out, "damaged"), weights(out, "straight"))


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(out) -> None:
    message = (out["tmp"] / "incompatible.error").read_text()
    assert "model.num_classes: checkpoint 3, this run 4" in message
    assert "incompatible" in message  # names the checkpoint


# ---- export and fine-tuning ----------------------------------------------------------------


def test_export_loads_in_our_factory_and_in_timm(out) -> None:
    export = out["tmp"] / "export_plain"
    trained = weights(out, "plain")
    info = json.loads((export / "config.json").read_text())
    assert info["architecture"] == "coatnet_debug" and info["step"] == 6
    for path in export.iterdir():  # teammates on a shared cluster can read it
        assert path.stat().st_mode & 0o044 == 0o044, path.name
    ours = create_model("coatnet_debug", checkpoint=export, image_size=32, num_classes=3)
    assert_bitwise_equal(ours.state_dict(), trained)
    # plain timm, one line: the export's config.json (timm's convention) has size and classes
    theirs = timm.create_model(f"local-dir:{export}", pretrained=True)
    assert theirs.num_classes == 3 and theirs.pretrained_cfg["input_size"] == (3, 32, 32)
    assert_bitwise_equal(theirs.state_dict(), trained)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), ours.eval()(x))
    # At another resolution and class count (timm's fine-tuning path): tables resized, new head.
    other = timm.create_model(f"local-dir:{export}", pretrained=True, img_size=64, num_classes=7)
    assert other.head.fc.out_features == 7 and other.image_size == 64
    assert torch.equal(other.state_dict()["stem.conv1.weight"], trained["stem.conv1.weight"])


def test_export_of_every_zero_stage_gives_the_same_model(out) -> None:
    """Merging the partitions right: the same training on another stage agrees to ~1e-4 of the
    weights' size (ZeRO-3 reduces in another order); a wrong merge would be off by ~1."""
    reference = weights(out, "plain")
    zeros = {k: torch.zeros_like(v) for k, v in reference.items()}
    scale = relative_difference(reference, zeros, 1.0)
    for stage in ("z0", "z1", "z3"):
        assert relative_difference(weights(out, f"plain_{stage}"), reference, scale) < 1e-3


def test_finetuning_starts_from_the_export_at_another_resolution_and_class_count(out) -> None:
    """The fine-tuning scenarios train with lr 1e-20: their parameters stay at the initial values,
    which must be the export's with rel-pos tables resized to the 64px grid and a new head."""
    trained = weights(out, "plain")
    for run in ("finetune", "finetune_z3"):
        assert result(out, run)["final"]["step"] == 6.0
        tuned = weights(out, run)
        for key, value in tuned.items():
            if key.startswith("head.fc."):
                assert value.shape[0] == 5
            elif key.endswith("rel_pos.table"):
                grid = ((value.shape[-2] + 1) // 2, (value.shape[-1] + 1) // 2)
                expected = resize_rel_pos_table(trained[key], grid)
                assert torch.allclose(value, expected, rtol=0, atol=1e-15), key
            elif "running_" not in key and "num_batches" not in key:
                # lr 1e-20 moves a zero-valued bias by ~1e-20, anything else not at all
                assert torch.allclose(value, trained[key], rtol=0, atol=1e-15), key
    assert "newly initialised: head.fc.weight, head.fc.bias" in out["logs"]["2b"]
