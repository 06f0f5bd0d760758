"""Cluster planner: which ZeRO stage, checkpointing policy and micro-batch fit, and how fast.

For a model, resolution and global batch on `nodes x gpus_per_node` devices, `plan()` predicts for
every ZeRO stage x activation-checkpointing policy x micro-batch the per-device memory (model
states, activations per stage, buffers), MACs, communication volume, step time and MFU, and
`recommend()` picks the fastest configuration that fits. `python -m coatnet_scale.plan` prints
the table and can write the choice as a config overlay for `launch/pretrain.py`.

Sources of each figure: `models/footprint.py` (saved tensors per block, checked against CPU
measurements), `plan/memory.py` (ZeRO formulas, the step's activation peak), `plan/cost.py`
(roofline compute time, ZeRO communication), `plan/hardware.py` (device presets). DeepSpeed's
estimators stop at model states, which for CoAtNet under ZeRO are the small part; this planner
counts the activations of a conv/attention hybrid too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coatnet_scale.models.config import STAGE_NAMES, ModelConfig
from coatnet_scale.models.footprint import AttentionKernel, UnitFootprint, unit_footprints
from coatnet_scale.plan.cost import StepTime, step_time
from coatnet_scale.plan.hardware import GIB, PRESETS, Hardware
from coatnet_scale.plan.memory import ModelStates, StepMemory, model_states, step_peak

# Checkpointing policies worth comparing: the MBConv stages first (high-resolution maps, cheap
# to recompute per byte kept), S3 alone (the deep Transformer stage that holds most activations
# of CoAtNet-5..7), then more. The overlay turns a name into `activation_checkpointing` settings.
POLICIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "stem+s1": ("stem", "s1"),
    "stem..s2": ("stem", "s1", "s2"),
    "s3": ("s3",),
    "stem..s3": ("stem", "s1", "s2", "s3"),
    "all": STAGE_NAMES,
}
USABLE_MEMORY = 0.92  # leave room for allocator fragmentation and spikes the model misses


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    hardware: Hardware

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Candidate:
    """One configuration and its predictions, per device."""

    zero_stage: int
    policy: str
    micro_batch: int
    micro_steps: int  # gradient accumulation
    states: ModelStates
    buffers: float  # gradient-reduction buckets, ZeRO-3 gathered parameters
    memory: StepMemory
    time: StepTime
    macs_per_step: float  # per device, forward MACs x 3 (+1 for recomputed units)
    memory_bytes: float  # predicted peak incl. framework overhead
    fits: bool
    images_per_s: float  # per device
    mfu: float


def buffer_bytes(
    units: Sequence[UnitFootprint], zero_stage: int, reduce_bucket: int, grad_bytes: int
) -> float:
    """DeepSpeed's working buffers during the backward pass: ZeRO-1/2 allocate two gradient
    buckets of `reduce_bucket_size` elements with overlap_comm (`setup_buckets` in
    stage_1_and_2.py); ZeRO-3 additionally holds the gathered parameters of the running and the
    prefetched block."""
    if zero_stage == 0:
        return 0.0
    total = 2.0 * reduce_bucket * grad_bytes
    if zero_stage == 3:
        total += 2 * max(u.params for u in units) * grad_bytes * 2
    return total


def evaluate(
    model: ModelConfig,
    units: Sequence[UnitFootprint],
    cluster: Cluster,
    global_batch: int,
    zero_stage: int,
    policy: str,
    micro_batch: int,
    dtype: str = "bf16",
    offload_optimizer: bool = False,
    reduce_bucket: int = 500_000_000,
) -> Candidate:
    """Predictions for one configuration."""
    world, hw = cluster.world, cluster.hardware
    per_device, rest = divmod(global_batch, world)
    if rest or per_device % micro_batch:
        raise ValueError(f"global batch {global_batch} does not split into {world} x {micro_batch}")
    micro_steps = per_device // micro_batch
    params = sum(u.params for u in units)
    act_bytes = 4 if dtype == "fp32" else 2
    states = model_states(params, zero_stage, world, dtype, offload_optimizer)
    buffers = buffer_bytes(units, zero_stage, reduce_bucket, act_bytes)
    input_bytes = micro_batch * model.in_chans * model.image_size**2 * act_bytes
    ckpt = POLICIES[policy]
    memory = step_peak(units, micro_batch, ckpt, states.total + buffers, 0.0, input_bytes)
    time = step_time(
        units, micro_batch, micro_steps, ckpt, zero_stage, world, cluster.gpus_per_node, hw
    )
    total = memory.peak + hw.framework_bytes
    macs = time.executed_flops / 2
    return Candidate(
        zero_stage,
        policy,
        micro_batch,
        micro_steps,
        states,
        buffers,
        memory,
        time,
        macs,
        total,
        total <= USABLE_MEMORY * hw.memory_bytes,
        per_device / time.step_s,
        time.model_flops / (time.step_s * hw.peak_flops),
    )


def micro_batches(per_device: int) -> list[int]:
    """Micro-batch sizes to try: the divisors of the per-device batch that are powers of two,
    plus the whole per-device batch."""
    sizes = {per_device}
    size = 1
    while size < per_device:
        if per_device % size == 0:
            sizes.add(size)
        size *= 2
    return sorted(sizes)


def plan(
    model: ModelConfig,
    cluster: Cluster,
    global_batch: int,
    dtype: str = "bf16",
    attention: AttentionKernel = "fused",
    zero_stages: Sequence[int] = (1, 2, 3),
    policies: Sequence[str] = tuple(POLICIES),
    offload_optimizer: bool = False,
    reduce_bucket: int = 500_000_000,
) -> list[Candidate]:
    """Every ZeRO stage x policy x micro-batch, fastest first (configurations that fit first)."""
    per_device, rest = divmod(global_batch, cluster.world)
    if rest or per_device == 0:
        raise ValueError(
            f"global batch {global_batch} does not split evenly over {cluster.world} devices"
        )
    units = unit_footprints(model, 4 if dtype == "fp32" else 2, attention)
    candidates = [
        evaluate(
            model,
            units,
            cluster,
            global_batch,
            stage,
            policy,
            micro,
            dtype,
            offload_optimizer,
            reduce_bucket,
        )  # fmt: skip
        for stage in zero_stages
        for policy in policies
        for micro in micro_batches(per_device)
    ]
    return sorted(candidates, key=lambda c: (not c.fits, -c.images_per_s, c.zero_stage))


def recommend(candidates: Sequence[Candidate]) -> Candidate | None:
    """The fastest configuration that fits; among equally fast ones the least sharded."""
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    best = max(c.images_per_s for c in fitting)
    near = [c for c in fitting if c.images_per_s >= 0.99 * best]
    return min(near, key=lambda c: (c.zero_stage, -c.micro_batch))


def overlay(candidate: Candidate, model: ModelConfig, global_batch: int, dtype: str) -> dict:
    """The recommended configuration as a config overlay for `launch/pretrain.py --config`."""
    stages = POLICIES[candidate.policy]
    if not stages:
        checkpointing: dict = {"policy": "none"}
    elif set(stages) == set(STAGE_NAMES):
        checkpointing = {"policy": "all"}
    else:
        checkpointing = {"policy": "stages", "stages": list(stages)}
    return {
        "model": {"name": model.name, "image_size": model.image_size},
        "train": {"global_batch_size": global_batch, "micro_batch_size": candidate.micro_batch},
        "precision": {"dtype": dtype},
        "zero": {"stage": candidate.zero_stage},
        "activation_checkpointing": checkpointing,
    }


__all__ = [
    "GIB",
    "POLICIES",
    "PRESETS",
    "Candidate",
    "Cluster",
    "Hardware",
    "evaluate",
    "overlay",
    "plan",
    "recommend",
]
