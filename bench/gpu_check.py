"""`make gpu-check`: what a GPU run of coatnet-scale depends on, checked in one command.

    python bench/gpu_check.py [--out runs/gpu_check]      # on a machine with NVIDIA GPUs
    python bench/gpu_check.py --rehearse                  # the same sequence on the CPU (smaller)

On a machine without a usable CUDA device it exits at once (code 2) with one line saying so.
Otherwise, in under 10 minutes on one GPU, it

1. asserts CUDA and NCCL and records torch, CUDA, cuDNN, NCCL and driver versions and every GPU;
2. probes attention with a trainable relative-position bias: which SDPA kernel the model's call
   uses in bf16/fp16/fp32 at CoAtNet's token counts, whether the bias gets its gradient (against
   the written-out formula), its time and memory against the math kernel, and what PyTorch would
   pick if left alone;
3. trains 3 steps each through the real entry point (`deepspeed launch/pretrain.py`, 2 ranks when
   there are 2+ GPUs, else 1): the debug model and CoAtNet-0 at 224 px in bf16 and fp16, an EMA run
   and its resume, a compiled run with activation checkpointing; each run's rank report (device,
   CPU affinity, free memory), losses, throughput, memory and loss-scale figures;
4. checks that ZeRO-2 and ZeRO-3 build identical initial weights on the GPU;
5. runs the model-step benchmark in bf16 (ours vs timm) and the planner's `--check` in bf16;

and writes OUT/report.json (every figure) and OUT/report.md (the tables), naming the checks that
need 2+ GPUs or SLURM and were skipped. The exit code is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_TIMEOUT_S = 240
DEADLINE = [float("inf")]  # monotonic time by which every check must be over (--deadline-s)


def remaining() -> float:
    return DEADLINE[0] - time.monotonic()


class CheckFailed(AssertionError):
    """A check ran and its result is wrong."""


class Report:
    """Checks in order, each with status ok / failed / skipped, its figures and a note."""

    def __init__(self, out: Path, rehearsal: bool, copy_to: Path | None = None) -> None:
        self.out = out
        self.copy_to = copy_to
        self.rehearsal = rehearsal
        self.checks: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if remaining() < 20:  # a check not run is not a check passed
            print(f"gpu-check: {name}: failed (not run: out of time, --deadline-s)", flush=True)
            self.checks.append(
                {"name": name, "status": "failed", "error": "not run: out of time (--deadline-s)"}
            )
            self.write()
            return None
        start = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        entry: dict[str, Any] = {"name": name}
        try:
            entry |= {"status": "ok", "figures": check()}
        except CheckFailed as err:
            entry |= {"status": "failed", "error": str(err)}
        except Exception as err:  # a check that crashed is a failed check; the others still run
            entry |= {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            entry["traceback"] = traceback.format_exc()[-4000:]
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(f"gpu-check: {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        if entry["status"] == "failed":
            print(f"  {entry['error']}", flush=True)
        self.checks.append(entry)
        self.write()  # after every check: a run cut short keeps what it measured
        return entry

    def skip(self, name: str, why: str) -> None:
        self.checks.append({"name": name, "status": "skipped", "why": why})
        self.write()

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if c["status"] == "failed"]

    def write(self) -> None:
        total = round(time.perf_counter() - self.started, 1)
        data = {"rehearsal_on_cpu": self.rehearsal, "seconds": total, "checks": self.checks}
        for folder in (self.out, self.copy_to):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
                (folder / "report.md").write_text(markdown(data))


# ---- rendering ------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def markdown(data: dict[str, Any]) -> str:
    title = "gpu-check" + (
        " (rehearsal on the CPU: not GPU figures)" if data["rehearsal_on_cpu"] else ""
    )
    out = [f"# {title}", "", f"{data['seconds']} s in all.", ""]
    out += _table(
        [
            {
                "check": c["name"],
                "status": c["status"],
                "s": c.get("seconds"),
                "note": c.get("error") or c.get("why"),
            }
            for c in data["checks"]
        ]
    )
    for check in data["checks"]:
        figures = check.get("figures")
        if not figures:
            continue
        out += ["", f"## {check['name']}", ""]
        scalars = {k: v for k, v in figures.items() if not isinstance(v, dict | list)}
        if scalars:
            out += _table([scalars])
        for key, value in figures.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                out += ["", f"{key}:", "", *_table(value)]
            elif isinstance(value, list):
                out += ["", f"{key}:", "", *(f"- {_cell(v)}" for v in value)]
            elif isinstance(value, dict):
                rows = [
                    {"": k, **v} if isinstance(v, dict) else {"": k, "value": v}
                    for k, v in value.items()
                ]
                out += ["", f"{key}:", "", *_table(rows)]
    return "\n".join(out) + "\n"


# ---- 1. environment -------------------------------------------------------------------------


def environment(rehearsal: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
    }
    if rehearsal:
        return figures
    if not dist.is_nccl_available():
        raise CheckFailed("torch.distributed has no NCCL backend in this build")
    figures |= {
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "gpus": torch.cuda.device_count(),
    }
    smi = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,driver_version,memory.total,memory.used,pcie.link.gen.current",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    figures["nvidia_smi"] = smi.stdout.strip().splitlines() or smi.stderr.strip()
    if smi.returncode == 0 and figures["nvidia_smi"]:
        figures["driver"] = figures["nvidia_smi"][0].split(",")[2].strip()
    figures["devices"] = [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            "free_gib": round(torch.cuda.mem_get_info(i)[0] / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]
    return figures


# ---- 2. attention with a trainable bias ------------------------------------------------------


def _kernel_of(grad_fn: Any) -> str:
    name = type(grad_fn).__name__ if grad_fn is not None else "none"
    for key, kernel in (
        ("Efficient", "memory-efficient"),
        ("Cudnn", "cudnn"),
        ("Flash", "flash"),
    ):
        if key in name:
            return kernel
    return f"math ({name})"


def probe_attention(device_name: str) -> dict[str, Any]:
    """The model's attention call vs the math kernel and vs PyTorch's own choice."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from coatnet_scale.models import layers
    from coatnet_scale.models.layers import RelPosAttention, init_module_, relative_position_index

    device = torch.device(device_name)
    chosen = layers.BIAS_GRAD_KERNELS
    rows: list[dict[str, Any]] = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if device.type == "cpu":
        dtypes.pop("fp16")
    problems = []
    for dtype_name, dtype in dtypes.items():
        for side in (14, 7):  # CoAtNet at 224 px: S3 14x14 (196 tokens), S4 7x7 (49 tokens)
            tokens, batch, dim = side * side, 32, 256
            torch.manual_seed(0)
            attn = RelPosAttention(dim, dim, 32, (side, side)).to(device)
            for module in attn.modules():
                init_module_(module)
            attn = attn.to(dtype)
            x = torch.randn(batch, side, side, dim, device=device, dtype=dtype)
            weights = torch.randn(batch, side, side, dim, device=device, dtype=dtype)
            seen: list[Any] = []
            sdpa = F.scaled_dot_product_attention

            def recording(*args, sdpa=sdpa, seen=seen, **kwargs):
                out = sdpa(*args, **kwargs)
                seen.append(out.grad_fn)
                return out

            def run(module=attn, x=x, weights=weights) -> float:
                module.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                (module(x).float() * weights.float()).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return (time.perf_counter() - start) * 1e3

            F.scaled_dot_product_attention = recording
            try:
                run()
            finally:
                F.scaled_dot_product_attention = sdpa
            kernel = _kernel_of(seen[0])
            ms = min(run() for _ in range(3))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            grad = attn.rel_pos.table.grad.float().clone()
            # the written-out formula in fp32 as the reference
            table = attn.rel_pos.table.detach().float().clone().requires_grad_(True)
            ref = attn.float()
            q, k, v = ref.qkv(x.float()).reshape(batch, tokens, 3, 8, 32).permute(2, 0, 3, 1, 4)
            bias = table.flatten(1)[:, relative_position_index(side, side, device)]
            probs = (q @ k.transpose(-1, -2) / 32**0.5 + bias).softmax(-1)
            y = ref.proj((probs @ v).transpose(1, 2).reshape(batch, side, side, dim))
            (y * weights.float()).sum().backward()
            error = ((grad - table.grad).norm() / table.grad.norm()).item()
            attn = attn.to(dtype)
            layers.BIAS_GRAD_KERNELS = [SDPBackend.MATH]  # what a math-only fallback costs
            try:
                math_ms = min(run() for _ in range(3))
            finally:
                layers.BIAS_GRAD_KERNELS = chosen
            math_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            row = {
                "dtype": dtype_name,
                "tokens": tokens,
                "kernel": kernel,
                "bias_grad_rel_error": round(error, 5),
                "bias_grad_nonzero": bool(grad.abs().sum() > 0),
                "fwd_bwd_ms": round(ms, 3),
                "math_fwd_bwd_ms": round(math_ms, 3),
                "peak_mib": round(peak / 2**20, 1),
                "math_peak_mib": round(math_peak / 2**20, 1),
            }
            rows.append(row)
            tolerance = 0.05 if dtype_name != "fp32" else 1e-3
            if not row["bias_grad_nonzero"] or error > tolerance:
                problems.append(f"{dtype_name}/{tokens}: bias gradient error {error:.3g}")
            if device.type == "cuda" and dtype_name != "fp32" and kernel != "memory-efficient":
                problems.append(f"{dtype_name}/{tokens}: kernel {kernel}, not memory-efficient")
    figures: dict[str, Any] = {"calls": rows, "pytorch_default": _default_choice(device)}
    if problems:
        raise CheckFailed("; ".join(problems) + f" (figures: {json.dumps(figures)})")
    return figures


