"""One process plays local rank 5 of an 8-GPU node, on the CPU: `python fake_cuda_run.py OUT DATA`.

torch.cuda is mocked (8 devices, `set_device` changes the current one), and a torch-function mode
makes every tensor asked for on a CUDA device on the CPU instead, recording which device was asked
for. Two short train() runs (ZeRO-1 with EMA; the second resumes the first) then tell which
devices the loop used: OUT/report.json. DeepSpeed itself runs its CPU accelerator; its engine's
device is set the way its CUDA accelerator sets it, `cuda:{LOCAL_RANK}`
(`DeepSpeedEngine._set_distributed_vars`), which is what the binding must make right.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed
import torch
from torch.overrides import TorchFunctionMode

import coatnet_scale.train as training
from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.distributed.env import free_port
from coatnet_scale.ema import BufferEma
from tests.distributed.scenarios import debug_run

GIB = 2**30


class FakeEvent:
    """torch.cuda.Event on the host clock, recording the device it was recorded on (the
    straggler report times forward passes with events)."""

    recorded_on: list[int] = []

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self, stream=None) -> None:
        self.at = time.perf_counter()
        FakeEvent.recorded_on.append(torch.cuda.current_device())

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1e3


class FakeNode:
    """torch.cuda of a node with `count` GPUs, none of them real."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.current = 0
        self.set_device_calls: list[int] = []
        self.rng_restored_on: list[int] = []  # the current device at each CUDA RNG restore
        self.memory_asked_on: list[int] = []  # the device of each memory query

    def set_device(self, device) -> None:
        index = device if isinstance(device, int) else torch.device(device).index
        self.set_device_calls.append(index)
        self.current = index

    def memory_query(self, answer):
        """A torch.cuda memory function that records the device it was asked about."""

        def query(device=None):
            if isinstance(device, int):
                asked = device
            else:
                index = None if device is None else torch.device(device).index
                asked = self.current if index is None else index
            self.memory_asked_on.append(asked)
            return answer()

        return query

    def install(self) -> None:
        cuda = torch.cuda
        cuda.is_available = lambda: True
        cuda.device_count = lambda: self.count
        cuda.set_device = self.set_device
        cuda.current_device = lambda: self.current
        cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        cuda.set_rng_state = lambda state, device="cuda": self.rng_restored_on.append(self.current)
        cuda.get_device_properties = lambda device=None: SimpleNamespace(
            name="Fake GPU", uuid=f"GPU-fake-{torch.device(device).index}", total_memory=80 * GIB
        )
        cuda.mem_get_info = self.memory_query(lambda: (70 * GIB, 80 * GIB))
        for name in ("max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            setattr(cuda, name, self.memory_query(lambda: GIB))
        cuda.reset_peak_memory_stats = self.memory_query(lambda: None)
        cuda.synchronize = lambda device=None: None
        cuda.Event = FakeEvent
        # torch's own optimizers ask the accelerator API for CUDA-graph capture: no accelerator
        torch.accelerator.current_accelerator = lambda check_available=False: None


class CudaOnCpu(TorchFunctionMode):
    """Every tensor asked for on a CUDA device is made on the CPU; the device asked for is
    counted (an index-less "cuda" is the current device)."""

    def __init__(self, node: FakeNode) -> None:
        super().__init__()
        self.node = node
        self.requested: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()  # what asked: "to" (blocking or not), factories

    def _redirect(self, value):
        if isinstance(value, str) and value.startswith("cuda"):
            value = torch.device(value)
        if isinstance(value, torch.device) and value.type == "cuda":
            index = self.node.current if value.index is None else value.index
            self.requested[f"cuda:{index}"] += 1
            return torch.device("cpu")
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        before = sum(self.requested.values())
        if "device" in kwargs:
            kwargs["device"] = self._redirect(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(self._redirect(a) for a in args)
            if sum(self.requested.values()) > before:
                blocking = "non_blocking" if kwargs.get("non_blocking") else "blocking"
                self.calls[f"to {blocking}"] += 1
                before = sum(self.requested.values())
        if sum(self.requested.values()) > before:
            self.calls[getattr(func, "__name__", str(func))] += 1
        if func is torch.Tensor.cuda:
            index = args[1] if len(args) > 1 else kwargs.get("device")
            self._redirect(torch.device("cuda", index) if isinstance(index, int) else "cuda")
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


def main() -> None:
    out, data = Path(sys.argv[1]), sys.argv[2]
    port = free_port()
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="5",
        LOCAL_WORLD_SIZE="8",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    node = FakeNode(8)
    node.install()
    mode = CudaOnCpu(node)
    report: dict = {
        "current_at_init": [],
        "local_rank_at_init": [],
        "ema_load_requests": [],
        "step_calls": [],
    }

    original_init = deepspeed.init_distributed

    def init_distributed(*args, **kwargs):
        report["current_at_init"].append(torch.cuda.current_device())
        report["local_rank_at_init"].append(os.environ["LOCAL_RANK"])
        return original_init(*args, **kwargs)

    deepspeed.init_distributed = init_distributed

    original_build = training.build_engine

    def build_engine(model, cfg, ds_config):
        engine = original_build(model, cfg, ds_config)
        engine.device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        return engine

    training.build_engine = build_engine

    original_load = BufferEma.load

    def load(self, saved):
        before = sum(mode.requested.values())
        original_load(self, saved)
        report["ema_load_requests"].append([sum(mode.requested.values()) - before, len(saved)])

    BufferEma.load = load

    original_step = training.MicroBatches.step

    def step(self, *args, **kwargs):
        before = Counter(mode.calls)
        result = original_step(self, *args, **kwargs)
        report["step_calls"].append(
            {"micro_batches": self.plan.accumulation, **(mode.calls - before)}
        )
        return result

    training.MicroBatches.step = step

    micro_batches = 0
    for steps in (2, 3):  # the second run resumes the first from its step-2 checkpoint
        overrides = [
            *debug_run(data, out / "run", steps, micro_batch=4),
            "zero.stage=1",
            "train.ema_decay=0.9",
            "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0",
        ]
        cfg, _ = parse_config_args(["--model", "coatnet_debug", *overrides], config_parser("t"))
        with mode:
            training.train(cfg)
        micro_batches += cfg.train.global_batch_size // cfg.train.micro_batch_size
    report |= {
        "set_device": node.set_device_calls,
        "cuda_rng_restored_on": node.rng_restored_on,
        "requested": dict(mode.requested),
        "memory_asked_on": node.memory_asked_on,
        "events_recorded_on": FakeEvent.recorded_on,
        "train_micro_batches": micro_batches,
        "ranks": json.loads((out / "run" / "ranks.json").read_text()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
