"""Checkpoint save/load time of a 2-rank ZeRO-2 run against the raw disk speed, same run.

    python bench/checkpoint_io.py [--model coatnet0] [--repeats 3]

Starts `deepspeed --num_gpus 2 bench/checkpoint_io.py --worker OUT` (CPU, gloo). Each rank builds
the model's engine (fp32 ZeRO-2; a checkpoint holds fp32 weights plus fp32 master weights and two
Adam moments, sharded), takes one step so the optimizer has state, then, `repeats` times:
- raw write: each rank writes as many bytes as it writes into a checkpoint, 8 MiB blocks, fsync,
  both ranks at once (the same parallelism as a save); raw read: reads them back;
- plain save: DeepSpeed's `engine.save_checkpoint` alone (no commit protocol);
- our save: `checkpoint.save` (DeepSpeed's files + RNG + trainer state, checksums and fsync on
  every rank's share, manifest, atomic publish);
- our load: verification with checksums on both ranks (reading every file from the disk) +
  `engine.load_checkpoint` (then reading from the page cache); `verify` is reported alone too.
Before each read the files are evicted from the page cache (posix_fadvise DONTNEED after fsync),
so the raw read and the load both read from the disk.
Then the time to first step after a resume: a fresh engine, find + verify + load, one step.

Reported (medians): save / raw write, load / raw read, our save / plain save (the cost of the
commit protocol), and the time to first step (fresh engine, find + verify + load, one step; the
process start-up and imports are not included). Merged into bench/results.json under
"checkpoint_io".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BLOCK = 8 << 20
STEPS_DURING_SAVE = 4  # training steps run while an asynchronous save is written


def raw_write(path: Path, size: int) -> float:
    block = os.urandom(BLOCK)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, size, BLOCK):
            f.write(block[: min(BLOCK, size - offset)])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(BLOCK):
            pass
    return time.perf_counter() - start


def worker(out: Path, model_name: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from bench.common import evict
    from coatnet_scale import checkpoint
    from coatnet_scale.cli import config_parser, parse_config_args
    from coatnet_scale.distributed.engine import (
        build_engine,
        build_sharded_model,
        init_process_group,
        to_deepspeed_config,
    )
    from coatnet_scale.distributed.env import dist_env

    cfg, _ = parse_config_args(
        [
            "--model",
            model_name,
            "model.image_size=64",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "precision.dtype=fp32",
            "zero.stage=2",
            f"train.run_dir={out}/run",
        ],
        config_parser("bench"),
    )
    env = dist_env()
    device = init_process_group(cfg, env).device
    rank, world = dist.get_rank(), dist.get_world_size()

    def train_step(engine) -> None:
        images = torch.randn(2, 3, 64, 64)
        labels = torch.randint(0, cfg.model.num_classes, (2,))
        loss = torch.nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        engine.step()

    def engine_and_step():
        ds_config = to_deepspeed_config(cfg, world)
        engine = build_engine(build_sharded_model(cfg.model, 2, ds_config, device), cfg, ds_config)
        train_step(engine)
        return engine

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    engine = engine_and_step()
    root = out / "run" / "checkpoints"
    state = checkpoint.TrainerState.of(cfg, 1, {"samples_consumed": 4}, 0, None, world)
    quiet = lambda message: None  # noqa: E731
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "raw_write",
            "raw_read",
            "plain",
            "save",
            "verify",
            "load",
            "steps",
            "async_call",
            "async_stall",
            "async_stall_device",
            "async_call_device",
        )
    }
    saver = checkpoint.BackgroundSaver()

    def steps() -> None:
        for _ in range(STEPS_DURING_SAVE):
            train_step(engine)

    def device_steps() -> None:
        """Steps of a GPU-bound run as the CPU sees them: waiting, not computing (the host
        threads launch kernels and wait for the device)."""
        time.sleep(STEPS_DURING_SAVE * rows["steps"][-1] / STEPS_DURING_SAVE)

    def async_save_while(run_steps, call_row: str) -> None:
        checkpoint.save(engine, root, state, None, 1, 0, quiet, saver)
        rows[call_row].append(time.perf_counter() - call_start[0])
        run_steps()
        saver.wait()

    call_start = [0.0]
    ckpt = root / checkpoint.step_name(1)

    def verify() -> None:
        assert checkpoint.verify_on_ranks(ckpt) == []

    def load() -> None:
        checkpoint.load(engine, checkpoint.LoadPlan(root, ckpt.name, universal=False))

    for repeat in range(repeats):
        plain_root = out / f"plain{repeat}"
        rows["plain"].append(
            timed(lambda r=plain_root: engine.save_checkpoint(str(r), tag="t", save_latest=False))
        )
        rows["save"].append(timed(lambda: checkpoint.save(engine, root, state, None, 1, 0, quiet)))
        # The training stall of an asynchronous save: the same steps with a save written beside
        # them, minus the steps alone (the writer competes with training for the CPU here).
        rows["steps"].append(timed(steps))
        call_start[0] = time.perf_counter()
        with_save = timed(lambda: async_save_while(steps, "async_call"))
        rows["async_stall"].append(max(with_save - rows["steps"][-1], 0.0))
        # the same with steps that leave the CPU to the writer, as a GPU-bound run does
        idle = timed(device_steps)
        call_start[0] = time.perf_counter()
        with_save = timed(lambda: async_save_while(device_steps, "async_call_device"))
        rows["async_stall_device"].append(max(with_save - idle, 0.0))
        manifest = checkpoint.read_manifest(ckpt)
        total = sum(f["size"] for f in manifest["files"].values())
        mine = total // world
        raw = out / f"raw{rank}.bin"
        rows["raw_write"].append(timed(lambda r=raw, n=mine: raw_write(r, n)))
        evict([raw])
        rows["raw_read"].append(timed(lambda r=raw: raw_read(r)))
        if rank == 0:
            evict([ckpt / name for name in manifest["files"]])
        rows["verify"].append(timed(verify))  # reads from the disk
        rows["load"].append(rows["verify"][-1] + timed(load))  # then from the page cache
        dist.barrier()
        if rank == 0:
            shutil.rmtree(plain_root, ignore_errors=True)
        raw.unlink()

    # Time to first step after a resume: fresh engine, find + verify + load, one step.
    del engine
    dist.barrier()
    start = time.perf_counter()
    found = checkpoint.find_resume(cfg.checkpoint, out / "run", quiet)
    ds_config = to_deepspeed_config(cfg, world)
    engine = build_engine(build_sharded_model(cfg.model, 2, ds_config, device), cfg, ds_config)
    checkpoint.load(engine, checkpoint.LoadPlan(found.parent, found.name, universal=False))
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, cfg.model.num_classes, (2,))
    engine.backward(torch.nn.functional.cross_entropy(engine(images), labels))
    engine.step()
    dist.barrier()
    first_step = time.perf_counter() - start
    if rank == 0:
        params = sum(p.numel() for p in engine.module.parameters())
        (out / "result.json").write_text(
            json.dumps({"rows": rows, "bytes": total, "params": params, "first_step": first_step})
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coatnet0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.repeats)
        return

    from bench.common import cpu_name, record_result

    runs = Path(__file__).resolve().parent.parent / "runs"  # the disk runs write to
    runs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=runs, prefix="bench-checkpoint-") as tmp:
        command = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            __file__,
            "--worker",
            tmp,
            "--model",
            args.model,
            "--repeats",
            str(args.repeats),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit((proc.stdout + proc.stderr)[-3000:])
        result = json.loads((Path(tmp) / "result.json").read_text())
    med = {k: statistics.median(v) for k, v in result["rows"].items()}
    mib = result["bytes"] / 2**20
    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, 2 ranks (gloo)",
        "model": args.model,
        "params": result["params"],
        "checkpoint_mib": round(mib, 1),
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "save_vs_raw_write": round(med["save"] / med["raw_write"], 2),
        "load_vs_raw_read": round(med["load"] / med["raw_read"], 2),
        "save_vs_plain_deepspeed": round(med["save"] / med["plain"], 2),
        "async_stall_vs_sync": round(med["async_stall"] / med["save"], 2),
        "async_call_vs_sync": round(med["async_call"] / med["save"], 2),
        "async_stall_sleeping_steps_vs_sync": round(med["async_stall_device"] / med["save"], 2),
        "time_to_first_step_s": round(result["first_step"], 2),
    }
    print(f"{args.model}: {result['params']:,} parameters, checkpoint {mib:.0f} MiB over 2 ranks")
    for key in ("raw_write", "plain", "save", "raw_read", "verify", "load"):
        print(f"  {key:10s} {med[key]:7.3f} s  ({mib / med[key]:7.0f} MiB/s)")
    print(
        f"  asynchronous save: the call returns in {med['async_call']:.3f} s; training stalled "
        f"{med['async_stall']:.3f} s over {STEPS_DURING_SAVE} steps ({med['steps']:.3f} s alone): "
        f"{med['async_stall'] / med['save']:.2f}x the synchronous save; with sleeping steps (a "
        f"model of a GPU-bound run, not a measurement of one): {med['async_stall_device']:.3f} s, "
        f"{med['async_stall_device'] / med['save']:.2f}x"
    )
    print(
        f"save / raw write {record['save_vs_raw_write']}x, load / raw read "
        f"{record['load_vs_raw_read']}x, our save / DeepSpeed's plain save "
        f"{record['save_vs_plain_deepspeed']}x, time to first step after resume "
        f"{record['time_to_first_step_s']} s"
    )
    record_result("checkpoint_io", record)


if __name__ == "__main__":
    main()
