"""The scale study: CoAtNet-5/6/7 at 224 and 512 px on 8, 64 and 512 H100-80GB GPUs.

    python -m coatnet_scale.plan.study [--global-batch 4096] [--gpu h100-80gb]

Prints, per model x resolution x cluster, the planner's recommended configuration and what the
same cluster would do without activation checkpointing and under ZeRO-3; docs/scale_study.md
keeps the output with its reading.
"""

from __future__ import annotations

import argparse

from coatnet_scale.models import ModelConfig
from coatnet_scale.plan import GIB, PRESETS, Candidate, Cluster, plan, recommend

MODELS = ("coatnet5", "coatnet6", "coatnet7")
RESOLUTIONS = (224, 512)
CLUSTERS = ((1, 8), (8, 8), (64, 8))  # nodes x GPUs per node: 8, 64, 512 GPUs


def describe(c: Candidate | None, brief: bool = False) -> str:
    """A table cell (or, brief, a phrase) for a configuration; None: nothing fits."""
    if c is None:
        return "does not fit" if brief else "does not fit | - | - | - | - | -"
    config = f"ZeRO-{c.zero_stage}, ckpt {c.policy}, micro {c.micro_batch}"
    if brief:
        return f"{config}: {c.images_per_s:.0f} img/s"
    return (
        f"{config} x {c.micro_steps} | {c.memory_bytes / GIB:.1f} | {c.images_per_s:.0f} | "
        f"{c.mfu:.0%} | {c.time.step_s:.2f} | {c.time.bound}"
    )


def best_where(candidates: list[Candidate], keep) -> Candidate | None:
    return recommend([c for c in candidates if keep(c)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(PRESETS))
    args = parser.parse_args()
    hw = PRESETS[args.gpu]
    print(
        "| model | px | GPUs | recommended | GiB/GPU | img/s/GPU | MFU | step s | limited by | "
        "best without checkpointing | best under ZeRO-3 |"
    )
    print("|---" * 11 + "|")
    for name in MODELS:
        for size in RESOLUTIONS:
            model = ModelConfig(name=name, image_size=size)
            for nodes, per_node in CLUSTERS:
                cluster = Cluster(nodes, per_node, hw)
                candidates = plan(model, cluster, args.global_batch)
                no_ckpt = best_where(candidates, lambda c: c.policy == "none")
                zero3 = best_where(candidates, lambda c: c.zero_stage == 3)
                print(
                    f"| {name} | {size} | {cluster.world} | {describe(recommend(candidates))} | "
                    f"{describe(no_ckpt, brief=True)} | {describe(zero3, brief=True)} |"
                )


if __name__ == "__main__":
    main()
