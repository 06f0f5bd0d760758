"""Single-process parts of training: rank discovery, schedule, groups, losses, DeepSpeed config,
logging, plots, dry-run plan."""

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coatnet_scale.config import load_config
from coatnet_scale.data.transforms import Normalizer
from coatnet_scale.distributed.env import dist_env, first_slurm_host, free_port, slurm_port
from coatnet_scale.guard import NonFiniteError, StepGuard
from coatnet_scale.logging import RunLogger, redact, resolve_wandb_mode
from coatnet_scale.losses import classification_loss, smooth_targets
from coatnet_scale.models import ModelConfig, build_model
from coatnet_scale.optim import lr_at, param_groups
from coatnet_scale.plots import plot_run


def test_rank_discovery_for_each_launcher() -> None:
    torch_env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n5",
        "MASTER_PORT": "1234",
    }
    e = dist_env(torch_env)
    assert (e.rank, e.local_rank, e.world_size, e.node_rank, e.launcher) == (3, 1, 8, 1, "torch")
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[12-13]",
        "SLURM_JOB_ID": "987654",
    }
    e = dist_env(slurm)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (5, 1, 8, 4)
    assert e.master_addr == "gpu12" and e.master_port == slurm_port("987654")
    assert e.export()["RANK"] == "5" and e.launcher == "slurm"
    single = dist_env({})
    assert single.world_size == 1 and single.launcher == "single"
    # no launcher: a port free now, not a fixed 29500 that a launcher's job may hold
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", single.master_port))
    assert dist_env({"MASTER_PORT": "29511"}).master_port == 29511
    assert first_slurm_host("n1,n2") == "n1" and first_slurm_host("a[3,5-7]") == "a3"


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = load_config(
        overrides=["schedule.warmup_steps=10", "train.total_steps=110", "schedule.min_lr=1e-5"]
    )
    lrs = [lr_at(s, 1e-3, cfg.schedule, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[60] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(110, 1e-3, cfg.schedule, 110) == pytest.approx(1e-5)
    linear = load_config(
        overrides=[
            "schedule.decay=linear",
            "schedule.warmup_steps=0",
            "schedule.min_lr=0",
            "train.total_steps=100",
        ]
    ).schedule
    assert lr_at(50, 1.0, linear, 100) == pytest.approx(0.5)


def test_param_groups_follow_no_weight_decay() -> None:
    model = build_model(ModelConfig(name="coatnet_debug", image_size=64), "meta")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == model.no_weight_decay()
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_losses_softmax_sigmoid_soft_targets_and_valid_mask() -> None:
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    ce = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert classification_loss(logits, labels, "softmax", 0.1) == pytest.approx(ce.item(), 1e-5)
    targets = smooth_targets(labels, 5, 1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    assert classification_loss(logits, labels, "sigmoid", 1e-4) == pytest.approx(
        bce.item() / 4, 1e-5
    )
    valid = torch.tensor([True, True, False, False])
    masked = classification_loss(logits, labels, "softmax", 0.0, valid)
    assert masked == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:2], labels[:2]).item(), 1e-5
    )
    soft = torch.softmax(torch.randn(4, 5), dim=1)
    assert torch.isfinite(classification_loss(logits, soft, "softmax", 0.1))


def test_deepspeed_config_is_generated_from_the_tree() -> None:
    from coatnet_scale.distributed.engine import to_deepspeed_config

    cfg = load_config(
        overrides=[
            "train.global_batch_size=64",
            "train.micro_batch_size=8",
            "zero.stage=3",
            "zero.offload_params=cpu",
            "zero.offload_optimizer=cpu",
            "precision.dtype=fp16",
            "optim.grad_clip=0.5",
        ]
    )
    ds = to_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    # read back the way DeepSpeed reads it: dynamic loss scaling from 2**16 (its own fused
    # default would be 2**32: ~16 more calibration skips), halving after 2 overflows, floor 1
    from deepspeed.runtime.precision_config import get_float16_config

    fp16 = get_float16_config(ds)
    assert fp16.enabled and fp16.loss_scale == 0  # 0: dynamic
    assert fp16.initial_dynamic_scale() == 2**16
    assert fp16.dynamic_loss_scale_args()["delayed_shift"] == 2
    assert fp16.dynamic_loss_scale_args()["min_scale"] == 1.0
    with pytest.raises(ValueError, match="does not split into 3 ranks"):
        to_deepspeed_config(cfg, world_size=3)


