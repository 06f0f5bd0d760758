"""How many CPU cores per GPU the input pipeline needs, from measured per-core throughput.

With `data.decode=cpu` a loader worker reads, decodes the crop's region and resizes it; the
augmentation runs on the GPU either way (`data/batch_augment.py`). The per-core figures below are
bench/data_pipeline.py's "workers only" throughput on 2026-11-30: one loader worker on one core,
end to end (read, ROI decode, resize, collation, the hand-over to the training process), AMD EPYC
(bench/README.md); the sum of the stage costs measured alone agrees (787 and 402). Re-measure on
the cluster's CPUs and pass `--images-per-core`. With `data.decode=gpu` (the default on CUDA)
the workers only read bytes and draw crop windows, and nvJPEG decodes on the GPU (`make
gpu-check` measures it).
"""

from __future__ import annotations

import math

# images/s one core gets through for ImageNet-like 500x375 JPEGs (a 224 crop), and 1024x768
CPU_DECODE_IMAGES_PER_CORE = {"500x375": 801.0, "1024x768": 398.0}


def cores_per_gpu(images_per_s_per_gpu: float, images_per_core: float) -> int:
    """Loader cores one GPU needs to be fed at `images_per_s_per_gpu`, decoding on the CPU."""
    return max(1, math.ceil(images_per_s_per_gpu / images_per_core))


def input_line(images_per_s_per_gpu: float, images_per_core: float | None = None) -> str:
    """The planner's sentence on the input pipeline for the recommended configuration."""
    per_core = images_per_core or CPU_DECODE_IMAGES_PER_CORE["500x375"]
    cores = cores_per_gpu(images_per_s_per_gpu, per_core)
    large = cores_per_gpu(images_per_s_per_gpu, CPU_DECODE_IMAGES_PER_CORE["1024x768"])
    return (
        f"input: {images_per_s_per_gpu:.0f} img/s per GPU needs {cores} CPU core(s) per GPU with "
        f"data.decode=cpu at {per_core:.0f} img/s per core (500x375 JPEGs; {large} for "
        "1024x768); data.decode=gpu (auto on CUDA) decodes on the GPU and leaves the workers "
        "only the reads"
    )
