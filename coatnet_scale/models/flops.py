"""Analytic per-stage MAC counts of a CoAtNet, computed from the config alone (no tensors).

The paper's "FLOPs" are multiply-accumulates (docs/architecture.md section 3.2: torch's
FlopCounterMode gives 2x these numbers on timm's coatnet_0_224). Counted: convolutions, linear
layers, the SE layers and the two attention matmuls (QK^T and AV), i.e. exactly the ops torch's
FlopCounterMode counts. Not counted: norms, activations, pooling, softmax and the relative-bias add,
which is why these counts come out 1-3.5% below the paper's (docs/architecture.md section 3.2). The
planner, the MFU estimate and the memory footprint (`footprint.py`) build on this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from coatnet_scale.models.config import STAGE_NAMES, ModelConfig
from coatnet_scale.models.layers import FFN_EXPANSION, MBCONV_EXPANSION, SE_RATIO


@dataclass(frozen=True)
class StageMacs:
    """Forward MACs per image of one stage (or the head)."""

    name: str
    macs: int
    out_channels: int
    out_size: int  # side of the (square) output feature map; 1 for the head


def _mbconv_macs(dim_in: int, dim_out: int, side_in: int, stride: int, stride_on: str) -> int:
    side = side_in // stride
    hidden = MBCONV_EXPANSION * dim_out
    squeeze = int(SE_RATIO * dim_out)
    expand_side = side if stride_on == "expand1x1" else side_in
    macs = dim_in * hidden * expand_side**2  # 1x1 expansion
    macs += 9 * hidden * side**2  # depthwise 3x3 (output resolution in both modes)
    macs += 2 * hidden * squeeze  # SE reduce + expand, on the pooled vector
    macs += hidden * dim_out * side**2  # 1x1 projection
    if dim_in != dim_out:
        macs += dim_in * dim_out * side**2  # shortcut projection
    return macs


def _transformer_macs(dim_in: int, dim_out: int, side_in: int, stride: int) -> int:
    side = side_in // stride
    tokens = side * side
    macs = 3 * dim_in * dim_out * tokens  # q, k, v projections (heads * head_dim = dim_out)
    macs += 2 * tokens * tokens * dim_out  # QK^T and attention-weighted V over all heads
    macs += dim_out * dim_out * tokens  # output projection
    macs += 2 * FFN_EXPANSION * dim_out * dim_out * tokens  # FFN
    if dim_in != dim_out:
        macs += dim_in * dim_out * tokens  # shortcut projection
    return macs


@dataclass(frozen=True)
class BlockSpec:
    """Shape of one block of S1..S4: what both the MAC and the memory counts read."""

    stage: str
    kind: str  # "mbconv" or "transformer"
    dim_in: int
    dim_out: int
    side_in: int  # side of the (square) input feature map
    stride: int  # 2 for the first block of a stage, else 1

    @property
    def side_out(self) -> int:
        return self.side_in // self.stride


def block_specs(cfg: ModelConfig) -> list[BlockSpec]:
    """Every block of S1..S4 in forward order [P Table 3; A.2 for the split S3 of CoAtNet-6/7]."""
    arch = cfg.arch()
    side, dim = cfg.image_size // 2, arch.stem_width
    specs = []
    for name, segments in zip(STAGE_NAMES[1:], arch.stages, strict=True):
        for seg_index, seg in enumerate(segments):
            for i in range(seg.depth):
                stride = 2 if seg_index == 0 and i == 0 else 1
                specs.append(BlockSpec(name, seg.block, dim, seg.width, side, stride))
                side, dim = side // stride, seg.width
    return specs


def block_macs(spec: BlockSpec, stride_on: str) -> int:
    """Forward MACs per image of one block."""
    if spec.kind == "mbconv":
        return _mbconv_macs(spec.dim_in, spec.dim_out, spec.side_in, spec.stride, stride_on)
    return _transformer_macs(spec.dim_in, spec.dim_out, spec.side_in, spec.stride)


def stem_macs(cfg: ModelConfig) -> int:
    side, width = cfg.image_size // 2, cfg.arch().stem_width
    return 9 * cfg.in_chans * width * side**2 + 9 * width**2 * side**2


def head_macs(cfg: ModelConfig) -> int:
    dim = cfg.arch().stages[-1][-1].width
    return dim * cfg.num_classes + (dim * dim if cfg.head == "gap_ln_prelogits_fc" else 0)


def stage_macs(cfg: ModelConfig) -> list[StageMacs]:
    """Forward MACs per image for stem, S1..S4 and the head, at `cfg.image_size`."""
    arch = cfg.arch()
    rows = [StageMacs("stem", stem_macs(cfg), arch.stem_width, cfg.image_size // 2)]
    specs = block_specs(cfg)
    for name in STAGE_NAMES[1:]:
        stage = [s for s in specs if s.stage == name]
        macs = sum(block_macs(s, cfg.mbconv_stride) for s in stage)
        rows.append(StageMacs(name, macs, stage[-1].dim_out, stage[-1].side_out))
    rows.append(StageMacs("head", head_macs(cfg), cfg.num_classes, 1))
    return rows


def total_macs(cfg: ModelConfig) -> int:
    """Forward MACs per image of the whole model."""
    return sum(row.macs for row in stage_macs(cfg))


def training_flops_per_image(cfg: ModelConfig) -> int:
    """FLOPs of one training step per image: forward + backward = 3 forwards, 2 FLOPs per MAC."""
    return 6 * total_macs(cfg)
