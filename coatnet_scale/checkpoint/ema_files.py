"""The EMA in a checkpoint.

Two places (see `coatnet_scale.ema`): the EMA of the weights is optimizer state, saved by
DeepSpeed with Adam's moments (partitioned in the ZeRO 1-3 optimizer files; whole in the
model-states file under ZeRO-0, where rank 0 also writes it to `ema.safetensors`); the EMA of the
BatchNorm statistics is in `ema.safetensors`. This module reads it back as whole tensors, adds it
to a universal checkpoint (DeepSpeed's converter carries only fp32/exp_avg/exp_avg_sq), and loads
it from one under ZeRO-3 (whose universal loader reads only those keys too; ZeRO 1/2 load every
key a parameter's folder holds).
"""

from __future__ import annotations

from pathlib import Path

import torch

from coatnet_scale.checkpoint.layout import EMA_FILE
from coatnet_scale.optim import EMA_KEY

UNIVERSAL_PARAM = "param"  # deepspeed.checkpoint.constants.PARAM: the tensor in a universal file


def read_ema(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """`ema.safetensors`: the statistics' EMA, and the weights' where ZeRO-0 held them whole."""
    if not (ckpt / EMA_FILE).is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(ckpt / EMA_FILE))


def merged_partitions(ckpt: Path, key: str | None = None) -> dict[str, torch.Tensor] | None:
    """Whole tensors by name from a ZeRO 1-3 checkpoint's optimizer files: the fp32 master weights
    with the buffers (`key` None, what DeepSpeed's zero_to_fp32 returns), or the optimizer state
    `key` of every trainable parameter (the EMA); None when the files hold no such state (EMA
    off, or saved before its first step).

    Each rank's file holds its flat fp32 partitions and the optimizer state laid out like them;
    zero_to_fp32's merge (`_get_fp32_state_dict_from_zero{2,3}_checkpoint`) is given either. Its
    own file parser cannot read DeepSpeed's BF16_Optimizer files (bf16 ZeRO-1 with fp32
    gradient accumulation: no `zero_stage` entry, padded partitions), so the files are read
    here: ZeRO-1/2 and BF16 partitions are cut to their unpadded length (`group_paddings`; the
    ZeRO-1/2 optimizer saves its master weights already cut, its state padded)."""
    from deepspeed.utils import zero_to_fp32

    per_rank, stage, world, alignment = [], 1, 1, None
    for path in zero_to_fp32.get_optim_files(str(ckpt)):
        optim = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        optim = optim["optimizer_state_dict"]
        stage = int(optim.get("zero_stage", 1))  # BF16_Optimizer: ZeRO-1, and does not say so
        world = optim["partition_count"]
        world = max(world) if isinstance(world, list) else world
        if stage <= 2:
            masters = optim["single_partition_of_fp32_groups"]
            states = optim["base_optimizer_state"]["state"]
            padded = "zero_stage" not in optim  # BF16_Optimizer keeps the padding in both
            pads = [pad if padded else 0 for pad in optim["group_paddings"]]
            alignment = alignment or optim.get("param_alignment_paddings")
        else:
            masters = optim["fp32_flat_groups"]
            states = optim["optimizer_state_dict"]["state"]
            pads = [0] * len(masters)
        lengths = [t.numel() - pad for t, pad in zip(masters, pads, strict=True)]
        if key is None:
            tensors = masters
        elif all(key in states[i] for i in states) and states:
            tensors = [states[i][key] for i in sorted(states)]
        else:
            return None
        per_rank.append([t.narrow(0, 0, n) for t, n in zip(tensors, lengths, strict=True)])
    if not per_rank:
        return None
    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(ckpt)))
    if stage <= 2:
        merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
            world, per_rank, model_states, False, alignment
        )
    else:
        merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(
            world, per_rank, model_states, False
        )
    state = zero_to_fp32.to_torch_tensor(merged)
    if key is None:
        return state
    trainable = {name for shapes in model_states[0].param_shapes for name in shapes}
    return {k: v for k, v in state.items() if k in trainable}


def partitioned_ema_weights(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """The weights' EMA from a ZeRO 1-3 checkpoint's optimizer files, whole, by name."""
    return merged_partitions(ckpt, EMA_KEY)


def add_ema_to_universal(ckpt: Path, universal: Path) -> None:
    """Write each parameter's EMA next to its fp32 weights in a universal checkpoint (from the
    optimizer files of `ckpt`), so that the loader re-partitions it for the new world size."""
    weights = partitioned_ema_weights(ckpt)
    for name, tensor in (weights or {}).items():
        folder = universal / "zero" / name
        if folder.is_dir():
            torch.save({UNIVERSAL_PARAM: tensor}, folder / f"{EMA_KEY}.pt")


def load_universal_ema_zero3(engine, checkpoint_dir: Path) -> None:
    """ZeRO-3: the EMA of each sub-group's partition from a universal checkpoint, assembled as
    DeepSpeed assembles the moments (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`, with
    the optimizer's own `load_hp_checkpoint_state` slicing each parameter's partition)."""
    optimizer = engine.optimizer
    folders = {
        p: checkpoint_dir / "zero" / optimizer.param_names[p]
        for g in optimizer.fp16_groups
        for p in g
    }
    if not all((folder / f"{EMA_KEY}.pt").is_file() for folder in folders.values()):
        return  # saved without EMA: it starts from the loaded weights
    for sub_group, params in enumerate(optimizer.fp16_groups):
        flat = optimizer.fp32_partitioned_groups_flat[sub_group]
        ema = torch.zeros_like(flat)
        offset = 0
        for param in params:
            part = optimizer.load_hp_checkpoint_state(str(folders[param]), EMA_KEY, param=param)
            ema.narrow(0, offset, part.numel()).copy_(part)
            offset += part.numel()
        optimizer.optimizer.state[flat][EMA_KEY] = ema
