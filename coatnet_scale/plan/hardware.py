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


# Dense peak FLOP/s per device by GPU name, for MFU: (bf16/fp16 tensor cores, TF32, plain fp32).
# Vendor figures without sparsity; the first matching name wins (more specific names first).
GPU_PEAKS: tuple[tuple[str, tuple[float, float | None, float]], ...] = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100", (989e12, 494e12, 67e12)),  # SXM5
    ("H200", (989e12, 494e12, 67e12)),
    ("GH200", (989e12, 494e12, 67e12)),
    ("B200", (2250e12, 1100e12, 75e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("A10", (125e12, 62.5e12, 31.2e12)),
)


def device_peak_flops(device_name: str, dtype: str, tf32: bool) -> float | None:
    """The dense peak of a GPU named `device_name` for compute in `dtype` (fp32 uses TF32 when
    `tf32`), or None when the GPU is not in `GPU_PEAKS` (MFU is then left out, never divided by
    another device's peak). CPUs have no entry: configure `logging.peak_flops` to get MFU."""
    for key, (low, tf32_peak, fp32_peak) in GPU_PEAKS:
        if key in device_name:
            if dtype in ("bf16", "fp16"):
                return low
            return tf32_peak if tf32 and tf32_peak else fp32_peak
    return None