def _default_choice(device: Any) -> dict[str, Any]:
    """What SDPA does with a bias that needs a gradient when every kernel is allowed (the
    reason the model restricts the choice)."""
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (
        torch.randn(8, 8, 196, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    bias = torch.randn(8, 196, 196, device=device, dtype=dtype, requires_grad=True)
    try:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.float().sum().backward()
    except Exception as err:
        return {"kernel": "error", "error": f"{type(err).__name__}: {str(err)[:200]}"}
    return {
        "kernel": _kernel_of(out.grad_fn),
        "bias_grad": None if bias.grad is None else float(bias.grad.float().abs().sum()),
    }


# ---- 3. training through the entry point -----------------------------------------------------


def demo_shards(out: Path) -> Path:
    data = out / "data"
    if not (data / "train.json").is_file():
        run([sys.executable, "-m", "data_tools.make_demo", "--out", str(data)], timeout=600)
    return data


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command in its own process group; its output, or CheckFailed with the tail. On a
    timeout the whole group goes (the DeepSpeed launcher's ranks too, which would otherwise keep
    the port and the GPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    timeout = min(timeout, remaining() - 5)
    if timeout < 10:
        raise CheckFailed("out of time (--deadline-s)")
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        tail = " | ".join(output.strip().splitlines()[-4:])
        raise CheckFailed(f"no result after {timeout:.0f} s: {tail}") from None
    if proc.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-6:])
        raise CheckFailed(f"exit code {proc.returncode}: {tail}")
    return output


def launcher(ranks: int) -> list[str]:
    """`deepspeed` on `ranks` local GPUs: the first ones of CUDA_VISIBLE_DEVICES when it is set
    (`--num_gpus` would drop it and count from GPU 0), else GPUs 0..ranks-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if all(v.strip().isdigit() for v in visible) and len(visible) >= ranks:
        gpus = ["--include", "localhost:" + ",".join(v.strip() for v in visible[:ranks])]
    else:
        gpus = ["--num_gpus", str(ranks)]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    command = (
        [str(deepspeed)]
        if deepspeed.is_file()
        else [sys.executable, "-m", "deepspeed.launcher.runner"]
    )
    from coatnet_scale.distributed.env import free_port

    return [*command, *gpus, "--master_port", str(free_port())]


def train_run(
    out: Path,
    name: str,
    ranks: int,
    rehearsal: bool,
    model: str,
    overrides: list[str],
    steps: int = 3,
    timeout: int = TRAIN_TIMEOUT_S,
) -> dict[str, Any]:
    """One `deepspeed launch/pretrain.py` run; its figures from metrics.jsonl and ranks.json."""
    data = demo_shards(out)
    run_dir = out / "runs" / name
    command = [
        *launcher(ranks),
        str(REPO / "launch" / "pretrain.py"),
        "--model",
        model,
        f"data.train_shards={data / 'train.json'}",
        f"data.val_shards={data / 'val.json'}",
        f"data.num_workers={2 if rehearsal else 4}",
        f"train.total_steps={steps}",
        "schedule.warmup_steps=1",
        "logging.log_every=1",
        "logging.wandb_mode=disabled",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0",
        f"train.run_dir={run_dir}",
        # a hang ends in the watchdog's line naming the rank and phase, with every rank's
        # stacks in RUN/stall/, well before this check's own time limit kills the run
        f"distributed.stall_timeout_s={timeout // 2}",
        *(["distributed.device=cpu"] if rehearsal else []),
        *overrides,
    ]
    start = time.perf_counter()
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        output = run(command, timeout, {"OMP_NUM_THREADS": "1" if rehearsal else "4"})
    except CheckFailed as err:
        log.write_text(str(err))
        raise
    seconds = time.perf_counter() - start
    log.write_text(output)
    from coatnet_scale.distributed.device import describe_rank

    for rank in json.loads((run_dir / "ranks.json").read_text()):
        print(f"  {describe_rank(rank)}", flush=True)  # device, CPU affinity, free memory
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in steps_logged]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"losses {losses}")
    last = steps_logged[-1]
    keep = (
        "img_per_s",
        "step_time_s",
        "data_wait_share",
        "memory_mb",
        "memory_reserved_mb",
        "memory_free_mb",
        "memory_other_mb",
        "skipped_steps",
        "loss_scale",
        "loss_scale_skips",
        "grad_norm",
    )
    keep_eval = ("val_top1", "val_ema_top1")
    evals = [r for r in records if "val_top1" in r]
    figures = {
        "ranks": ranks,
        "wall_s": round(seconds, 1),
        "losses": [round(x, 4) for x in losses],
        **{k: last[k] for k in keep if k in last},
        **({k: evals[-1][k] for k in keep_eval if k in evals[-1]} if evals else {}),
        "rank_report": json.loads((run_dir / "ranks.json").read_text()),
        "log_lines": [
            line
            for line in output.splitlines()
            if "resumed from" in line or ("rank " in line and " on " in line and "free" in line)
        ][:20],
    }
    if last.get("skipped_steps", 0):
        raise CheckFailed(f"{last['skipped_steps']} non-finite step(s): {json.dumps(figures)}")
    return figures


def ema_resume(out: Path, ranks: int, rehearsal: bool, overrides: list[str]) -> dict[str, Any]:
    """The EMA run continued from its step-3 checkpoint to step 5: the EMA is read back onto
    the rank's device and updated there."""
    figures = train_run(out, "ema", ranks, rehearsal, "coatnet_debug", overrides, 5)
    if not any("resumed from" in line for line in figures["log_lines"]):
        raise CheckFailed(f"the second run did not resume: {figures['log_lines']}")
    if "val_ema_top1" not in figures:
        raise CheckFailed("no EMA evaluation after the resume")
    return figures


# ---- 4. identical initial weights on every ZeRO stage ----------------------------------------


def init_weights_worker(out: Path, rehearsal: bool) -> None:
    """(inside `deepspeed --num_gpus 1`) the weights and BatchNorm statistics a bf16 engine
    starts from under ZeRO-2 and under ZeRO-3, for one seed."""
    import deepspeed

    from coatnet_scale.cli import config_parser, parse_config_args
    from coatnet_scale.distributed.engine import (
        build_engine,
        build_sharded_model,
        init_process_group,
        to_deepspeed_config,
    )
    from coatnet_scale.distributed.env import dist_env
    from coatnet_scale.train import seed_weights

    states, dtypes = {}, {}
    for stage in (2, 3):
        overrides = [
            f"zero.stage={stage}",
            "precision.dtype=bf16",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            *(["distributed.device=cpu"] if rehearsal else []),
        ]
        cfg, _ = parse_config_args(["--model", "coatnet_debug", *overrides], config_parser("w"))
        device = init_process_group(cfg, dist_env()).device
        seed_weights(cfg.train.seed)
        ds_config = to_deepspeed_config(cfg, 1)
        engine = build_engine(
            build_sharded_model(cfg.model, stage, ds_config, device), cfg, ds_config
        )
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params) if stage == 3 else nullcontext():
            states[stage] = {
                n: t.detach().float().cpu().clone()
                for n, t in [*engine.module.named_parameters(), *engine.module.named_buffers()]
            }
            dtypes[stage] = sorted({str(t.dtype) for t in params})
    diff = max((states[2][n] - states[3][n]).abs().max().item() for n in states[2])
    shapes = all(states[2][n].shape == states[3][n].shape for n in states[2])
    (out / "init_weights.json").write_text(
        json.dumps(
            {
                "max_abs_diff": diff,
                "same_shapes": shapes,
                "tensors": len(states[2]),
                "param_dtypes": dtypes,
                "device": str(device),
            }
        )
    )


