"""Analytic per-stage MAC counts of a CoAtNet, computed from the config alone (no tensors).

The paper's "FLOPs" are multiply-accumulates (spec section 3.2: torch's FlopCounterMode gives 2x
these numbers on timm's coatnet_0_224). Counted: convolutions, linear layers, the SE layers and the
two attention matmuls (QK^T and AV), i.e. exactly the ops torch's FlopCounterMode counts. Not
counted: norms, activations, pooling, softmax and the relative-bias add, which is why these counts
come out 1-3.5% below the paper's (spec section 3.2). The planner and the MFU estimate build on
this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from coatnet_scale.models.config import STAGE_NAMES, ModelConfig, Segment
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


def _segment_macs(
    seg: Segment, first_in_stage: bool, dim_in: int, side_in: int, stride_on: str
) -> tuple[int, int]:
    macs = 0
    for i in range(seg.depth):
        stride = 2 if first_in_stage and i == 0 else 1
        if seg.block == "mbconv":
            macs += _mbconv_macs(dim_in, seg.width, side_in, stride, stride_on)
        else:
            macs += _transformer_macs(dim_in, seg.width, side_in, stride)
        side_in //= stride
        dim_in = seg.width
    return macs, side_in


def stage_macs(cfg: ModelConfig) -> list[StageMacs]:
    """Forward MACs per image for stem, S1..S4 and the head, at `cfg.image_size`."""
    arch = cfg.arch()
    side = cfg.image_size // 2
    stem = 9 * cfg.in_chans * arch.stem_width * side**2 + 9 * arch.stem_width**2 * side**2
    rows = [StageMacs("stem", stem, arch.stem_width, side)]
    dim = arch.stem_width
    for name, segments in zip(STAGE_NAMES[1:], arch.stages, strict=True):
        macs = 0
        for seg_index, seg in enumerate(segments):
            seg_macs, side = _segment_macs(seg, seg_index == 0, dim, side, cfg.mbconv_stride)
            macs += seg_macs
            dim = seg.width
        rows.append(StageMacs(name, macs, dim, side))
    head = dim * cfg.num_classes
    if cfg.head == "gap_ln_prelogits_fc":
        head += dim * dim
    rows.append(StageMacs("head", head, cfg.num_classes, 1))
    return rows


def total_macs(cfg: ModelConfig) -> int:
    """Forward MACs per image of the whole model."""
    return sum(row.macs for row in stage_macs(cfg))


def training_flops_per_image(cfg: ModelConfig) -> int:
    """FLOPs of one training step per image: forward + backward = 3 forwards, 2 FLOPs per MAC."""
    return 6 * total_macs(cfg)


def activation_bytes_per_image(
    cfg: ModelConfig, bytes_per_element: int, checkpointed: tuple[str, ...] = ()
) -> dict[str, int]:
    """Rough activation memory kept for the backward pass, per image: per stage, plus
    "recompute", the working set of the largest checkpointed block while it is recomputed.

    Counts the tensors autograd saves per block (MBConv: the input and about 7 hidden-width maps
    plus 2 output-width ones; Transformer: the input, q/k/v and projections, the attention
    logits and probabilities, the FFN's two 4D-wide maps). A checkpointed stage keeps only its
    blocks' inputs. An estimate to compare configurations, not a measurement (issue 7 calibrates
    it against measured peaks).
    """
    arch = cfg.arch()
    side = cfg.image_size // 2
    stem_block = cfg.in_chans * (2 * side) ** 2 + 3 * arch.stem_width * side * side
    blocks: dict[str, list[tuple[int, int]]] = {
        "stem": [(cfg.in_chans * (2 * side) ** 2, stem_block)]
    }
    dim = arch.stem_width
    for name, segments in zip(STAGE_NAMES[1:], arch.stages, strict=True):
        blocks[name] = []
        for seg_index, seg in enumerate(segments):
            for i in range(seg.depth):
                side_out = side // 2 if seg_index == 0 and i == 0 else side
                pixels = side_out * side_out
                block_input = dim * side * side
                if seg.block == "mbconv":
                    hidden = MBCONV_EXPANSION * seg.width
                    saved = block_input + 7 * hidden * pixels + 2 * seg.width * pixels
                else:
                    heads = seg.width // arch.head_dim
                    saved = (
                        block_input
                        + 6 * seg.width * pixels
                        + 2 * heads * pixels * pixels
                        + 2 * FFN_EXPANSION * seg.width * pixels
                    )
                blocks[name].append((block_input, saved))
                side, dim = side_out, seg.width
    out = {}
    recompute = 0
    for name, items in blocks.items():
        if name in checkpointed:
            out[name] = sum(block_input for block_input, _ in items)
            recompute = max(recompute, max(saved for _, saved in items))
        else:
            out[name] = sum(saved for _, saved in items)
    out["recompute"] = recompute
    return {k: v * bytes_per_element for k, v in out.items()}
