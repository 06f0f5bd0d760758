"""Config tree -> DeepSpeed config dict -> engine. The only module besides checkpointing that
imports DeepSpeed.

Order of wrapping (torchtitan's `parallelize_*` convention, written down once): build the model
(under `deepspeed.zero.Init` for ZeRO-3, so no rank ever holds all weights) -> activation
checkpointing policy -> optional `torch.compile` -> `deepspeed.initialize` with our AdamW groups.
The DeepSpeed JSON is generated here from the config and saved in the run folder; nobody keeps one
by hand (no setting is written twice).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam

from coatnet_scale.config import Config, fp32_gradient_accumulation
from coatnet_scale.distributed.device import DeviceBinding, bind_device, configure_cuda_math
from coatnet_scale.distributed.env import DistEnv
from coatnet_scale.guard import overflow_at_min_scale_skips
from coatnet_scale.models import CoAtNet, ModelConfig, adapt_state_dict, build_model
from coatnet_scale.models.layers import fp32_batchnorm_statistics
from coatnet_scale.optim import MasterWeightEma, build_optimizer, param_groups
from coatnet_scale.preflight import gradient_accumulation

STEPS_PER_PRINT = 10**9  # we log ourselves; silence DeepSpeed's own step printing


def init_process_group(cfg: Config, env: DistEnv) -> DeviceBinding:
    """Bind this rank's device, then start the process group; returns the binding.

    The device first (`distributed/device.py`): the process group's NCCL communicator, DeepSpeed's
    engine and `zero.Init` all take the current device or LOCAL_RANK as theirs.
    """
    binding = bind_device(env.local_rank, env.local_world_size, cfg.distributed.device)
    configure_cuda_math(cfg.precision.tf32)
    os.environ.update(env.export(binding.index))  # srun: SLURM's variables as torch's
    backend = None if cfg.distributed.backend == "auto" else cfg.distributed.backend
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=timedelta(minutes=cfg.distributed.timeout_minutes),
    )
    release_cpu_allreduce_buffer(env.rank)
    return binding


def cpu_allreduce_buffer(rank: int) -> Path:
    """This rank's shared-memory file of DeepSpeed's CPU all-reduce: `shm_initialize` in
    deepspeed/ops/csrc/cpu/comm/shm.cpp names it after the user, MASTER_ADDR, MASTER_PORT and
    the rank."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def release_cpu_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's CPU all-reduce file once every rank has mapped it.

    On DeepSpeed's CPU accelerator `init_distributed` creates a 66 MB POSIX shared-memory file per
    rank (also for one rank) and nothing ever unlinks it: each run leaked it in /dev/shm, which
    is RAM. Measured here: 271 leaked files (18 GB) after a few test-suite runs, and the machine
    stalled evicting page cache; and a later run on the same port maps the stale file, whose
    flags are not reset before a peer may read them. Every rank opens all peers' files inside
    `init_distributed`, so after one barrier the names can go: the mappings stay valid until the
    process exits, and a run killed later leaves nothing behind.
    """
    if get_accelerator().device_name() != "cpu":
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def to_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run, derived from the tree (never hand-written)."""
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    if cfg.zero.stage > 0:
        zero.update(
            overlap_comm=cfg.zero.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=cfg.zero.reduce_bucket_size,
        )
    pin = torch.cuda.is_available()
    if cfg.zero.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.zero.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    precision = cfg.precision
    config: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # torch.optim.AdamW under ZeRO: DeepSpeed calls it "untested" but runs it (every stage
        # is exercised by the 2-rank tests).
        "zero_allow_untested_optimizer": True,
        # immediate_grad_update: ZeRO-1's BF16_Optimizer (fp32 accumulation) adds each bf16
        # gradient to its fp32 buffer in the backward hook and frees it, instead of keeping both
        # until the step (2 bytes per parameter more)
        "bf16": {
            "enabled": precision.dtype == "bf16",
            "immediate_grad_update": fp32_gradient_accumulation(precision.dtype, cfg.zero.stage),
        },
        "fp16": {
            "enabled": precision.dtype == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": precision.initial_scale_power,
            "loss_scale_window": precision.loss_scale_window,
            "hysteresis": precision.hysteresis,
            "min_loss_scale": precision.min_loss_scale,
        },
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if fp32_gradient_accumulation(precision.dtype, cfg.zero.stage):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def save_deepspeed_config(ds_config: dict, run_dir: Path) -> Path:
    path = run_dir / "deepspeed_config.json"
    path.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    return path


