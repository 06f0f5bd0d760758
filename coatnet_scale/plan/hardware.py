"""The machines the planner plans for: memory, peak FLOP/s, memory and network bandwidth.

Figures are vendor peaks (dense bf16, no sparsity) and typical cluster fabrics; every field can
be overridden on the command line. `efficiency_*` are the fractions of peak that well-shaped
kernels reach (large GEMMs/convolutions ~60% of bf16 peak, streaming kernels ~80% of HBM
bandwidth) and `unit_overhead_s` the fixed cost of running one block once whatever the batch (kernel
launches, under-filled waves): it is what makes tiny micro-batches slow. All three are assumptions
until a GPU run calibrates them (bench/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int  # per device
    peak_flops: float  # dense bf16 FLOP/s per device (fp32 on CPU)
    memory_bandwidth: float  # bytes/s per device (HBM)
    intra_node_bandwidth: float  # bytes/s per device for collectives inside a node (NVLink)
    inter_node_bandwidth: float  # bytes/s per device across nodes (its share of the NICs)
    collective_latency_s: float = 20e-6  # per collective and ring/tree hop level
    framework_bytes: int = 0  # CUDA context, NCCL and cuBLAS workspaces, allocator slack
    unit_overhead_s: float = 60e-6  # per block and pass: ~15 kernel launches and small-batch tails
    efficiency_compute: float = 0.6
    efficiency_memory: float = 0.8


PRESETS: dict[str, Hardware] = {
    # H100 SXM5 80GB: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink4 450 GB/s per direction;
    # 8x 400 Gb/s InfiniBand per 8-GPU node = 50 GB/s per GPU.
    "h100-80gb": Hardware("h100-80gb", 80 * GB, 989e12, 3.35e12, 450 * GB, 50 * GB, 20e-6, 2 * GIB),
    # H200 141GB: same compute as H100, 4.8 TB/s HBM3e.
    "h200-141gb": Hardware(
        "h200-141gb", 141 * GB, 989e12, 4.8e12, 450 * GB, 50 * GB, 20e-6, 2 * GIB
    ),
    # A100 SXM4 80GB: 312 TFLOP/s bf16, 2.04 TB/s, NVLink3 300 GB/s; 200 Gb/s HDR per GPU.
    "a100-80gb": Hardware("a100-80gb", 80 * GB, 312e12, 2.04e12, 300 * GB, 25 * GB, 20e-6, 2 * GIB),
}
