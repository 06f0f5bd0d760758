"""Check the memory model against a measured training step on this machine.

One process, no DeepSpeed: the model, AdamW and a step of forward + cross-entropy + backward +
optimizer update, the way a ZeRO-0 rank runs it, in fp32 or in bf16/fp16 with fp32 master
weights. The peak is measured with
`coatnet_scale.memory.track_allocations` (CPU: the profiler's allocation events; CUDA: the
allocator's peak) and compared to `plan.memory.step_peak` for the same configuration. Used by
tests/unit/test_plan.py, bench/planner_accuracy.py and `python -m coatnet_scale.plan --check`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coatnet_scale.memory import optimizer_state_bytes, tensor_bytes, track_allocations
from coatnet_scale.models import ModelConfig, build_model
from coatnet_scale.models.footprint import unit_footprints
from coatnet_scale.plan.memory import model_states, step_peak


@dataclass(frozen=True)
class PeakCheck:
    model: str
    image_size: int
    batch: int
    checkpointed: tuple[str, ...]
    measured_before: int  # model states alive at the start of the step
    predicted_before: float
    measured_peak: int
    predicted_peak: float
    predicted_at: str

    @property
    def ratio(self) -> float:
        return self.predicted_peak / self.measured_peak


class MasterWeightAdamW:
    """AdamW on fp32 master copies of low-precision parameters, one parameter at a time: the
    states of DeepSpeed's bf16/fp16 optimizers (2-byte weights and gradients on the model, fp32
    master weights and moments beside them), without DeepSpeed."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params = params
        self.masters = [p.detach().float() for p in params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, foreach=False)

    def step(self) -> None:
        for param, master in zip(self.params, self.masters, strict=True):
            master.grad = param.grad.float()
            param.grad = None
            self.optimizer.step()  # only this master has a gradient
            master.grad = None
            param.data.copy_(master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def state_bytes(self) -> int:
        return tensor_bytes(self.masters) + optimizer_state_bytes(self.optimizer)


def measure_step_peak(
    cfg: ModelConfig,
    batch: int,
    checkpointed: Collection[str] = (),
    device: str = "cpu",
    dtype: str = "fp32",
) -> PeakCheck:
    """Measured and predicted peak memory of one training step (the second: the first creates
    AdamW's moments), in fp32, or in bf16/fp16 with fp32 master weights (`MasterWeightAdamW`)."""
    torch.manual_seed(0)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    model = build_model(cfg, device).train()
    if low is not None:
        model.to(low)
    if checkpointed:
        model.set_grad_checkpointing(True, tuple(checkpointed))
    if low is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    else:
        optimizer = MasterWeightAdamW(list(model.parameters()), lr=1e-4)
    images = torch.randn(
        batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device, dtype=low
    )
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step() -> None:
        F.cross_entropy(model(images).float(), labels).backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    before = tensor_bytes([*model.parameters(), *model.buffers()])
    before += (
        optimizer.state_bytes()
        if isinstance(optimizer, MasterWeightAdamW)
        else optimizer_state_bytes(optimizer)
    )
    with track_allocations(device) as allocations:
        step()
    params = sum(p.numel() for p in model.parameters())
    act = 4 if low is None else 2
    states = model_states(params, 0, 1, dtype)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # the attention kernel used with a bias that needs a gradient (layers.BIAS_GRAD_KERNELS)
    kernel = "fused" if torch.device(device).type == "cuda" else "math"
    predicted_before = states.total - states.grads + buffers  # gradients come during the step
    predicted = step_peak(
        unit_footprints(cfg, act, kernel),
        batch,
        tuple(checkpointed),
        before=predicted_before,
        grad_bytes_per_param=act,
        input_bytes=0,  # the batch exists before the step, outside the tracked allocations
    )
    return PeakCheck(
        cfg.name,
        cfg.image_size,
        batch,
        tuple(checkpointed),
        before,
        predicted_before,
        before + allocations.peak_bytes,
        predicted.peak,
        predicted.peak_at,
    )
