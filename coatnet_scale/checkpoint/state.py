"""The state besides DeepSpeed's files: trainer state (JSON) and per-rank RNG states."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coatnet_scale.checkpoint.layout import (
    FORMAT,
    TRAINER_STATE,
    code_version,
)
from coatnet_scale.config import Config, config_hash, to_dict
from coatnet_scale.logging import redact_tree


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: the rank's own GPU
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class TrainerState:
    """What the loop needs besides DeepSpeed's files to continue exactly (JSON, human-readable).

    The learning rate is a pure function of the step (`optim.lr_at`), so `step` is also the
    schedule's position; `data` is the loader's position (`TrainLoader.state_dict`: samples
    consumed, epoch, offset into the epoch, seed, sampling mode, data fingerprint)."""

    step: int
    data: dict[str, Any]
    skipped_steps: int
    wandb_run_id: str | None
    world_size: int
    config: dict[str, Any]
    config_hash: str
    code_version: str
    loss_scale_skips: int = 0  # fp16 loss-scale calibration skips (not in older checkpoints)

    @classmethod
    def of(
        cls,
        cfg: Config,
        step: int,
        data: dict[str, Any],
        skipped_steps: int,
        wandb_run_id: str | None,
        world_size: int,
        loss_scale_skips: int = 0,
    ) -> TrainerState:
        return cls(
            step,
            data,
            skipped_steps,
            wandb_run_id,
            world_size,
            redact_tree(to_dict(cfg)),  # secrets masked, as in RUN/config.yaml
            config_hash(cfg),
            code_version(),
            loss_scale_skips,
        )

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.__dict__}, indent=1) + "\n"

    @classmethod
    def read(cls, ckpt: Path) -> TrainerState:
        data = json.loads((ckpt / TRAINER_STATE).read_text())
        data.pop("format", None)
        return cls(**data)
