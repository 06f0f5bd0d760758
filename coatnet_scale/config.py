"""The typed config tree: YAML file(s) -> dotted overrides -> one frozen, validated `Config`.

Precedence, lowest first: dataclass defaults, the model's recipe `configs/<model>.yaml` (when a
model is named), the user's YAML files in order, then `section.key=value` overrides. Unknown keys,
wrong types and invalid values raise `ConfigError` with one line naming the dotted key and what is
allowed, before any worker starts. Each component later receives only its own section (as in
torchtitan's and big_vision's configs); runtime facts (rank, world size, device) are never written
back into the tree.

The DeepSpeed JSON is generated from this tree (distributed/engine.py), never kept by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from coatnet_scale.fields import ConfigError, field_doc, option, section
from coatnet_scale.models.config import ARCHS, STAGE_NAMES, ModelConfig
from coatnet_scale.text import split_outside

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline: which shards, how many loader workers, which augmentations."""

    train_shards: tuple[str, ...] = option(
        (), "train sources: one manifest JSON or brace pattern per source"
    )
    train_weights: tuple[float, ...] = option(
        (), "mixing weight per train source (empty: proportional to source sizes)"
    )
    val_shards: str | None = option(None, "validation shards: manifest JSON or brace pattern")
    num_workers: int = option(4, "loader worker processes per rank")
    order: Literal["auto", "window", "global"] = option(
        "auto",
        "sample order of an epoch: window (shards permuted, samples shuffled within windows of "
        "window_shards shards: mostly sequential reads), global (every sample permuted: random "
        "reads), auto (window unless the manifest shows class-sorted shards)",
    )
    window_shards: int = option(8, "shards whose samples are shuffled together (window order)")
    sampling: Literal["exact", "resampled"] = option(
        "exact", "exact: each sample once per epoch, resumable; resampled: with replacement"
    )
    randaugment_n: int = option(2, "RandAugment layers (0 disables RandAugment)")
    randaugment_m: int = option(15, "RandAugment magnitude")
    mixup_alpha: float = option(0.8, "mixup alpha (0 disables mixup)")
    cutmix_alpha: float = option(0.0, "cutmix alpha (0 disables cutmix)")
    crop_scale_min: float = option(0.08, "smallest RandomResizedCrop area fraction")
    hflip: float = option(0.5, "probability of a horizontal flip")
    train_interpolation: Literal["bilinear", "bicubic"] = option(
        "bilinear", "resampling of the training crop (bicubic costs about 2x on CPU)"
    )
    eval_crop_pct: float = option(0.875, "center-crop fraction for evaluation")
    decode: Literal["auto", "cpu", "gpu"] = option(
        "auto", "train JPEG decode: on loader workers (cpu) or the GPU (nvJPEG); auto: GPU on CUDA"
    )
    max_bad_fraction: float = option(0.01, "stop when more than this share of samples is bad")

    def validate(self) -> None:
        if self.train_weights and len(self.train_weights) != len(self.train_shards):
            raise ConfigError(
                "train_weights",
                f"{len(self.train_weights)} weights for {len(self.train_shards)} train sources",
            )
        if any(w < 0 for w in self.train_weights) or (
            self.train_weights and sum(self.train_weights) <= 0
        ):
            raise ConfigError("train_weights", "weights must be >= 0 and not all 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.window_shards < 1:
            raise ConfigError("window_shards", f"must be >= 1, got {self.window_shards}")
        if self.randaugment_n < 0 or not 0 <= self.randaugment_m <= 30:
            raise ConfigError("randaugment_m", "needs randaugment_n >= 0 and 0 <= magnitude <= 30")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError("hflip", f"must be in [0, 1], got {self.hflip}")
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError("crop_scale_min", f"must be in (0, 1], got {self.crop_scale_min}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ConfigError("eval_crop_pct", f"must be in (0, 1], got {self.eval_crop_pct}")


@dataclass(frozen=True)
class TrainConfig:
    """Run length, batch sizes, loss, EMA and cadences of the training loop."""

    run_dir: str = option(
        "auto",
        "run folder: checkpoints, metrics, resolved config (auto: runs/<model>-<fingerprint of "
        "the settings a resume may not change>, see coatnet_scale/run_folder.py)",
    )
    total_steps: int = option(100_000, "optimizer steps of the whole run")
    global_batch_size: int = option(4096, "images per optimizer step over all ranks")
    micro_batch_size: int = option(32, "images per rank per forward/backward")
    seed: int = option(0, "seed of weights init, data order and augmentation")
    loss: Literal["softmax", "sigmoid"] = option(
        "softmax", "softmax cross-entropy, or the sigmoid loss of 21K/JFT pretraining [P Table 10]"
    )
    label_smoothing: float = option(0.1, "label smoothing")
    ema_decay: float = option(0.0, "EMA decay of the weights (0 disables EMA)")
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)")
    max_nonfinite_steps: int = option(
        10, "stop after this many steps in a row with a non-finite loss or gradient norm"
    )
    compile: bool = option(False, "torch.compile the model")

    def validate(self) -> None:
        for key in ("total_steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}",
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(
                "max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}"
            )
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"must be >= 0, got {self.eval_every}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW [P Table 10]; weight decay skips the names of `model.no_weight_decay()`."""

    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.05, "decoupled weight decay")
    betas: tuple[float, ...] = option((0.9, 0.999), "AdamW betas (beta1, beta2)")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two values in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate over `train.total_steps`: linear warm-up, then decay to a floor."""

    warmup_steps: int = option(10_000, "linear warm-up steps from 0 to optim.lr")
    decay: Literal["cosine", "linear", "constant"] = option("cosine", "decay after warm-up")
    min_lr: float = option(1e-5, "learning rate at the end of the decay")

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0:
            raise ConfigError("min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass(frozen=True)
class PrecisionConfig:
    """Mixed precision; fp16 uses DeepSpeed's dynamic loss scaling."""

    dtype: Literal["bf16", "fp16", "fp32"] = option("bf16", "compute dtype of the model")
    initial_scale_power: int = option(16, "fp16: initial loss scale is 2**this")
    loss_scale_window: int = option(1000, "fp16: steps without overflow before the scale grows")
    hysteresis: int = option(2, "fp16: overflows tolerated before the scale shrinks")
    min_loss_scale: float = option(1.0, "fp16: smallest loss scale")
    tf32: bool = option(
        True, "GPUs: fp32 matmuls and convolutions in TF32 (the fp32 parts of a bf16/fp16 run too)"
    )

    def validate(self) -> None:
        for key in ("initial_scale_power", "loss_scale_window", "hysteresis"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.min_loss_scale <= 0:
            raise ConfigError("min_loss_scale", f"must be > 0, got {self.min_loss_scale}")


@dataclass(frozen=True)
class ZeroConfig:
    """DeepSpeed ZeRO sharding of optimizer states (1), gradients (2) and parameters (3)."""

    stage: int = option(2, "ZeRO stage 0, 1, 2 or 3")
    offload_optimizer: Literal["none", "cpu"] = option("none", "keep optimizer states on CPU")
    offload_params: Literal["none", "cpu"] = option("none", "keep parameters on CPU (stage 3)")
    overlap_comm: bool = option(True, "overlap gradient reduction with the backward pass")
    reduce_bucket_size: int = option(500_000_000, "elements per gradient-reduction bucket")

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError("stage", f"must be one of 0, 1, 2, 3, got {self.stage}")
        if self.offload_params != "none" and self.stage != 3:
            raise ConfigError("offload_params", f"needs zero.stage=3, got stage {self.stage}")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ConfigError("offload_optimizer", "needs zero.stage 1, 2 or 3")
        if self.reduce_bucket_size < 1:
            raise ConfigError("reduce_bucket_size", f"must be >= 1, got {self.reduce_bucket_size}")


@dataclass(frozen=True)
class ActivationCheckpointConfig:
    """Which blocks recompute their activations in the backward pass."""

    policy: Literal["none", "all", "stages"] = option(
        "none", "none, every block, or the blocks of `stages`"
    )
    stages: tuple[str, ...] = option((), "with policy=stages: stages from stem, s1, s2, s3, s4")

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ConfigError("stages", f"unknown stage(s) {unknown}; allowed: {list(STAGE_NAMES)}")
        if self.policy == "stages" and not self.stages:
            raise ConfigError("stages", "policy=stages needs at least one stage, e.g. [stem, s1]")
        if self.policy != "stages" and self.stages:
            raise ConfigError("stages", f"is only read with policy=stages, not {self.policy}")

    def checkpointed_stages(self) -> tuple[str, ...]:
        """The stages whose blocks are checkpointed under this policy."""
        return {"none": (), "all": STAGE_NAMES, "stages": self.stages}[self.policy]


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and where a run resumes from."""

    every_steps: int = option(1000, "save every N steps (0: never by step count)")
    every_minutes: float = option(30.0, "save every M minutes (0: never by time)")
    keep_last: int = option(3, "newest checkpoints kept")
    keep_every: int = option(
        0, "also keep every checkpoint whose step is a multiple of N (0: none)"
    )
    resume: str = option(
        "auto", "auto (newest valid in run_dir, else fresh), none, or a checkpoint / run path"
    )
    verify_checksums: bool = option(
        True, "check every file's SHA-256 before resuming (sizes are always checked)"
    )
    init_from: str | None = option(
        None,
        "fine-tuning: start from these weights (export folder, weights file, checkpoint or run "
        "folder); rel-pos tables are resized, a head of another class count replaced; ignored "
        "when the run resumes",
    )
    init_ema: bool = option(False, "with init_from a training checkpoint: take its EMA weights")
    async_save: bool = option(
        True,
        "save in the background: training stalls only while the state is copied to host memory "
        "(the commit protocol is the same; the run waits for the last save before it ends)",
    )
    allow_changes: tuple[str, ...] = option(
        (),
        "keys (or dotted prefixes) of the experiment's settings this resume may change, e.g. "
        "optim.weight_decay; without them a checkpoint with other settings is refused",
    )

    def validate(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0:
            raise ConfigError("every_steps", "every_steps and every_minutes must be >= 0")
        if self.keep_last < 1:
            raise ConfigError("keep_last", f"must be >= 1, got {self.keep_last}")
        if self.keep_every < 0:
            raise ConfigError("keep_every", f"must be >= 0, got {self.keep_every}")
        if not self.resume:
            raise ConfigError("resume", "must be auto, none or a path")


@dataclass(frozen=True)
class LoggingConfig:
    """wandb, the JSONL metrics file and the console."""

    wandb_mode: Literal["auto", "online", "offline", "disabled"] = option(
        "auto", "auto: online with an API key and network, offline otherwise"
    )
    wandb_project: str = option("coatnet-scale", "wandb project")
    wandb_entity: str | None = option(None, "wandb entity (team); None: the account default")
    log_every: int = option(20, "log metrics every N steps")
    peak_flops: float | None = option(
        None,
        "peak dense FLOP/s of one device in the training dtype, for MFU; null: from the GPU's "
        "name (plan/hardware.py GPU_PEAKS), no MFU on CPUs or unknown GPUs",
    )

    def validate(self) -> None:
        if self.log_every < 1:
            raise ConfigError("log_every", f"must be >= 1, got {self.log_every}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError("peak_flops", f"must be > 0, got {self.peak_flops}")


@dataclass(frozen=True)
class DistributedConfig:
    """Process group, collective timeouts and SLURM requeue."""

    device: Literal["auto", "cuda", "cpu"] = option(
        "auto",
        "auto: the rank's GPU when torch can use one, the CPU when the machine has no GPU (GPUs "
        "that torch cannot use are an error); cuda: a GPU or an error; cpu: the CPU on purpose",
    )
    backend: Literal["auto", "nccl", "gloo"] = option("auto", "auto: the accelerator's backend")
    timeout_minutes: float = option(30.0, "collective timeout before a hung job exits")
    stall_timeout_s: float = option(
        600.0,
        "a rank whose heartbeat stops this long ends the job, named, with every rank's stacks "
        "in RUN/stall/ (exit code 7; coatnet_scale/watchdog.py); at most half the collective "
        "timeout, so the stall is named before the collective fails; 0 turns the watchdog off",
    )

    @property
    def stall_after_s(self) -> float:
        """The watchdog's timeout: `stall_timeout_s`, capped at half the collective timeout."""
        return min(self.stall_timeout_s, 30 * self.timeout_minutes)

    max_requeues: int = option(
        3,
        "SLURM: stop requeueing after this many attempts in a row without a new checkpoint "
        "(a run that progresses is requeued without limit)",
    )

    def validate(self) -> None:
        if self.timeout_minutes <= 0:
            raise ConfigError("timeout_minutes", f"must be > 0, got {self.timeout_minutes}")
        if self.max_requeues < 0:
            raise ConfigError("max_requeues", f"must be >= 0, got {self.max_requeues}")
        if self.stall_timeout_s < 0:
            raise ConfigError("stall_timeout_s", f"must be >= 0, got {self.stall_timeout_s}")


@dataclass(frozen=True)
class SpikeConfig:
    """Loss-spike rollback (coatnet_scale/spikes.py): a spike sends the run back to its last
    in-memory snapshot, skips the samples of the step that spiked, and lowers the LR for a while.
    Off by default (the demo); the recipes turn it on."""

    rollback: bool = option(False, "roll back past loss spikes (else they are trained through)")
    loss_mads: float = option(
        6.0, "a spike: a loss above the median + this many MADs of the recent losses ..."
    )
    loss_min_ratio: float = option(
        1.5,
        "... and above this multiple of their median (late in training the MAD collapses: "
        "6 MADs were a 2% rise on the measured curve, bench/spike_thresholds.py)",
    )
    grad_factor: float = option(
        30.0,
        "or a gradient norm above this multiple of the recent median (clean steps reached 17x "
        "near convergence on the measured curve)",
    )
    window: int = option(200, "recent steps the median and MAD are taken over")
    min_history: int = option(20, "steps observed before spikes are looked for")
    snapshot_every: int = option(
        50, "steps between in-memory snapshots (the state a rollback returns to)"
    )
    cooldown_steps: int = option(100, "steps at the lowered LR after a rollback")
    cooldown_factor: float = option(0.1, "the LR multiplier during the cooldown")
    rampup_steps: int = option(100, "steps over which the LR returns to the schedule afterwards")

    def validate(self) -> None:
        for key in ("window", "min_history", "snapshot_every"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("cooldown_steps", "rampup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.loss_mads <= 0 or self.grad_factor <= 1 or self.loss_min_ratio < 1:
            raise ConfigError(
                "loss_mads", "loss_mads must be > 0, loss_min_ratio >= 1 and grad_factor > 1"
            )
        if not 0 < self.cooldown_factor <= 1:
            raise ConfigError("cooldown_factor", f"must be in (0, 1], got {self.cooldown_factor}")
        if self.min_history > self.window:
            raise ConfigError("min_history", f"must be <= window ({self.window})")


@dataclass(frozen=True)
class Config:
    """The root of the config tree."""

    model: ModelConfig = section(ModelConfig, "the network")
    data: DataConfig = section(DataConfig, "input pipeline")
    train: TrainConfig = section(TrainConfig, "the training loop")
    spike: SpikeConfig = section(SpikeConfig, "loss-spike rollback")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    schedule: ScheduleConfig = section(ScheduleConfig, "learning-rate schedule")
    precision: PrecisionConfig = section(PrecisionConfig, "mixed precision")
    zero: ZeroConfig = section(ZeroConfig, "DeepSpeed ZeRO")
    activation_checkpointing: ActivationCheckpointConfig = section(
        ActivationCheckpointConfig, "activation checkpointing"
    )
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints")
    logging: LoggingConfig = section(LoggingConfig, "logging")
    distributed: DistributedConfig = section(DistributedConfig, "distributed and SLURM")

    def validate(self) -> None:
        """Validate every section, then the rules that span sections."""
        for f in dataclasses.fields(self):
            try:
                getattr(self, f.name).validate()
            except ConfigError as err:
                raise err.under(f.name) from None
        if self.model.num_classes < 1:
            raise ConfigError("model.num_classes", "training needs a classifier: must be >= 1")
        if self.schedule.min_lr > self.optim.lr:
            raise ConfigError(
                "schedule.min_lr", f"{self.schedule.min_lr} is above optim.lr {self.optim.lr}"
            )
        if self.schedule.warmup_steps > self.train.total_steps:
            raise ConfigError(
                "schedule.warmup_steps",
                f"{self.schedule.warmup_steps} exceeds train.total_steps {self.train.total_steps}",
            )


# ---- typed construction from plain data ------------------------------------------------------

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _suggest(value: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field type `tp`, or raise ConfigError.

    Strings are parsed for numeric, boolean, null and list fields because command-line values are
    strings and PyYAML reads `5e-4` (no dot) as a string too.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)
        if is_null and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        kind = type(allowed[0])
        try:
            converted = _coerce(value, kind, key)
        except ConfigError:
            converted = value
        if converted in allowed:
            return converted
        words = [str(a) for a in allowed]
        raise ConfigError(
            key, f"got {value!r}; allowed: {', '.join(words)}{_suggest(str(value), words)}"
        )
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            value = (
                yaml.safe_load(text)
                if text.startswith("[")
                else [p.strip() for p in split_outside(text, "{", "}") if p.strip()]
            )
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            value = _parse_number(value, key, tp)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            value = _parse_number(value, key, tp)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported config type {tp!r}")  # a bug in a section definition


def _parse_number(text: str, key: str, tp: type) -> int | float:
    try:
        return int(text) if tp is int and text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        kind = "an integer" if tp is int else "a number"
        raise ConfigError(key, f"expected {kind}, got {text!r}") from None


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build the dataclass `cls` from nested plain data, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(
                path, f"unknown key{_suggest(str(key), list(fields))}; known: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (tuples as lists), the inverse of `from_dict`."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


# ---- files, overrides, dumping ---------------------------------------------------------------


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One config file as nested plain data; a clear error when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path} must hold a mapping of sections")
    return data


def parse_override(text: str) -> tuple[list[str], str]:
    """`optim.lr=5e-4` -> (["optim", "lr"], "5e-4")."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override {text!r} is not of the form section.key=value")
    return key.strip().split("."), value


def recipe_path(model: str, configs_dir: Path = CONFIGS_DIR) -> Path:
    """The paper recipe of a model size (`configs/coatnet6.yaml`)."""
    if model not in ARCHS:
        raise ConfigError(
            "model.name",
            f"unknown model {model!r}{_suggest(model, list(ARCHS))}; choose one of "
            + ", ".join(ARCHS),
        )
    return configs_dir / f"{model}.yaml"


def load_config(
    paths: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    model: str | None = None,
    configs_dir: Path = CONFIGS_DIR,
) -> Config:
    """Defaults <- recipe of `model` <- YAML files <- overrides; then validated and frozen."""
    tree: dict[str, Any] = {}
    if model is not None:
        _merge(tree, read_yaml(recipe_path(model, configs_dir)))
        tree.setdefault("model", {})["name"] = model
    for path in paths:
        data = read_yaml(path)
        named = (
            (data.get("model") or {}).get("name") if isinstance(data.get("model"), dict) else None
        )
        if model is not None and named not in (None, model):
            raise ConfigError("model.name", f"{path} sets {named!r} but --model is {model!r}")
        _merge(tree, data)
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys), f"{part} is a value, not a section")
            node = child
        node[keys[-1]] = value
    cfg = from_dict(Config, tree)
    cfg.validate()
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML with every field's description as a comment.

    `load_config([file])` of the result gives back an equal tree.
    """
    lines: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:  # {field_doc(f)}")
                emit(value, indent + 1)
                continue
            text = yaml.safe_dump(
                to_dict(value) if isinstance(value, tuple) else value,
                default_flow_style=True,
                width=10_000,
            )
            text = text.strip().removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {text}  # {field_doc(f)}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


def config_hash(cfg: Config) -> str:
    """A short stable hash of the resolved tree (recorded in checkpoints and run folders)."""
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default and description (`--help-config`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.extend(describe(hints[f.name], f"{key}."))
        else:
            default = to_dict(f.default) if isinstance(f.default, tuple) else f.default
            lines.append(
                f"{key} ({_type_name(hints[f.name])}; default {default!r}): {field_doc(f)}"
            )
    return lines


def fp32_gradient_accumulation(dtype: str, zero_stage: int) -> bool:
    """Whether bf16 gradients accumulate over micro-batches in fp32: wherever DeepSpeed 0.19
    allows it, which is under ZeRO. bench/grad_accum.py measures what bf16 accumulation costs
    (README, "Gradient accumulation precision"). The DeepSpeed config (`distributed/engine.py`) and
    the memory planner (`plan/memory.py`) both follow this rule.

    - ZeRO-0: no. DeepSpeed refuses bf16 weights with fp32 accumulation without ZeRO ("unsupported
      mix", engine `_do_optimizer_sanity_check`): gradients accumulate in bf16 `param.grad`.
    - ZeRO-1: DeepSpeed then runs its BF16_Optimizer instead of the ZeRO-1 optimizer: a full
      fp32 gradient buffer on every rank (4 bytes per parameter instead of 2), partitioned fp32
      master weights and moments as before (checkpoint files `bf16_zero_pp_rank_*`).
    - ZeRO-2/3: the same optimizer; the reduced gradient partitions accumulate in fp32 buffers.
    fp16 keeps DeepSpeed's default (fp16 accumulation under the loss scale)."""
    return dtype == "bf16" and zero_stage >= 1
