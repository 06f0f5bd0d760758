"""Check the memory model against a measured training step on this machine.

One process, no DeepSpeed: the model, AdamW and a step of forward + cross-entropy + backward +
optimizer update, the way a ZeRO-0 rank runs it. The peak is measured with
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


def measure_step_peak(
    cfg: ModelConfig,
    batch: int,
    checkpointed: Collection[str] = (),
    device: str = "cpu",
) -> PeakCheck:
    """Measured and predicted peak memory of one fp32 training step (the second: the first
    creates AdamW's moments)."""
    torch.manual_seed(0)
    model = build_model(cfg, device).train()
    if checkpointed:
        model.set_grad_checkpointing(True, tuple(checkpointed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    images = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    before = tensor_bytes([*model.parameters(), *model.buffers()])
    before += optimizer_state_bytes(optimizer)
    with track_allocations(device) as allocations:
        step()
    params = sum(p.numel() for p in model.parameters())
    states = model_states(params, 0, 1, "fp32").total
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # the attention kernel PyTorch picks for a bias that needs a gradient (models/footprint.py)
    kernel = "fused" if torch.device(device).type == "cuda" else "math"
    predicted = step_peak(
        unit_footprints(cfg, 4, kernel),
        batch,
        tuple(checkpointed),
        before=states - 4 * params + buffers,  # gradients are allocated during the step
        grad_bytes_per_param=4,
        input_bytes=0,  # the batch exists before the step, outside the tracked allocations
    )
    return PeakCheck(
        cfg.name,
        cfg.image_size,
        batch,
        tuple(checkpointed),
        before,
        states - 4 * params + buffers,
        before + allocations.peak_bytes,
        predicted.peak,
        predicted.peak_at,
    )
