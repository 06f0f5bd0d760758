"""Which run folder a config trains in, and which config changes a resume may make.

An experiment is its config minus what a user legitimately changes while it runs: how long it
runs and its learning-rate schedule, how often it saves, logs and evaluates, where it logs, the
EMA kept beside the weights (it can start late), and how the work is laid out on the hardware
(micro-batch, offload, recomputation, compile, timeouts). The rest is the experiment's
fingerprint. The default folder is `runs/<model>-<fingerprint>`: the same command (a new sbatch
of it included) finds its own checkpoints, a command that only extends or re-schedules the run
continues it, and any other command trains elsewhere. An explicit `train.run_dir` gets the same
protection at resume (`checkpoint/resume.py`): a checkpoint whose fingerprint keys differ is
refused unless the differing keys are listed in `checkpoint.allow_changes`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from coatnet_scale.config import Config, to_dict
from coatnet_scale.logging import redact_tree

AUTO = "auto"

# Keys (or dotted prefixes) outside the fingerprint: a resume may change them freely.
FREE_KEYS = (
    "train.run_dir",
    "train.total_steps",
    "train.micro_batch_size",
    "train.eval_every",
    "train.max_nonfinite_steps",
    "train.compile",
    "train.ema_decay",  # an EMA started late or re-tuned: the weights train the same
    "optim.lr",
    "schedule.",
    "data.num_workers",
    "data.val_shards",
    "data.eval_crop_pct",
    "data.max_bad_fraction",
    "precision.initial_scale_power",
    "precision.loss_scale_window",
    "precision.hysteresis",
    "precision.min_loss_scale",
    "precision.tf32",
    "zero.offload_optimizer",
    "zero.offload_params",
    "zero.overlap_comm",
    "zero.reduce_bucket_size",
    "activation_checkpointing.",
    "checkpoint.every_steps",
    "checkpoint.every_minutes",
    "checkpoint.keep_last",
    "checkpoint.keep_every",
    "checkpoint.resume",
    "checkpoint.verify_checksums",
    "checkpoint.async_save",
    "checkpoint.allow_changes",
    "logging.",
    "distributed.",
    "spike.",  # rollback on/off and its thresholds: the same experiment, resumed
)


# In the fingerprint (a fine-tune from other weights is another experiment) but not checked at a
# resume: the run's own checkpoint replaces the initial weights.
IGNORED_ON_RESUME = ("checkpoint.init_from", "checkpoint.init_ema")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: config trees compared key by key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_free(key: str) -> bool:
    return key.startswith(FREE_KEYS)


def saved_form(cfg: Config) -> dict[str, Any]:
    """The config as RUN/config.yaml and checkpoints keep it (secrets masked), flattened."""
    return flatten(redact_tree(to_dict(cfg)))


def fingerprint(cfg: Config) -> str:
    """10 hex digits of the SHA-256 of the fingerprint keys whose values differ from the defaults
    (with their values): a new option, added with a default, leaves every existing experiment's
    folder where it was."""
    defaults = saved_form(Config())
    keys = {
        k: v
        for k, v in saved_form(cfg).items()
        if not is_free(k) and (k not in defaults or defaults[k] != v)
    }
    canonical = json.dumps(keys, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def run_folder(cfg: Config) -> Path:
    """`train.run_dir`, or for `auto` (the default) `runs/<model>-<fingerprint>`."""
    if cfg.train.run_dir != AUTO:
        return Path(cfg.train.run_dir)
    return Path("runs") / f"{cfg.model.name}-{fingerprint(cfg)}"