def build_sharded_model(
    model_cfg: ModelConfig, zero_stage: int, ds_config: dict, device: torch.device
) -> CoAtNet:
    """Build and initialise the model on this rank's device; under ZeRO-3 each rank only ever
    holds its partition.

    Every ZeRO stage starts from the same weights for the same seed, on CPU and GPU alike: the
    weights are drawn by `init_weights` / `init_module_` in the same module order, from the
    generator of the device they live on. Construction under `zero.Init` also runs PyTorch's
    default initialisers (drawing from the CPU and the device generators, which the meta-device
    build of ZeRO 0-2 does not), so both generators are restored afterwards.
    """
    if zero_stage < 3:
        model = build_model(model_cfg, device)
        # DeepSpeed broadcasts and flattens parameters through byte views, which need contiguous
        # tensors; the activations stay channels_last (the model converts its input), so the
        # convolutions still run in that layout.
        return model.to(memory_format=torch.contiguous_format)
    generators = [device.index] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=generators, device_type="cuda"),
        deepspeed.zero.Init(config_dict_or_path=ds_config),
    ):
        model = CoAtNet(model_cfg)
    # zero.Init partitioned each module's parameters as it was built; initialise them one module
    # at a time with that module's partitions gathered (rank 0's values are kept).
    model.init_weights(
        around=lambda module: deepspeed.zero.GatheredParameters(
            list(module.parameters(recurse=False)), modifier_rank=0
        )
    )
    return model


def load_initial_weights(
    model: CoAtNet, state: dict[str, torch.Tensor], zero_stage: int, source: str
) -> list[str]:
    """Fine-tuning start: copy `state` (adapted: rel-pos tables resized, a classifier of another
    class count left out) into the model before the engine wraps it. Returns the names left at
    their initial values.

    Under ZeRO-3 the parameters are partitioned (their local shape is empty): the state is adapted
    against a meta-device twin, then each module's partitions are gathered, filled by rank 0 and
    re-partitioned (`GatheredParameters(modifier_rank=0)`); buffers are not partitioned.
    """
    if zero_stage < 3:
        filtered, missing = adapt_state_dict(state, model, source)
        model.load_state_dict(filtered, strict=False)
        return missing
    filtered, missing = adapt_state_dict(state, build_model(model.cfg, "meta"), source)
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = dict(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if dist.get_rank() == 0:
                for name, param in params.items():
                    if prefix + name in filtered:
                        param.data.copy_(filtered[prefix + name])
        for name, buffer in module.named_buffers(recurse=False):
            if prefix + name in filtered:
                buffer.copy_(filtered[prefix + name])
    return missing


def apply_activation_checkpointing(model: CoAtNet, stages: tuple[str, ...]) -> None:
    """The config's checkpointing policy: one checkpoint unit per block of the chosen stages."""
    model.set_grad_checkpointing(False)
    if stages:
        model.set_grad_checkpointing(True, stages)


class OffloadAdamW(MasterWeightEma, DeepSpeedCPUAdam):
    """DeepSpeed's vectorised CPU Adam in AdamW mode, for ZeRO-Offload (DeepSpeed refuses a torch
    optimizer there: ZeRORuntimeException), with the EMA of what it steps. DeepSpeed checks the
    gradients before it calls this step."""

    @torch.no_grad()
    def step(self, closure=None):
        starting = self._ema_starting()
        result = super().step(closure)
        self._ema_update(starting)
        return result


def discard_setup_step(engine, optimizer: torch.optim.Optimizer) -> None:
    """Undo the optimizer step DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 without ZeRO) takes
    while it is built (`initialize_optimizer_states`: zero gradients, then `optimizer.step()`).

    That step decays the fp32 master copies once at the configured peak LR and leaves AdamW at
    step 1 before training starts, so every later bias correction is one step ahead (the first
    real update ~25% smaller than on the other stages). The masters are copied back from the
    model's weights they were made from, and the optimizer state is dropped; AdamW creates it
    again at the first real step, as on every other stage."""
    wrapper = engine.optimizer
    if not hasattr(wrapper, "fp32_groups") or not hasattr(wrapper, "fp16_groups"):
        return
    with torch.no_grad():
        for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for weight, master in zip(low, high, strict=True):
                master.copy_(weight)
    optimizer.state.clear()


def build_engine(model: CoAtNet, cfg: Config, ds_config: dict):
    """Wrap the model: checkpointing policy, optional compile, then deepspeed.initialize."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing.checkpointed_stages())
    if cfg.zero.offload_optimizer == "cpu":
        optimizer = OffloadAdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
            eps=cfg.optim.eps,
            adamw_mode=True,
        )
    else:
        optimizer = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    discard_setup_step(engine, optimizer)
    overflow_at_min_scale_skips(engine)
    optimizer.ema_decay = cfg.train.ema_decay  # from the first training step on
    fp32_batchnorm_statistics(engine.module)  # before compile: see the function
    if cfg.train.compile:
        engine.compile()
    return engine