def test_logger_writes_jsonl_keeps_wandb_id_and_hides_secrets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    cfg = load_config(overrides=["logging.wandb_mode=offline"]).logging
    logger = RunLogger(cfg, tmp_path, True, {"note": "s3cr3t-value-123"}, total_steps=3)
    logger.log(1, {"loss": 2.0, "note": "token s3cr3t-value-123"})
    run_id = logger.wandb_run_id
    logger.close()
    again = RunLogger(cfg, tmp_path, True, {}, total_steps=3, start_step=1)
    assert again.wandb_run_id == run_id  # a resumed run continues the same wandb run
    again.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == 2.0 and lines[0]["step"] == 1
    everything = "".join(
        p.read_text(errors="ignore")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".jsonl", ".yaml", ".json", ".txt", ".log", "")
    )
    assert "s3cr3t-value-123" not in everything
    assert redact("a s3cr3t-value-123 b") == "a *** b"
    # the checkpoint's copy of the config too
    from coatnet_scale.checkpoint import TrainerState

    secret_cfg = load_config(overrides=["logging.wandb_entity=s3cr3t-value-123"])
    state = TrainerState.of(secret_cfg, 1, {}, 0, None, 1)
    assert "s3cr3t-value-123" not in state.to_json() and '"wandb_entity": "***"' in state.to_json()
    from coatnet_scale.checkpoint import ConfigChanges, config_changes

    # no false "changed" on resume
    assert config_changes(state.config, secret_cfg) == ConfigChanges([], [], [])


