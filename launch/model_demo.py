"""Model demo: the CoAtNet family at a glance, then one real training step of one variant on CPU.

    python launch/model_demo.py                      # CoAtNet-0 at 224, batch 2
    python launch/model_demo.py --model coatnet_debug --batch-size 8
    python launch/model_demo.py model.name=coatnet1 model.image_size=384

Prints, for every variant, the parameter count (built on the meta device: nothing is allocated)
against the paper, and the analytic MACs; then, for the chosen variant, a per-stage table and the
timing of one forward/backward/AdamW step in the configured precision.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.models import ARCHS, STAGE_NAMES, ModelConfig, build_model
from coatnet_scale.models.flops import stage_macs, total_macs


def _count(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def family_table(image_size: int) -> list[str]:
    """One line per variant: parameters vs paper, MACs at 224 and at the chosen size."""
    extra = image_size != 224
    lines = [
        f"{'variant':<14}{'params':>15}{'paper':>9}{'diff':>8}{'GMACs@224':>11}"
        + (f"{f'GMACs@{image_size}':>11}" if extra else "")
    ]
    for name, arch in ARCHS.items():
        cfg = ModelConfig(name=name)
        params = _count(build_model(cfg, "meta"))
        paper = f"{arch.paper_params / 1e6:.0f}M" if arch.paper_params else "-"
        diff = f"{100 * (params / arch.paper_params - 1):+.1f}%" if arch.paper_params else "-"
        at_size = total_macs(ModelConfig(name=name, image_size=image_size)) / 1e9
        lines.append(
            f"{name:<14}{params:>15,}{paper:>9}{diff:>8}{total_macs(cfg) / 1e9:>11.2f}"
            + (f"{at_size:>11.2f}" if extra else "")
        )
    lines.append(
        "coatnet6 with model.c6_s4_width=3072 (the suspected Table 12 erratum): "
        f"{_count(build_model(ModelConfig(name='coatnet6', c6_s4_width=3072), 'meta')):,}"
    )
    return lines


def stage_table(cfg: ModelConfig, model: torch.nn.Module) -> list[str]:
    prefixes = {
        "stem": "stem.",
        "s1": "stages.0.",
        "s2": "stages.1.",
        "s3": "stages.2.",
        "s4": "stages.3.",
        "head": "head.",
    }
    lines = [f"{'stage':<6}{'params':>14}{'GMACs':>9}{'output':>18}"]
    for row in stage_macs(cfg):
        shape = f"{row.out_channels}x{row.out_size}x{row.out_size}"
        lines.append(
            f"{row.name:<6}{_count(model, prefixes[row.name]):>14,}"
            f"{row.macs / 1e9:>9.3f}{shape:>18}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = config_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2, help="images in the demo step")
    cfg, args = parse_config_args(argv, parser)
    torch.manual_seed(cfg.train.seed)
    mcfg = cfg.model

    print("\n".join(family_table(mcfg.image_size)), end="\n\n")

    model = build_model(mcfg, "cpu")
    model.set_grad_checkpointing(True, cfg.activation_checkpointing.checkpointed_stages())
    print(
        f"{mcfg.name} at {mcfg.image_size}px, {mcfg.num_classes} classes, "
        f"MBConv stride on {mcfg.mbconv_stride}, attention pool {mcfg.attn_pool}, "
        f"head {mcfg.head}, checkpointed stages {sorted(model.grad_checkpointing) or 'none'}"
    )
    print("\n".join(stage_table(mcfg, model)), end="\n\n")

    images = torch.randn(args.batch_size, mcfg.in_chans, mcfg.image_size, mcfg.image_size)
    labels = torch.randint(0, mcfg.num_classes, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    precision = cfg.precision.dtype
    if precision != "fp32" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        # Without AVX-512, CPU bf16/fp16 kernels are emulated and ~10x slower than fp32 here.
        print(
            f"note: {precision} is emulated on this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}); the demo step runs in fp32"
        )
        precision = "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    autocast = precision != "fp32"
    timings = []
    for _ in range(2):  # the first step includes one-time set-up; report the second
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype[precision], enabled=autocast):
            loss = torch.nn.functional.cross_entropy(
                model(images), labels, label_smoothing=cfg.train.label_smoothing
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    step = timings[-1]
    macs = total_macs(mcfg) * args.batch_size
    print(
        f"one training step ({precision}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads): {step:.2f} s, loss {loss.item():.3f}, "
        f"{3 * 2 * macs / step / 1e9:.1f} GFLOP/s"
    )
    tables = [name for name, _ in model.named_parameters() if name.endswith("rel_pos.table")]
    print(
        f"{len(tables)} relative-position tables (one per attention layer, one slice per head); "
        f"stages {', '.join(s for s in STAGE_NAMES if s != 'stem')}"
    )
    return {"step_seconds": step, "loss": loss.item()}


if __name__ == "__main__":
    main()
