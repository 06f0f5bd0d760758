"""Two CPU ranks (DeepSpeed launcher and torchrun, gloo): ZeRO stages agree, gradient
accumulation and activation checkpointing agree, bf16 runs, the non-finite guard skips together,
a loss spike rolls back exactly, bad configs fail fast."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coatnet_scale.distributed.env import free_port
from tests.data.conftest import debug_data, shard_set
from tests.processes import deepspeed_shm_files, run_bounded

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return run_bounded(args, REPO, env)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ranks")
    data = debug_data(tmp)
    names = (
        "zero0 zero1 zero2 zero3 ga1x8 ga2x4 ckpt_on ckpt_off bf16 offload offload3 compile"
        " ema ema_z3 ema_bf16"
        " compile_ckpt_all compile_ckpt_stages wd_zero3 ema_late_a ema_late_b"
        " spike0_a spike0_b spike2_a spike2_b spike3_a spike3_b straggler"
    )
    names = names.split() + NAN_RUNS
    shm_before = deepspeed_shm_files()
    proc = launch(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "tests/distributed/scenarios.py",
            str(tmp),
            ",".join(names),
            str(data),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (tmp / "shm_left.json").write_text(
        json.dumps(sorted(map(str, deepspeed_shm_files() - shm_before)))
    )
    return tmp


def losses(results: Path, name: str) -> list[float]:
    return json.loads((results / f"{name}.json").read_text())["losses"]


def test_the_deepspeed_launcher_leaves_no_shared_memory_behind(results: Path) -> None:
    """DeepSpeed's CPU all-reduce (with its launcher's LOCAL_SIZE) maps a 66 MB /dev/shm file per
    rank, RAM that nothing unlinked: a test suite's runs filled the machine's memory."""
    assert json.loads((results / "shm_left.json").read_text()) == []


def test_zero_stages_give_the_same_losses(results: Path) -> None:
    reference = losses(results, "zero0")
    assert len(reference) == 4
    for stage in ("zero1", "zero2", "zero3"):
        assert losses(results, stage) == pytest.approx(reference, rel=1e-4), stage


def test_cpu_offload_and_compile_give_the_same_losses(results: Path) -> None:
    reference = losses(results, "zero0")
    for name in ("offload", "offload3", "compile"):  # ZeRO-2 / ZeRO-3 offload, torch.compile
        assert losses(results, name) == pytest.approx(reference, rel=1e-4), name


@pytest.mark.parametrize("name", ["compile_ckpt_all", "compile_ckpt_stages"])
def test_compile_works_with_activation_checkpointing(results: Path, name: str) -> None:
    """Every checkpointing policy (none: `compile`; all blocks; the blocks of chosen stages)
    under torch.compile (inductor) through the DeepSpeed engine, on 2 ranks."""
    assert losses(results, name) == pytest.approx(losses(results, "zero0"), rel=1e-4)


def test_bf16_gradients_accumulate_in_fp32_wherever_deepspeed_allows(results: Path) -> None:
    """ZeRO 1-3 accumulate bf16 gradients in fp32 (ZeRO-1 through DeepSpeed's BF16_Optimizer);
    without ZeRO DeepSpeed refuses the mix and they stay bf16 (README, "Gradient accumulation
    precision")."""
    found = json.loads((results / "grad_accum.json").read_text())
    assert found["0"] == {"optimizer": "FP16_UnfusedOptimizer", "dtype": "torch.bfloat16"}
    assert found["1"] == {"optimizer": "BF16_Optimizer", "dtype": "torch.float32"}
    for stage, wrapper in (("2", "DeepSpeedZeroOptimizer"), ("3", "DeepSpeedZeroOptimizer_Stage3")):
        assert found[stage] == {"optimizer": wrapper, "dtype": "torch.float32"}, stage


def ema_state(results: Path, run: str, step: int) -> dict[str, torch.Tensor]:
    from coatnet_scale import checkpoint

    ckpt = results / run / "checkpoints" / checkpoint.step_name(step)
    return checkpoint.consolidated_state_dict(ckpt, use_ema=True)


@pytest.mark.parametrize("run", ["ema", "ema_bf16"])
def test_ema_equals_an_independent_average_of_the_master_weights_and_statistics(
    results: Path, run: str
) -> None:
    """The EMA saved after 4 steps (decay 0.9; ZeRO-2 fp32, ZeRO-3 bf16) equals the average
    computed here from the initial weights and each step's consolidated fp32 master weights and
    BatchNorm statistics (under bf16 an EMA of the bf16 weights would be off by ~1e-3), and
    differs from the trained weights."""
    from coatnet_scale import checkpoint
    from coatnet_scale.models import ModelConfig, build_model

    root = results / run / "checkpoints"
    torch.manual_seed(0)
    # the fp32 master weights start as the initial weights in the training dtype
    dtype = torch.bfloat16 if run == "ema_bf16" else torch.float32
    ema = {
        k: v.detach().to(dtype).float()
        for k, v in build_model(ModelConfig(name="coatnet_debug", image_size=32, num_classes=3))
        .state_dict()
        .items()
        if v.is_floating_point()
    }
    for step in range(1, 5):
        weights = checkpoint.consolidated_state_dict(root / checkpoint.step_name(step))
        for name in ema:
            ema[name] += 0.1 * (weights[name].float() - ema[name])
    saved = ema_state(results, run, 4)
    trained = checkpoint.consolidated_state_dict(root / checkpoint.step_name(4))
    assert {k for k, v in saved.items() if v.is_floating_point()} == ema.keys()
    for name, value in ema.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert max((saved[n] - trained[n].float()).abs().max().item() for n in ema) > 1e-3


def test_zero3_keeps_the_same_ema_as_zero2_each_rank_holding_its_partition(
    results: Path,
) -> None:
    from coatnet_scale import checkpoint

    """Same run under ZeRO-2 and ZeRO-3: the EMAs agree as closely as the weights themselves do
    (the stages' summation orders differ; Adam magnifies that for near-zero gradients)."""
    zero2, zero3 = ema_state(results, "ema", 4), ema_state(results, "ema_z3", 4)
    step4 = checkpoint.step_name(4)
    w2, w3 = (
        checkpoint.consolidated_state_dict(results / run / "checkpoints" / step4)
        for run in ("ema", "ema_z3")
    )
    for name, value in zero2.items():
        if value.is_floating_point():
            weights_apart = (w3[name] - w2[name]).abs().max().item()
            assert (zero3[name] - value).abs().max().item() <= weights_apart + 1e-6, name
    # partitioned: each rank's optimizer file holds half of every EMA group, not a full copy
    ckpt = results / "ema_z3" / "checkpoints" / checkpoint.step_name(4)
    sizes = []
    for path in sorted(ckpt.glob("*optim_states.pt")):
        optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        sizes.append(sum(s["ema"].numel() for s in optim["optimizer_state_dict"]["state"].values()))
    total = sum(
        v.numel() for k, v in zero2.items() if "running_" not in k and "num_batches" not in k
    )
    assert len(sizes) == 2 and all(total / 2 <= size < total / 2 + 64 for size in sizes)


@pytest.mark.parametrize("run", ["ema", "ema_z3", "ema_bf16"])
def test_ema_evaluation_is_the_evaluation_of_the_ema_weights(results: Path, run: str) -> None:
    """The logged val_ema_loss equals the cross-entropy of the exported EMA model, evaluated here
    on the validation shards in one process, and differs from the raw weights' val_loss."""
    from coatnet_scale.config import DataConfig
    from coatnet_scale.data.pipeline import build_eval_loader
    from coatnet_scale.data.transforms import Normalizer
    from coatnet_scale.models import ModelConfig, build_model

    final = json.loads((results / f"{run}.json").read_text())["final"]
    model = build_model(ModelConfig(name="coatnet_debug", image_size=32, num_classes=3)).eval()
    model.load_state_dict(ema_state(results, run, 4))
    data = DataConfig(val_shards=str(results / "data" / "val.json"), num_workers=0)
    normalizer = Normalizer(torch.device("cpu"), torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in build_eval_loader(data, 32, 4, 0, 1):
            logits = model(normalizer(batch["image"]))
            ce = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
            total += float((ce * batch["valid"]).sum())
            count += int(batch["valid"].sum())
    assert count == final["val_ema_samples"] == 9
    assert final["val_ema_loss"] == pytest.approx(total / count, rel=1e-3)
    assert abs(final["val_ema_loss"] - final["val_loss"]) > 1e-3


def test_checkpoints_are_saved_at_the_step_cadence(results: Path) -> None:
    saved = sorted(p.name for p in (results / "zero2" / "checkpoints").glob("step*"))
    assert saved == ["step00000002", "step00000004"]


def test_gradient_accumulation_matches_a_bigger_micro_batch(results: Path) -> None:
    # BatchNorm statistics are frozen in these two runs (scenarios.py): with batch statistics,
    # 2 micro-batches of 2 normalise differently from one of 4 and the runs drift apart (~6%).
    one, two = losses(results, "ga1x8"), losses(results, "ga2x4")
    assert two == pytest.approx(one, rel=1e-4)


def test_activation_checkpointing_does_not_change_losses(results: Path) -> None:
    assert losses(results, "ckpt_on") == pytest.approx(losses(results, "ckpt_off"), rel=1e-6)


def test_bf16_trains(results: Path) -> None:
    """Four logged steps, finite, and within bf16's precision of the fp32 run."""
    bf16, fp32 = losses(results, "bf16"), losses(results, "ckpt_off")
    assert len(bf16) == len(fp32) == 4 and all(math.isfinite(x) for x in bf16)
    assert bf16 == pytest.approx(fp32, rel=0.05)


NAN_RUNS = [f"nan_z{stage}_{dtype}" for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16")]


def training_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DeepSpeed files (weights, fp32 masters, Adam moments,
    step counts), by path, but the BatchNorm statistics (a forward updates them, skipped step
    or not) and the RNG states."""
    found: dict[str, torch.Tensor] = {}

    def walk(value, path: str) -> None:
        if isinstance(value, torch.Tensor):
            if not any(s in path for s in ("running_mean", "running_var", "num_batches")):
                found[path] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{path}/{i}")

    for file in sorted(ckpt.glob("*.pt")):
        walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return found


@pytest.mark.parametrize("name", NAN_RUNS)
def test_a_nonfinite_step_changes_nothing_on_any_stage_and_precision(
    results: Path, name: str
) -> None:
    """A NaN loss on rank 1 at step 2: weights, fp32 master weights, Adam moments and step
    counts are bitwise those of step 1 on every rank; one skip is counted; step 3 trains."""
    from coatnet_scale import checkpoint

    run = json.loads((results / f"{name}.json").read_text())
    assert run["final"]["skipped_steps"] == 1
    assert len(run["losses"]) == 3 and math.isnan(run["losses"][1])
    assert math.isfinite(run["losses"][2]) and math.isfinite(run["final"]["val_top1"])
    root = results / name / "checkpoints"
    step1, step2, step3 = (training_state(root / checkpoint.step_name(s)) for s in (1, 2, 3))
    assert step1 and step1.keys() == step2.keys()
    changed = [k for k in step1 if not torch.equal(step1[k], step2[k])]
    assert not changed, changed[:5]
    moved = [k for k in step2 if not torch.equal(step2[k], step3[k])]
    assert moved  # the next step does update
    # AdamW counted the 2 applied steps, on every stage (DeepSpeed's FP16_UnfusedOptimizer, bf16
    # without ZeRO, takes a set-up step of its own that engine.discard_setup_step undoes)
    counts = {float(v) for k, v in step3.items() if k.endswith("/step") and v.numel() == 1}
    assert counts == {2.0}, counts


def test_a_finite_run_never_skips(results: Path) -> None:
    for name in ("zero0", "zero1", "zero2", "zero3", "bf16", "offload3"):
        assert json.loads((results / f"{name}.json").read_text())["final"]["skipped_steps"] == 0


LAUNCHERS = {
    "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port"],
    "accelerate": [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
    ],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_other_launchers_train(tmp_path: Path, launcher: str) -> None:
    manifest = shard_set(tmp_path, [10, 6])
    command = [str(BIN / LAUNCHERS[launcher][0]), *LAUNCHERS[launcher][1:], str(free_port())]
    proc = launch(
        [
            *command,
            "launch/pretrain.py",
            "--model",
            "coatnet_debug",
            f"data.train_shards={manifest}",
            "data.num_workers=0",
            "model.image_size=32",
            "model.num_classes=3",
            "train.total_steps=2",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "schedule.warmup_steps=1",
            "logging.wandb_mode=disabled",
            "precision.dtype=fp32",
            f"train.run_dir={tmp_path / 'run'}",
            "logging.log_every=1",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2


def test_bad_config_fails_before_training(tmp_path: Path) -> None:
    proc = launch(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "launch/pretrain.py",
            "--model",
            "coatnet_debug",
            "optim.lrr=1e-3",
        ]
    )
    assert proc.returncode != 0
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in proc.stdout + proc.stderr


def test_weight_decay_groups_are_the_same_on_every_stage_and_precision(results: Path) -> None:
    """Chosen by name, not by the stored shape: a ZeRO-3 parameter is stored as shape (0,),
    and a shape rule exempted all of them (0 decayed / 140 not)."""
    groups = json.loads((results / "wd_groups.json").read_text())
    assert len(groups) == 8
    reference = groups["0/fp32"]
    assert len(reference["decay"]) > 40 and len(reference["no_decay"]) > 40
    assert "stem.conv1.weight" in reference["decay"]
    assert "stem.norm1.weight" in reference["no_decay"]
    for key, got in groups.items():
        assert got == reference, key


def test_weight_decay_shrinks_decayed_weights_only_under_zero3(results: Path) -> None:
    """Zero gradients, lr 0.1, weight decay 0.5, one ZeRO-3 step: decayed weights shrink by
    exactly 1 - 0.05; norms, biases and relative-position tables stay as they were."""
    from coatnet_scale import checkpoint
    from coatnet_scale.models import ModelConfig, build_model

    after = checkpoint.consolidated_state_dict(
        results / "wd_zero3" / "checkpoints" / checkpoint.step_name(1)
    )
    torch.manual_seed(0)  # train.seed: every stage starts from these weights
    initial = build_model(ModelConfig(name="coatnet_debug", image_size=32, num_classes=3))
    before = dict(initial.named_parameters())
    exempt = initial.no_weight_decay()
    shrunk = [n for n in before if n not in exempt]
    assert shrunk and exempt
    for name in shrunk:
        torch.testing.assert_close(after[name], before[name].detach() * (1 - 0.1 * 0.5))
    for name in exempt:
        assert torch.equal(after[name], before[name].detach()), name


def test_an_ema_started_on_resume_starts_from_the_loaded_weights(results: Path) -> None:
    """Resuming a checkpoint without EMA: the EMA begins at the loaded step-3 weights (it was
    built before loading, from the freshly initialised ones), so after one more step it is
    0.9 w3 + 0.1 w4."""
    from coatnet_scale import checkpoint

    root = results / "ema_late" / "checkpoints"
    w3 = checkpoint.consolidated_state_dict(root / checkpoint.step_name(3))
    w4 = checkpoint.consolidated_state_dict(root / checkpoint.step_name(4))
    saved = ema_state(results, "ema_late", 4)
    for name, value in saved.items():
        if not value.is_floating_point():
            continue
        expected = w3[name].float() + 0.1 * (w4[name].float() - w3[name].float())
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["spike0", "spike2", "spike3"])
def test_a_loss_spike_rolls_back_past_its_samples_like_a_run_told_up_front(
    results: Path, name: str
) -> None:
    """Two samples of step 10 carry a 1e4 times larger loss (faults.hooks). The
    run rolls back once, to its step-8 in-memory snapshot, skips exactly step 10's slots (naming
    their samples), cools the LR from step 9 and finishes; its weights and EMA equal, bitwise, a
    run that started with that record and never saw the bad samples (ZeRO-0 fp32 with our
    optimizer, ZeRO-2 fp32, ZeRO-3 bf16)."""
    from coatnet_scale import checkpoint
    from coatnet_scale.spikes import read_rollbacks

    rolled, told = results / f"{name}_a", results / f"{name}_b"
    [rollback] = read_rollbacks(rolled)
    assert (rollback.spike_step, rollback.to_step, rollback.slots) == (10, 8, (72, 80))
    assert len(rollback.keys) == 8 and rollback.reason.startswith("loss ")
    assert read_rollbacks(told) == [rollback]  # the told run spiked nowhere
    # the first pass of steps 9-10 moved aside; the spike's loss was thousands of times normal
    first_pass = [json.loads(line) for line in (rolled / "metrics.rewound.jsonl").open()]
    assert [r["step"] for r in first_pass if "loss" in r] == [9, 10]
    assert first_pass[-1]["rolled_back"] == 1 and first_pass[-1]["loss"] > 1000
    metrics = [json.loads(line) for line in (rolled / "metrics.jsonl").open()]
    steps = [r["step"] for r in metrics if "loss" in r]
    assert steps == list(range(1, 15))
    lrs = {r["step"]: r["lr"] for r in metrics if "lr" in r}
    assert lrs[9] == pytest.approx(0.1 * first_pass[0]["lr"])  # the cooldown from step 9
    ckpt = checkpoint.step_name(14)
    for use_ema in (False, True):
        a = checkpoint.consolidated_state_dict(rolled / "checkpoints" / ckpt, use_ema=use_ema)
        b = checkpoint.consolidated_state_dict(told / "checkpoints" / ckpt, use_ema=use_ema)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (use_ema, key)
    state = json.loads((rolled / "checkpoints" / ckpt / "trainer_state.json").read_text())
    assert state["data"]["skipped"] == [[72, 80]]
    assert state["data"]["samples_consumed"] == 15 * 8  # 14 steps and the skipped one


def test_a_slow_rank_is_named_with_its_skew(results: Path) -> None:
    """Rank 1's forward takes 0.2 s longer per micro-batch (scenarios.slow_rank1): every log
    interval names it the slowest, with a skew near 0.2 s per step (one micro-batch per step)
    and rank 0 waiting for it in the collective; after three intervals in a row a warning names
    it and its host, in RUN/stragglers.jsonl."""
    from coatnet_scale.stragglers import STRAGGLERS_FILE
    from tests.distributed.scenarios import SLOW_S

    run = results / "straggler"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    intervals = [r for r in records if "straggler_rank" in r]
    assert [r["step"] for r in intervals] == [2, 4, 6, 8, 10, 12]
    for r in intervals:
        assert r["straggler_rank"] == 1, r
        assert 0.5 * SLOW_S < r["straggler_skew_s"] < 2 * SLOW_S, r
        assert r["collective_wait_mean_s"] == pytest.approx(r["straggler_skew_s"] / 2)
    warnings = [json.loads(line) for line in (run / STRAGGLERS_FILE).open()]
    assert [w["rank"] for w in warnings] == [1, 1]  # after 3 intervals, again after 6
    assert "straggler: rank 1 (host " in warnings[0]["warning"]
    assert len(warnings[0]["ranks"]) == 2