def test_a_broken_wandb_does_not_stop_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """Seen on SLURM: a preemption SIGTERM reaches wandb's service process too, and the next
    wandb call raises. The run must go on (JSONL), still knowing its wandb run id."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(overrides=["logging.wandb_mode=offline"]).logging
    logger = RunLogger(cfg, tmp_path, True, {}, total_steps=3)
    run_id = logger.wandb_run_id
    real_run = logger.wandb_run

    class Broken:
        def log(self, *args, **kwargs):
            raise ConnectionResetError("Connection lost")

    logger.wandb_run = Broken()
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 0.5})
    assert logger.wandb_run is None and logger.wandb_run_id == run_id
    assert "wandb failed (ConnectionResetError" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    logger.close()
    real_run.finish()


def test_plots_from_metrics(tmp_path: Path) -> None:
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(
                json.dumps({"step": step, "loss": 1 / step, "lr": 1e-3, "img_per_s": 10}) + "\n"
            )
        f.write(json.dumps({"step": 5, "val_top1": 0.5, "val_top5": 0.9}) + "\n")
    paths = plot_run(tmp_path)
    assert {p.name for p in paths} == {"loss.png", "lr.png", "accuracy.png", "throughput.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_dry_run_plans_coatnet7_without_allocating(capsys) -> None:
    from launch.pretrain import main

    main(["--model", "coatnet7", "--dry-run", "--world-size", "64", "zero.stage=3"])
    out = capsys.readouterr().out
    assert "coatnet7 at 224px" in out and "ZeRO-3" in out and '"stage": 3' in out
    peaks = re.findall(r"peak ([0-9.]+) GiB per rank", out)
    assert len(peaks) == 2 and float(peaks[1]) < float(peaks[0])  # checkpointing saves memory


def test_missing_training_data_is_a_clear_error(capsys) -> None:
    from launch.pretrain import main

    with pytest.raises(SystemExit) as info:
        main(["--model", "coatnet_debug"])
    assert info.value.code == 2
    assert "data.train_shards" in capsys.readouterr().err


def test_the_optimizer_keeps_the_ema_of_what_it_steps() -> None:
    """The EMA starts at the weights before the first step, follows each applied step, and
    ignores a skipped (non-finite) one; it lives in the optimizer state next to the moments."""
    from coatnet_scale.optim import EMA_KEY, GuardedAdamW

    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = GuardedAdamW([weight], lr=0.1)
    optimizer.ema_decay = 0.75
    expected = weight.detach().clone()
    for grad in ([1.0, 1.0], [0.5, -1.0], [float("nan"), 0.0], [-1.0, 2.0]):
        weight.grad = torch.tensor(grad)
        optimizer.step()
        if torch.isfinite(weight.grad).all():
            expected += 0.25 * (weight.detach() - expected)
        torch.testing.assert_close(optimizer.state[weight][EMA_KEY], expected)
    assert optimizer.state[weight].keys() == {"step", "exp_avg", "exp_avg_sq", EMA_KEY}
    assert float(optimizer.state[weight]["step"]) == 3.0
    # off: no EMA state at all
    plain = GuardedAdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    plain.param_groups[0]["params"][0].grad = torch.ones(2)
    plain.step()
    assert all(EMA_KEY not in state for state in plain.state.values())


def test_buffer_ema_tracks_and_swaps_the_batchnorm_statistics() -> None:
    from coatnet_scale.ema import BufferEma

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    ema = BufferEma(net, decay=0.5, device=torch.device("cpu"))
    assert "1.running_mean" in ema.shadow and "1.num_batches_tracked" not in ema.shadow
    net(torch.randn(8, 3, 4, 4) + 3.0)  # moves the running mean
    moved = net[1].running_mean.clone()
    ema.update(net)
    torch.testing.assert_close(ema.shadow["1.running_mean"], moved / 2)
    ema.swap(net)
    torch.testing.assert_close(net[1].running_mean, moved / 2)
    ema.swap(net)
    torch.testing.assert_close(net[1].running_mean, moved)


def test_fp16_calibration_skips_are_counted_apart_and_never_stop_the_run() -> None:
    """An fp16 run's first steps overflow while the loss scale comes down from 2**16: one skip
    per halving. With max_nonfinite_steps=10, all 16 of them in a row must not end the run; an
    overflow at the scale's floor, a non-finite loss or gradient norm does count."""
    guard = StepGuard(max_in_a_row=10, min_loss_scale=1.0)
    scale = 2.0**16
    for _ in range(16):
        assert guard.observe(3.2, None, applied=False, loss_scale_before=scale) == "calibration"
        guard.check()
        scale /= 2
    assert guard.loss_scale_skips == 16 and guard.skipped == 0 and guard.in_a_row == 0
    assert guard.observe(3.1, 2.5, applied=True, loss_scale_before=scale) == "applied"
    # at the floor, an overflow is a real one
    assert guard.observe(3.1, None, applied=False, loss_scale_before=1.0) == "nonfinite"
    assert guard.observe(float("nan"), None, False, 2.0**10) == "nonfinite"  # NaN loss
    assert guard.observe(3.0, float("inf"), True, None) == "nonfinite"  # bf16/fp32: no scaler
    assert guard.skipped == 3 and guard.in_a_row == 3 and guard.loss_scale_skips == 16
    assert guard.observe(3.0, 1.0, True, None) == "applied" and guard.in_a_row == 0


