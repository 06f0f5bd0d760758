"""What can be wrong with a run before any process group starts or any file is written.

`setup_problems(cfg, world_size)` returns one line per problem, each naming the config key and
what is allowed. `launch/pretrain.py` calls it on every rank with the launcher's world size
(deepspeed, torchrun, srun, accelerate: `distributed.env.dist_env`) and exits with code 2 before
the run folder is touched; the SLURM supervisor calls it before srun with the allocation's task
count, so a job with a typo fails at once instead of being requeued. The config file itself is
validated earlier (`config.load_config`); these checks need the world size or the file system.
"""

from __future__ import annotations

from pathlib import Path

from coatnet_scale.config import Config
from coatnet_scale.data.order import BatchPlan
from coatnet_scale.data.shards import load_manifest, pattern_files


def gradient_accumulation(cfg: Config, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (the loader's `BatchPlan` rule), or a ValueError
    naming the config keys to change."""
    train = cfg.train
    try:
        return BatchPlan(
            train.global_batch_size, train.micro_batch_size, 0, world_size
        ).accumulation
    except ValueError:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} does not split into "
            f"{world_size} ranks x train.micro_batch_size={train.micro_batch_size}"
        ) from None


def shard_source_problem(key: str, spec: str) -> str | None:
    """Why the shard source `spec` (a manifest JSON or a brace pattern of tars) cannot be read.

    A manifest is parsed and its first shard looked up (a manifest moved away from its shards
    fails there); a pattern's files are only looked up, not indexed."""
    path = Path(spec)
    if path.is_dir():
        manifests = sorted(p.name for p in path.glob("*.json") if not p.name.endswith(".info.json"))
        hint = f", e.g. {path / manifests[0]}" if manifests else ""
        return f"{key}={spec} is a folder: give the shard manifest JSON inside it{hint}"
    if spec.endswith(".json"):
        try:
            manifest = load_manifest(spec)
        except (FileNotFoundError, ValueError) as err:
            return f"{key}: {err}"
        if not manifest.shards:
            return f"{key}={spec} lists no shards"
        first = Path(manifest.shards[0].path)
        if not first.is_file():
            return f"{key}={spec}: its shard {first} does not exist (moved without its shards?)"
        return None
    paths, missing = pattern_files(spec)
    if missing:
        return (
            f"{key}={spec}: {len(missing)} of {len(paths)} shard(s) do not exist, e.g. {missing[0]}"
        )
    return None


def setup_problems(cfg: Config, world_size: int, on_rank_host: bool = True) -> list[str]:
    """Every problem found, one line each (empty: the run can start). `on_rank_host`: this
    process runs where a rank will (launcher), so it may ask whether CUDA is usable here; the
    SLURM batch step may not see the tasks' GPUs and checks the config only."""
    problems = []
    try:
        gradient_accumulation(cfg, world_size)
    except ValueError as err:
        problems.append(str(err))
    if not cfg.data.train_shards:
        problems.append(
            "data.train_shards: no training data; set it to a shard manifest (python -m "
            "data_tools.make_shards IMAGE_FOLDER OUT, or python -m data_tools.make_demo for the "
            "demo digits)"
        )
    for spec in cfg.data.train_shards:
        problems.append(shard_source_problem("data.train_shards", spec))
    if cfg.data.val_shards:
        problems.append(shard_source_problem("data.val_shards", cfg.data.val_shards))
    mixing = cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0
    if mixing and cfg.train.micro_batch_size % 2:
        problems.append(
            f"train.micro_batch_size={cfg.train.micro_batch_size} is odd: mixup/cutmix pairs slot "
            "2k with slot 2k+1 inside a micro-batch, so odd micro-batches leave samples unmixed; "
            "use an even size or data.mixup_alpha=0 data.cutmix_alpha=0"
        )
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).exists():
        problems.append(f"checkpoint.resume={cfg.checkpoint.resume}: no such file or folder")
    init_from = cfg.checkpoint.init_from
    if init_from and not Path(init_from).exists():
        problems.append(f"checkpoint.init_from={init_from}: no such file or folder")
    if cfg.checkpoint.init_ema and not init_from:
        problems.append(
            "checkpoint.init_ema=true takes the EMA weights of checkpoint.init_from, which is not "
            "set; set both, or init_ema=false"
        )
    problems.append(precision_problem(cfg, on_rank_host))
    return [p for p in problems if p]


def precision_problem(cfg: Config, probe_cuda: bool) -> str | None:
    """fp16 runs on GPUs only: DeepSpeed's CPU accelerator refuses it, late, with a traceback."""
    if cfg.precision.dtype != "fp16":
        return None
    if cfg.distributed.device == "cpu":
        on = "distributed.device=cpu"
    elif not probe_cuda:
        return None
    else:
        import torch

        if torch.cuda.is_available():
            return None
        on = "this machine (no usable CUDA device)"
    return f"precision.dtype=fp16 needs GPUs and runs on {on}; use bf16 or fp32 on CPUs"