def identical_init(out: Path, rehearsal: bool) -> dict[str, Any]:
    command = [*launcher(1), __file__, "--worker-init-weights", str(out)]
    if rehearsal:
        command.append("--rehearse")
    run(command, TRAIN_TIMEOUT_S)
    result = json.loads((out / "init_weights.json").read_text())
    if result["max_abs_diff"] != 0 or not result["same_shapes"]:
        raise CheckFailed(f"ZeRO-2 and ZeRO-3 initial weights differ: {result}")
    return result


# ---- 5. benchmarks ----------------------------------------------------------------------------


def model_step(rehearsal: bool) -> dict[str, Any]:
    from bench.common import RESULTS

    args = ["--device", "cpu", "--dtype", "bf16", "--batch-size", "2", "--image-size", "64"]
    if not rehearsal:
        args = ["--device", "cuda", "--dtype", "bf16", "--batch-size", "64", "--repeats", "10"]
    output = run([sys.executable, str(REPO / "bench" / "model_step.py"), *args], 600)
    key = f"model_step_{args[1]}_bf16"
    return json.loads(RESULTS.read_text())[key] | {"table": output.strip().splitlines()}


def planner_check(rehearsal: bool) -> dict[str, Any]:
    size, batch, model = (64, 2, "coatnet_debug") if rehearsal else (224, 32, "coatnet0")
    output = run(
        [
            sys.executable,
            "-m",
            "coatnet_scale.plan",
            "--model",
            model,
            "--image-size",
            str(size),
            "--check",
            str(batch),
            "--dtype",
            "bf16",
        ],
        600,
    )
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[0-9.]+", cells[3]):
            rows.append(
                {
                    "policy": cells[0],
                    "measured_mib": float(cells[1]),
                    "predicted_mib": float(cells[2]),
                    "predicted_over_measured": float(cells[3]),
                }
            )
    if not rows:
        raise CheckFailed(f"no table in: {output[-2000:]}")
    return {"model": model, "image_size": size, "batch": batch, "policies": rows}


