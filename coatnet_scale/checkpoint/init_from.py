"""`checkpoint.init_from` that scales: verify once across the ranks, consolidate once, map the
result on every rank.

Before, every rank verified every file of the source checkpoint (SHA-256) and ran the full
`zero_to_fp32` merge: for CoAtNet-7 on 512 ranks about 1,000 full reads of ~34 GB and a full fp32
copy of the weights (~10 GB) per rank. Now

1. the ranks share the verification (`verify_on_ranks`: each checks its share of the files);
2. rank 0 alone merges the partitions (the EMA if asked) into one safetensors file in this run's
   folder, `RUN/init/<checkpoint>[-ema].safetensors`, written under a temporary name and renamed
   when complete (reused by a restart before the first checkpoint); the other ranks wait for it
   on the filesystem, not in a collective bounded by `distributed.timeout_minutes`;
3. every rank memory-maps that file (`mapped_safetensors`): the tensors are views of the page
   cache, which the ranks of a node share, and only what a rank copies into its model is read.

A weights file or an export folder (safetensors) is mapped directly. Inputs nobody here wrote are
read safely: safetensors, or `torch.load(weights_only=True)` with DeepSpeed's own three small
classes allowed (`deepspeed_classes_allowed`), also inside DeepSpeed's `zero_to_fp32`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from coatnet_scale.checkpoint.layout import (
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    Log,
    checkpoint_step,
    checkpoints_in,
    list_checkpoints,
    verify_on_ranks,
)
from coatnet_scale.distributed.collectives import (
    from_rank0,
    rank0_work_awaited_on_disk,
    rank_world,
)
from coatnet_scale.files import fsync_dir, sha256_file
from coatnet_scale.models import EXPORT_WEIGHTS, read_state_dict

INIT_DIR = "init"

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as read-only views of its memory map (no copy): the
    header is 8 bytes of little-endian length, then JSON with each tensor's dtype, shape and byte
    range after the header."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        # copy-on-write: the pages are the page cache's until written (nothing writes them; a
        # write would stay private instead of faulting)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if end == start:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(
            mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start
        )
        tensors[name] = flat.view(info["shape"])
    return tensors


def initial_state(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of `consolidated_file`'s result: mapped if safetensors, else a torch file read
    with `weights_only=True`."""
    if weights.suffix == ".safetensors":
        return mapped_safetensors(weights)
    return read_state_dict(weights)


@contextlib.contextmanager
def deepspeed_classes_allowed() -> Iterator[None]:
    """Every `torch.load` in the block is `weights_only=True` (DeepSpeed's own `zero_to_fp32`
    passes False: `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides it), with the only non-tensor classes
    DeepSpeed's checkpoint files hold allowed (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 1-3, fp32 and bf16 files; fp16
    files pickle the DynamicLossScaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    previous = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        for name, value in previous.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def source_checkpoint(path: Path, checksums: bool, log: Log) -> Path:
    """The training checkpoint `path` names (itself, or a run's newest that verifies), verified
    with the files shared over the ranks. All ranks call this; the candidates are rank 0's (a
    source run still saving could show the ranks different lists)."""
    candidates = from_rank0(
        [path]
        if checkpoint_step(path) is not None or (path / MANIFEST).exists()
        else list(reversed(list_checkpoints(checkpoints_in(path))))
    )
    for ckpt in candidates:
        problems = verify_on_ranks(ckpt, checksums)
        if not problems:
            return ckpt
        log(f"checkpoint.init_from: {ckpt} is damaged ({'; '.join(problems[:3])}): not used")
    raise CheckpointError(f"checkpoint.init_from={path}: no valid checkpoint")


def consolidated_file(
    source: Path, use_ema: bool, run_dir: Path, checksums: bool, log: Log
) -> Path:
    """A safetensors file of the initial weights that every rank can map (all ranks call this).

    A weights file or export folder is used as it is; a training checkpoint is merged once, by
    rank 0, into RUN/init/ (named after the checkpoint and its manifest's digest: another source
    never reuses a stale file), while the other ranks wait for the file or a failure note."""
    weights = source / EXPORT_WEIGHTS if source.is_dir() else source
    if weights.is_file():
        if use_ema:
            raise CheckpointError(f"{source}: checkpoint.init_ema needs a training checkpoint")
        return weights
    if not source.exists():
        raise CheckpointError(f"checkpoint.init_from={source}: no such file or folder")
    ckpt = source_checkpoint(source, checksums, log)
    rank = rank_world()[0]
    if rank == 0:
        digest = hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()[:12]
        name = f"{ckpt.name}-{digest}{'-ema' if use_ema else ''}.safetensors"
        (run_dir / INIT_DIR).mkdir(parents=True, exist_ok=True)
    out = run_dir / INIT_DIR / from_rank0(name if rank == 0 else None)

    def merge() -> str | None:
        if out.is_file():
            return None
        try:
            write_consolidated(ckpt, use_ema, out)
        except Exception as err:
            return f"consolidating {ckpt} failed: {err!r}"
        log(f"initial weights consolidated once from {ckpt} into {out}")
        return None

    failure = rank0_work_awaited_on_disk(merge, out.is_file, out.parent)
    if failure:
        raise CheckpointError(failure)
    return out


def write_consolidated(ckpt: Path, use_ema: bool, out: Path) -> None:
    from safetensors.torch import save_file

    from coatnet_scale.checkpoint.export import consolidated_state_dict

    with deepspeed_classes_allowed():
        state = consolidated_state_dict(ckpt, use_ema)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    metadata = {"format": "pt", "source": str(ckpt.resolve())}
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        sha256_file(tmp, sync=True)  # durable before the rename makes it reusable
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no weights-sized leftover