def test_an_fp16_overflow_at_the_minimum_scale_is_a_skipped_step_on_zero_1_to_3(
    monkeypatch,
) -> None:
    """DeepSpeed's ZeRO 1-3 loss scaler raises a bare Exception on an overflow at the minimum
    scale; after our engine set-up it skips the step like ZeRO-0, and the guard counts it."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler

    from coatnet_scale.guard import overflow_at_min_scale_skips

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 1)
    scaler = loss_scaler.DynamicLossScaler(1.0, 1000, 1.0, 1, False)  # DeepSpeed's defaults
    with pytest.raises(Exception, match="already at minimum"):
        scaler.update_scale(True)
    overflow_at_min_scale_skips(SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler)))
    scaler.update_scale(True)
    assert scaler.cur_scale == 1.0


def test_nonfinite_steps_in_a_row_stop_the_run() -> None:
    guard = StepGuard(max_in_a_row=3, min_loss_scale=1.0)
    for _ in range(2):
        guard.observe(float("nan"), float("nan"), applied=False, loss_scale_before=None)
        guard.check()
    guard.observe(float("nan"), float("nan"), applied=False, loss_scale_before=None)
    with pytest.raises(NonFiniteError, match="train.max_nonfinite_steps=3"):
        guard.check()


def test_per_rank_streams_differ_between_ranks_and_weights_do_not() -> None:
    from coatnet_scale.seeding import seed_rank_streams, seed_weights

    draws = []
    for rank in (0, 1):
        seed_weights(7)
        weights = torch.randn(4)
        seed_rank_streams(7, rank)
        draws.append((weights, torch.rand(16), np.random.rand(), random.random()))
    assert torch.equal(draws[0][0], draws[1][0])  # the same initial weights on every rank
    assert not torch.equal(draws[0][1], draws[1][1])  # dropout / drop-path streams differ
    assert draws[0][2] != draws[1][2] and draws[0][3] != draws[1][3]
    seed_rank_streams(7, 1)
    assert torch.equal(torch.rand(16), draws[1][1])  # and are reproducible


def test_normalizer_keeps_its_constants_on_the_device() -> None:
    normalizer = Normalizer(torch.device("cpu"), torch.bfloat16)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalizer(images)
    assert out.dtype == torch.bfloat16
    expected = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / (
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    floats = images.float()
    normalizer(floats)
    assert torch.equal(floats, images.float())  # the input is not modified in place


def test_throughput_leaves_out_evaluation_and_checkpoint_time() -> None:
    from coatnet_scale.logging import ThroughputWindow

    now = [100.0]
    window = ThroughputWindow(flops_per_image=1e9, peak_flops=1e12, clock=lambda: now[0])
    now[0] += 10.0  # ten seconds of steps...
    for _ in range(10):
        window.step_done(64)
    window.pause("eval", 30.0)  # ...a 30 s evaluation and a 15 s checkpoint inside the window
    window.pause("checkpoint", 15.0)
    now[0] += 45.0
    assert window.training_seconds() == pytest.approx(10.0)
    assert window.metrics()["img_per_s"] == pytest.approx(64.0)  # not 640 / 55
    assert window.metrics()["step_time_s"] == pytest.approx(1.0)
    assert window.metrics()["mfu"] == pytest.approx(64e9 / 1e12)
    window.reset()
    assert window.images == 0 and window.training_seconds() == pytest.approx(0.0)


def test_mfu_peak_is_the_devices_own_or_none() -> None:
    from coatnet_scale.plan.hardware import device_peak_flops

    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16", True) == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe", "bf16", True) == 756e12
    assert device_peak_flops("NVIDIA H200", "fp16", True) == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", "fp32", True) == 156e12  # TF32
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", "fp32", False) == 19.5e12
    assert device_peak_flops("Some Future GPU", "bf16", True) is None  # left out, not guessed
    assert load_config().logging.peak_flops is None  # CPUs: MFU only when configured


def test_the_optimizer_skips_a_nonfinite_update_the_way_deepspeed_reads_it() -> None:
    """fp32 ZeRO-0 drives our AdamW directly (torch's would apply NaN gradients): a non-finite
    step leaves weights, moments and step counts bitwise as they were and raises `overflow`,
    which DeepSpeed's engine reads (`was_step_applied`)."""
    from coatnet_scale.guard import gradient_norm
    from coatnet_scale.optim import GuardedAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = GuardedAdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    assert math.isfinite(gradient_norm(model))
    optimizer.step()
    assert not optimizer.overflow
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    optimizer.zero_grad()
    (model(torch.randn(2, 4)).sum() * float("nan")).backward()
    assert math.isnan(gradient_norm(model))
    optimizer.step()
    assert optimizer.overflow
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    optimizer.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert not optimizer.overflow and not torch.equal(model[0].weight, before["0.weight"])


SHM_PROBE = """
import os, sys
from datetime import timedelta
import deepspeed
from coatnet_scale.distributed.engine import cpu_allreduce_buffer, release_cpu_allreduce_buffer
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_SIZE="1")
deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
created = cpu_allreduce_buffer(0).exists()
release_cpu_allreduce_buffer(0)
print(created, cpu_allreduce_buffer(0).exists())
"""


def test_deepspeed_cpu_shared_memory_is_released_once_the_ranks_mapped_it() -> None:
    """DeepSpeed's CPU all-reduce creates a 66 MB file in /dev/shm (RAM) per rank and never
    unlinks it; our process-group start removes it (2 ranks: the launcher test)."""
    proc = subprocess.run(
        [sys.executable, "-c", SHM_PROBE, str(free_port())],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "True False"