def device_pipeline(rehearsal: bool) -> dict[str, Any]:
    """Images/s of the device half of the input pipeline (`data.decode=gpu`): nvJPEG decode,
    crop and resize to 224, flip, RandAugment 2/15, mixup/CutMix, normalisation, on batches of 64
    photo-like 500x375 JPEGs (their windows drawn as the workers draw them)."""
    import random

    import numpy as np
    import torch

    from bench.data_pipeline import photo_like
    from coatnet_scale.data import gpu_decode
    from coatnet_scale.data.batch_augment import BatchAugment, Mixing
    from coatnet_scale.data.pipeline import _assemble
    from coatnet_scale.data.transforms import Normalizer, TrainAugment, crop_for_device

    device = torch.device("cpu" if rehearsal else "cuda")
    size, count, batch_size = (64, 32, 16) if rehearsal else (224, 256, 64)
    aug = TrainAugment(size, randaugment_n=2, randaugment_m=15, mixup_alpha=0.8, cutmix_alpha=1.0)
    rng = np.random.default_rng(0)
    datas = [photo_like(rng) for _ in range(count)]
    batches = []
    for start in range(0, count, batch_size):
        items, draws = [], []
        for slot in range(start, start + batch_size):
            random.seed(slot)
            items.append((str(slot), crop_for_device(datas[slot], aug), 0))
            draws.append(aug.draw())
        slots = range(start, start + batch_size)
        batches.append(_assemble(items, [], slots, size, draws=draws))
    augment = BatchAugment(size, 2, 15, Mixing(0.8, 1.0), 1000, 0.1, Normalizer(device))

    def one_pass() -> None:
        for batch in batches:
            images, valid, labels, _ = gpu_decode.decode_batch(batch, device)
            labels = labels.to(device)
            augment(images, batch["augment"], batch["mix"], batch["slot"], labels, valid)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_pass()  # warm-up
    start = time.perf_counter()
    passes = 1 if rehearsal else 3
    for _ in range(passes):
        one_pass()
    seconds = (time.perf_counter() - start) / passes
    return {
        "device": str(device),
        "images": count,
        "batch": batch_size,
        "images_per_s": round(count / seconds, 1),
        "note": "device half only: the workers' shard reads and window draws are not included",
    }


