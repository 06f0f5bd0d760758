"""Per-device memory of a training step: model states under ZeRO plus the activation peak.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, section 3 and Fig. 1) for Adam with
Ψ parameters on N ranks, mixed precision (2-byte model, fp32 master weights and moments):
ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N. Measured with DeepSpeed 0.19 on 2 ranks in
the middle of gradient accumulation, when every state exists at once (bench/zero_memory.py), each
stage is within 10% of these. DeepSpeed's own estimators count more (ZeRO-2 2Ψ + 18Ψ/N: an fp32
gradient partition; ZeRO-3 18Ψ/N + 4 x largest layer) and came out 15-20% above the measurement.
In fp32 (the CPU case) DeepSpeed keeps a separate fp32 master partition next to the fp32 model
(`single_partition_of_fp32_groups` in stage_1_and_2.py), so ZeRO-1 is 8Ψ + 12Ψ/N, ZeRO-2
4Ψ + 16Ψ/N, ZeRO-3 20Ψ/N; a plain torch AdamW step (ZeRO-0) keeps 16Ψ.
bf16 runs accumulate gradients in fp32 under ZeRO (`config.fp32_gradient_accumulation`), which
adds 2Ψ to ZeRO-1 (DeepSpeed's BF16_Optimizer keeps a full fp32 gradient buffer: 6Ψ + 12Ψ/N) and
2Ψ/N to ZeRO-2 and 3 (fp32 gradient partitions: 2Ψ + 16Ψ/N, 18Ψ/N); the measurements above were
taken with bf16 accumulation, before that choice.
Gradient-reduction buckets and ZeRO-3's gathered parameters are working buffers, counted apart
(`plan.buffer_bytes`).

The activation peak walks the step the way autograd runs it (`step_peak`): the forward keeps
every unit's saved tensors (a checkpointed block keeps only its output); the backward goes
through the units in reverse, recomputing a checkpointed block's saved tensors just before its
backward, holding the incoming and outgoing activation gradients and a working set of about two
to three of the block's largest tensors, and freeing the block's saved tensors afterwards.
The working-set factors were fitted to CPU measurements (tests/unit/test_plan.py checks the whole
step against measured peaks).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from coatnet_scale.config import fp32_gradient_accumulation
from coatnet_scale.models.footprint import FP32, UnitFootprint

# Backward working set of one unit, in multiples of its largest tensor (measured on CPU: MBConv
# and stem 2.2-3.2, Transformer 0.8-1.2 of the FFN hidden map).
WORKING_SET = {"stem": 2.5, "mbconv": 2.5, "transformer": 1.5, "head": 2.0}


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of parameters, gradients and optimizer states (master weights + moments)."""

    params: float
    grads: float
    optimizer: float
    offloaded: float = 0.0  # optimizer states (and fp32 grads) kept in host memory instead

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states(
    params: int, zero_stage: int, world: int, dtype: str, offload_optimizer: bool = False
) -> ModelStates:
    """ZeRO's per-rank model states for AdamW; see the module docstring for the formulas."""
    if dtype == "fp32":
        p_bytes, g_bytes, o_bytes = 4, 4, 8 if zero_stage == 0 else 12
    else:  # gradients in fp32 where bf16 accumulates in fp32 (ZeRO 1-3)
        p_bytes, o_bytes = 2, 12
        g_bytes = 4 if fp32_gradient_accumulation(dtype, zero_stage) else 2
    n = world
    p = params * p_bytes / (n if zero_stage >= 3 else 1)
    g = params * g_bytes / (n if zero_stage >= 2 else 1)
    o = params * o_bytes / (n if zero_stage >= 1 else 1)
    if offload_optimizer:
        # ZeRO-Offload: fp32 master weights, moments and the fp32 gradient partition live in host
        # memory; the device keeps the low-precision parameters and gradient buckets.
        return ModelStates(p, 0.0, 0.0, offloaded=o + g)
    return ModelStates(p, g, o)


@dataclass(frozen=True)
class StepMemory:
    """Bytes on one device during a training step (micro-batch `batch`)."""

    before: float  # alive when the step starts (model states, buffers)
    activations_by_stage: dict[str, float]  # kept at the end of the forward pass
    peak: float  # the highest total during forward, backward and optimizer step
    peak_at: str  # where the peak happens: "forward", "backward <stage>", "optimizer"


def step_peak(
    units: Sequence[UnitFootprint],
    batch: int,
    checkpointed: Collection[str],
    before: float,
    grad_bytes_per_param: float,
    input_bytes: float,
) -> StepMemory:
    """Walk one training step: `before` bytes alive at its start (without gradients), gradients
    of `grad_bytes_per_param` allocated as the backward reaches each unit (4 for a plain fp32
    step; 0 when they live in preallocated ZeRO buffers counted in `before`), the batch of
    `input_bytes` allocated before the step."""
    ckpt = [u.stage in checkpointed and u.kind != "head" for u in units]
    kept = [
        u.output_bytes * batch if c else (u.saved_bytes + u.output_bytes) * batch + u.fixed_bytes
        for u, c in zip(units, ckpt, strict=True)
    ]
    by_stage: dict[str, float] = {}
    for u, k in zip(units, kept, strict=True):
        by_stage[u.stage] = by_stage.get(u.stage, 0) + k
    base = before + input_bytes
    peak, peak_at = base, "forward"
    # forward: a checkpointed unit runs without saving; its temporaries are short-lived
    running = 0.0
    for u, k, c in zip(units, kept, ckpt, strict=True):
        transient = 2 * u.largest_bytes * batch if c else 0.0
        if base + running + k + transient > peak:
            peak, peak_at = base + running + k + transient, "forward"
        running += k
    # backward, last unit first
    grads = 0.0
    for i in range(len(units) - 1, -1, -1):
        u = units[i]
        recompute = (u.saved_bytes * batch + u.fixed_bytes) if ckpt[i] else 0.0
        grad_out = u.output_bytes * batch
        grad_in = units[i - 1].output_bytes * batch if i else input_bytes
        working = (WORKING_SET[u.kind] * u.largest_bytes + u.backward_bytes) * batch
        grads += u.params * grad_bytes_per_param
        total = base + running + recompute + grad_out + grad_in + working + grads
        if total > peak:
            peak, peak_at = total, f"backward {u.stage}"
        running -= kept[i]
    # optimizer step: gradients complete, two fp32 temporaries of the largest parameter tensor
    total = before + grads + 2 * FP32 * max(u.largest_param for u in units)
    if total > peak:
        peak, peak_at = total, "optimizer"
    return StepMemory(before, by_stage, peak, peak_at)
