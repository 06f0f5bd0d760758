"""Consolidated weights: export to safetensors, and initial weights for fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from coatnet_scale.checkpoint.ema_files import merged_partitions, partitioned_ema_weights, read_ema
from coatnet_scale.checkpoint.layout import (
    EXPORT_CONFIG,
    MANIFEST,
    CheckpointError,
    checkpoint_step,
    checkpoints_in,
    list_checkpoints,
    verify,
)
from coatnet_scale.checkpoint.state import TrainerState
from coatnet_scale.files import atomic_write_text
from coatnet_scale.models import EXPORT_WEIGHTS, ModelConfig


def consolidated_state_dict(ckpt: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights and buffers of a checkpoint of any ZeRO stage, in one process (DeepSpeed's
    zero_to_fp32 merges the partitions; ZeRO-0 keeps the module whole). With `use_ema`, the EMA
    weights and BatchNorm statistics replace the trained ones (`checkpoint.ema_files`)."""
    partitioned = any(ckpt.glob("*_optim_states.pt"))
    if partitioned:  # ZeRO 1-3: partitioned fp32 master weights
        state = merged_partitions(ckpt)
    else:
        # ZeRO-0: the whole module is in the model-states file (which also holds non-tensor
        # engine state, hence weights_only=False for this run's own files; a foreign source,
        # `checkpoint.init_from`, is read inside `init_from.deepspeed_classes_allowed`, which
        # forces weights_only=True).
        saved = torch.load(
            ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        state = saved["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if use_ema:
        ema = read_ema(ckpt)
        if ema is None:
            raise CheckpointError(f"{ckpt} has no EMA weights (train.ema_decay was 0)")
        # the statistics (and ZeRO-0's weights); the partitioned weights from the optimizer
        # files: before the EMA's first step there are none, and the weights are their own EMA
        ema |= (partitioned_ema_weights(ckpt) or {}) if partitioned else {}
        state.update({k: v.float() for k, v in ema.items()})
    return state


def resolve_checkpoint(path: Path, checksums: bool = True) -> Path:
    """A checkpoint folder from a path to one, or to a run / checkpoints folder (its newest valid
    checkpoint). Single process; raises `CheckpointError` when none verifies."""
    if checkpoint_step(path) is not None or (path / MANIFEST).exists():
        problems = verify(path, checksums)
        if problems:
            raise CheckpointError(f"{path} is damaged: " + "; ".join(problems))
        return path
    root = checkpoints_in(path)
    for ckpt in reversed(list_checkpoints(root)):
        if not verify(ckpt, checksums):
            return ckpt
    raise CheckpointError(f"no valid checkpoint under {path}")


def export(ckpt: Path, out_dir: Path, use_ema: bool = False) -> Path:
    """Consolidate a checkpoint into an export folder (`write_export_folder`)."""
    trainer = TrainerState.read(ckpt)
    provenance = {
        "step": trainer.step,
        "ema": use_ema,
        "source": str(ckpt.resolve()),
        "config_hash": trainer.config_hash,
        "code_version": trainer.code_version,
    }
    state = consolidated_state_dict(ckpt, use_ema)
    crop_pct = trainer.config.get("data", {}).get("eval_crop_pct", 0.875)
    model = ModelConfig(**trainer.config["model"])
    return write_export_folder(state, model, out_dir, provenance, crop_pct)


def write_export_folder(
    state: dict[str, torch.Tensor],
    model: ModelConfig,
    out_dir: Path,
    provenance: dict,
    crop_pct: float = 0.875,
) -> Path:
    """Write `out_dir/model.safetensors` (fp32) and `out_dir/config.json`, readable by the group
    and others (an export is meant to be shared on a cluster).

    config.json follows timm's convention for a model folder (architecture, num_classes,
    num_features, pretrained_cfg, model_args), so the folder loads in one line,
    `timm.create_model("local-dir:PATH", pretrained=True)` (with coatnet_scale imported, which
    registers the architectures), at the exported resolution and class count; `architecture` and
    `model_args` are the whole model config. Where the weights come from (`provenance`) sits next
    to them. `crop_pct`
    is the evaluation's center-crop fraction (`data.eval_crop_pct`), for timm's eval transforms.
    """
    from safetensors.torch import save_file

    from coatnet_scale.models.timm_registry import pretrained_cfg

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / EXPORT_WEIGHTS
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    tmp.replace(weights)
    fields = dataclasses.asdict(model)
    info = {
        "architecture": model.name,
        "num_classes": model.num_classes,
        "num_features": model.arch().stages[-1][-1].width,
        "pretrained_cfg": pretrained_cfg(
            model.image_size, model.num_classes, model.in_chans, crop_pct
        ),
        # every ModelConfig field but `name` (the architecture): timm passes them to the factory
        "model_args": {k: v for k, v in fields.items() if k != "name"},
        **provenance,
    }
    atomic_write_text(out_dir / EXPORT_CONFIG, json.dumps(info, indent=1) + "\n")
    return weights
