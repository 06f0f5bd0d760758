"""Time of a training step on one device: compute (a roofline per unit) and ZeRO's collectives.

Compute: each unit's forward takes max(FLOPs / achievable FLOP/s, bytes moved / achievable memory
bandwidth) plus a fixed per-unit overhead (kernel launches): a roofline, with the unit's saved
tensors as the bytes it writes and reads back (MBConv's depthwise convolutions and norms are
bandwidth-bound; attention and FFN matmuls at CoAtNet widths are compute-bound). The backward
costs two forwards; a checkpointed unit one more.

Communication per optimizer step (bytes each rank sends, ring collectives of M bytes:
all-reduce 2M(N-1)/N, reduce-scatter and all-gather M(N-1)/N each), Ψ parameters of b bytes:
- ZeRO-0/1: gradients reduced once per step (DeepSpeed ZeRO-1 reduces at the accumulation
  boundary), updated parameters all-gathered: 2Ψb(N-1)/N.
- ZeRO-2: gradients reduce-scattered after every micro-batch, parameters all-gathered once:
  Ψb(N-1)/N x (micro-batches + 1).
- ZeRO-3: per micro-batch an all-gather in the forward, one in the backward and a
  reduce-scatter: 3Ψb(N-1)/N x micro-batches (the ZeRO paper's 1.5x of data parallelism).
Collectives inside a node run at NVLink speed, across nodes at each GPU's share of the NICs.
With overlap (DeepSpeed's `overlap_comm`, ZeRO-3 prefetching) communication hides behind the
backward pass (ZeRO-3: behind forward and backward); only the rest adds to the step.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from coatnet_scale.models.footprint import UnitFootprint
from coatnet_scale.plan.hardware import Hardware

BACKWARD_FORWARDS = 2.0  # a backward pass costs about two forward passes (FLOPs and traffic)
TRAFFIC_PER_SAVED_BYTE = 2.0  # each saved tensor is written once and read back at least once


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float  # all collectives of the step
    exposed_comm_s: float  # the part not hidden behind computation
    comm_bytes: float  # bytes each rank sends per step
    model_flops: float  # per device per step, without recomputation (for MFU)
    executed_flops: float  # with recomputation
    bound: str  # what limits the step: compute, memory bandwidth or communication

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def unit_forward_seconds(u: UnitFootprint, batch: int, hw: Hardware) -> tuple[float, float]:
    """(compute-bound, bandwidth-bound) forward seconds of one unit for `batch` images."""
    flops = 2 * u.macs * batch
    traffic = TRAFFIC_PER_SAVED_BYTE * ((u.saved_bytes + u.output_bytes) * batch + u.fixed_bytes)
    return (
        flops / (hw.peak_flops * hw.efficiency_compute),
        traffic / (hw.memory_bandwidth * hw.efficiency_memory),
    )


def comm_bytes_per_step(params: int, zero_stage: int, world: int, micro_steps: int) -> float:
    """Bytes each rank sends per optimizer step (2-byte gradients and parameters)."""
    if world == 1:
        return 0.0
    share = 2 * params * (world - 1) / world
    if zero_stage <= 1:
        return 2 * share
    if zero_stage == 2:
        return share * (micro_steps + 1)
    return 3 * share * micro_steps


def step_time(
    units: Sequence[UnitFootprint],
    batch: int,
    micro_steps: int,
    checkpointed: Collection[str],
    zero_stage: int,
    world: int,
    gpus_per_node: int,
    hw: Hardware,
    overlap: bool = True,
) -> StepTime:
    """Estimated seconds of one optimizer step (`micro_steps` micro-batches of `batch` images)."""
    compute_bound = memory_bound = forward = 0.0
    model_flops = executed = 0.0
    for u in units:
        flop_s, byte_s = unit_forward_seconds(u, batch, hw)
        t = max(flop_s, byte_s) + hw.unit_overhead_s
        passes = 1 + BACKWARD_FORWARDS + (1 if u.stage in checkpointed and u.kind != "head" else 0)
        forward += t
        if flop_s >= byte_s:
            compute_bound += t * passes
        else:
            memory_bound += t * passes
        model_flops += 2 * u.macs * batch * (1 + BACKWARD_FORWARDS)
        executed += 2 * u.macs * batch * passes
    compute = (compute_bound + memory_bound) * micro_steps
    volume = comm_bytes_per_step(sum(u.params for u in units), zero_stage, world, micro_steps)
    bandwidth = hw.intra_node_bandwidth if world <= gpus_per_node else hw.inter_node_bandwidth
    collectives = (
        {0: 2, 1: 2, 2: micro_steps + 1, 3: 3 * micro_steps}[zero_stage] if world > 1 else 0
    )
    latency = collectives * hw.collective_latency_s * max(1.0, math.log2(max(world, 2)))
    comm = volume / bandwidth + latency
    if overlap:
        hidden_behind = BACKWARD_FORWARDS * forward * micro_steps
        if zero_stage == 3:
            hidden_behind += forward * micro_steps
        exposed = max(0.0, comm - hidden_behind)
    else:
        exposed = comm
    if exposed > 0.5 * compute:
        bound = "communication"
    else:
        bound = "compute" if compute_bound >= memory_bound else "memory bandwidth"
    return StepTime(
        compute, comm, exposed, volume, model_flops * micro_steps, executed * micro_steps, bound
    )
