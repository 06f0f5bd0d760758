"""`checkpoint.init_from` per rank: the old way (every rank verifies every file and merges the
whole checkpoint) against the new one (verification shared, rank 0 merges once into a
safetensors file, every rank maps it), same run, 2 ranks on CPU.

    python bench/init_from.py [--models coatnet_debug coatnet0]

For each model: a 2-rank fp32 ZeRO-2 training checkpoint (launch/pretrain.py, one step, 32 px),
then one `deepspeed --num_gpus 2 bench/init_from.py --worker ...` launch per method. Each rank
resets its peak RSS (/proc/self/clear_refs), gets the initial weights, reads every tensor (as
copying them into a ZeRO-1/2 replica does) and reports the time, its peak RSS growth, and its
proportional share of what it maps at the end (Pss: pages shared by the ranks of a node count
once in total). The page cache is dropped for the checkpoint's files before each launch.
Merged into bench/results.json under "init_from".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pss_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def worker(ckpt: Path, method: str, out: Path) -> None:
    import torch

    from coatnet_scale.checkpoint.export import consolidated_state_dict, resolve_checkpoint
    from coatnet_scale.checkpoint.init_from import consolidated_file, initial_state
    from coatnet_scale.config import load_config
    from coatnet_scale.distributed.engine import init_process_group
    from coatnet_scale.distributed.env import dist_env

    env = dist_env()
    init_process_group(load_config([], ["distributed.device=cpu"]), env)
    torch.distributed.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    rss0, start = status_kib("VmRSS"), time.perf_counter()
    if method == "old":  # what every rank did before: verify all files, merge everything
        state = consolidated_state_dict(resolve_checkpoint(ckpt, checksums=True))
    else:
        run = out.parent / "run"
        state = initial_state(consolidated_file(ckpt, False, run, True, print))
    total = sum(float(t.float().sum()) for t in state.values())  # every tensor read once
    seconds = time.perf_counter() - start
    torch.distributed.barrier()
    record = {
        "seconds": seconds,
        "peak_rss_growth_mib": (status_kib("VmHWM") - rss0) / 1024,
        "pss_mib": pss_kib() / 1024,
        "checksum": total,
    }
    Path(f"{out}.{env.rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def make_checkpoint(model: str, tmp: Path) -> Path:
    from tests.data.conftest import shard_set

    manifest = shard_set(tmp / f"{model}_data", [16])
    run = tmp / f"{model}_run"
    args = [
        str(BIN / "deepspeed"), "--num_gpus", "2", "launch/pretrain.py", "--model", model,
        f"data.train_shards={manifest}", "data.num_workers=0", "model.image_size=32",
        "model.num_classes=10", "precision.dtype=fp32", "zero.stage=2",
        "train.total_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
        "schedule.warmup_steps=0", "logging.wandb_mode=disabled", "distributed.device=cpu",
        "data.mixup_alpha=0", "data.cutmix_alpha=0",
        f"train.run_dir={run}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (ckpt,) = (run / "checkpoints").glob("step*")
    return ckpt


def measure(model: str, tmp: Path) -> dict:
    from bench.common import evict
    from coatnet_scale.checkpoint import files_under

    ckpt = make_checkpoint(model, tmp)
    files = [ckpt / name for name in files_under(ckpt)]
    size = sum(p.stat().st_size for p in files)
    result: dict = {"checkpoint_mib": size / 2**20}
    for method in ("old", "new"):
        evict(files)
        out = tmp / f"{model}_{method}" / "result"
        out.parent.mkdir()
        args = [
            str(BIN / "deepspeed"), "--num_gpus", "2", "bench/init_from.py",
            "--worker", str(ckpt), method, str(out),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["checksum"] == ranks[1]["checksum"]
        result[method] = ranks
    assert result["old"][0]["checksum"] == result["new"][0]["checksum"]  # the same weights
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["coatnet_debug", "coatnet0"])
    parser.add_argument("--worker", nargs=3, metavar=("CKPT", "METHOD", "OUT"))
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank
    if args.worker:
        ckpt, method, out = args.worker
        worker(Path(ckpt), method, Path(out))
        return
    from bench.common import cpu_name, record_result

    results = {}
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as t:
        for model in args.models:
            results[model] = measure(model, Path(t))
            r = results[model]
            for method in ("old", "new"):
                for rank, x in enumerate(r[method]):
                    print(
                        f"{model} ({r['checkpoint_mib']:.0f} MiB checkpoint) {method} rank {rank}: "
                        f"{x['seconds']:.2f} s, peak RSS +{x['peak_rss_growth_mib']:.0f} MiB, "
                        f"Pss {x['pss_mib']:.0f} MiB"
                    )
    record_result("init_from", {"date": str(date.today()), "cpu": cpu_name(), **results})


if __name__ == "__main__":
    main()