# ---- the sequence -----------------------------------------------------------------------------


def cuda_tests(rehearsal: bool) -> dict[str, Any]:
    """The test suite's CUDA-only tests (`pytest -m cuda`), which skip everywhere else."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=max(30.0, min(300.0, remaining() - 10)),
    )
    summary = (proc.stdout.strip().splitlines() or [proc.stderr.strip()])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("error"):
        raise CheckFailed(f"pytest -m cuda: {summary} | {proc.stdout[-1500:]}")
    if not rehearsal and not counts.get("passed"):
        raise CheckFailed(f"pytest -m cuda ran nothing on a CUDA machine: {summary}")
    return counts | {"summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="run the same sequence on the CPU with small sizes (checks this script, not a GPU)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=570,
        help="stop starting checks (and cut running ones) after this many seconds",
    )
    parser.add_argument("--report-to", type=Path, help="also write report.md/json here")
    parser.add_argument("--worker-init-weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_init_weights:
        init_weights_worker(args.worker_init_weights, args.rehearse)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.rehearse:
        from coatnet_scale.distributed.device import cuda_unusable_reason

        print(
            f"gpu-check: no usable CUDA device here ({cuda_unusable_reason()}); run it on a "
            "machine with NVIDIA GPUs (or --rehearse to try the sequence on the CPU)"
        )
        return 2
    rehearsal = args.rehearse
    gpus = 0 if rehearsal else torch.cuda.device_count()
    ranks = 2 if rehearsal or gpus >= 2 else 1
    for stale in ("runs", "logs"):  # a previous check's run folders would be resumed
        shutil.rmtree(args.out / stale, ignore_errors=True)
    DEADLINE[0] = time.monotonic() + args.deadline_s
    report = Report(args.out, rehearsal, args.report_to)
    report.run("environment", lambda: environment(rehearsal))
    report.run("attention bias gradient", lambda: probe_attention("cpu" if rehearsal else "cuda"))

    size = 64 if rehearsal else 224
    micro = 4 if rehearsal else 32
    batch = [f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * ranks * 2}"]
    debug = ["model.image_size=64", *batch]
    coatnet0 = [f"model.image_size={size}", *batch]
    runs: list[tuple[str, str, list[str], int]] = [
        ("debug bf16", "coatnet_debug", [*debug, "precision.dtype=bf16"], 3),
        ("debug fp16", "coatnet_debug", [*debug, "precision.dtype=fp16"], 3),
        ("coatnet0 bf16", "coatnet0", [*coatnet0, "precision.dtype=bf16"], 3),
        ("coatnet0 fp16", "coatnet0", [*coatnet0, "precision.dtype=fp16"], 3),
    ]
    for name, model, overrides, steps in runs:
        if rehearsal and "fp16" in name:
            report.skip(name, "fp16 needs a GPU (DeepSpeed's CPU accelerator refuses it)")
            continue
        report.run(
            name,
            lambda n=name, m=model, o=overrides, s=steps: train_run(
                args.out, n.replace(" ", "_"), ranks, rehearsal, m, o, s
            ),
        )
    ema = [*debug, "precision.dtype=bf16", "zero.stage=1", "train.ema_decay=0.99"]
    report.run(
        "ema run", lambda: train_run(args.out, "ema", ranks, rehearsal, "coatnet_debug", ema, 3)
    )
    report.run("ema resume", lambda: ema_resume(args.out, ranks, rehearsal, ema))
    # Inductor's CPU code generation for bf16 takes many minutes on a small machine: the
    # rehearsal compiles the fp32 model at 32 px (what the 2-rank tests run).
    compiled = [
        *(["model.image_size=32", *batch, "precision.dtype=fp32"] if rehearsal else debug),
        *([] if rehearsal else ["precision.dtype=bf16"]),
        "train.compile=true",
        "activation_checkpointing.policy=all",
    ]
    report.run(
        "compile + checkpointing",
        lambda: train_run(
            args.out, "compiled", ranks, rehearsal, "coatnet_debug", compiled, 3, timeout=540
        ),
    )
    report.run(
        "identical initial weights, ZeRO-2 vs ZeRO-3", lambda: identical_init(args.out, rehearsal)
    )
    report.run("model step bf16 (ours vs timm)", lambda: model_step(rehearsal))
    report.run("planner --check bf16", lambda: planner_check(rehearsal))
    report.run("input pipeline on the device (nvJPEG)", lambda: device_pipeline(rehearsal))
    report.run("tests marked cuda", lambda: cuda_tests(rehearsal))

    if ranks < 2:
        report.skip(
            "2-rank runs (NCCL between GPUs, gradient reduction, device binding per rank)",
            f"needs 2+ GPUs; this machine has {gpus}",
        )
    report.skip(
        "SLURM: srun CPU binding (--cpus-per-task) and per-task GPU binding (--gpus-per-task=1)",
        "needs a SLURM cluster with GPUs: run tests/slurm there",
    )
    report.skip("multi-node NCCL and the planner's network model", "needs 2+ nodes")
    print(f"gpu-check: report in {args.out / 'report.md'} and report.json")
    if report.failed:
        print(f"gpu-check: FAILED: {', '.join(report.failed)}")
        return 1
    print("gpu-check: every check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
