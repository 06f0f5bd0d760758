"""What a training step keeps in memory per block, counted from the config alone (no tensors).

No existing estimator covers activations of conv/attention hybrids: DeepSpeed's estimators count
model states only. This module lists, for every unit of the forward
pass (stem, each block, head), the tensors autograd saves for the backward pass, tensor by tensor,
following the code in `layers.py`:

- MBConv: the normalised input (saved by the 1x1 expansion), seven hidden-width maps (expansion
  output, BN output, GELU output, depthwise output, BN output, GELU output, SE output), the SE's
  pooled vectors, the max-pool indices (int64) of a downsampling shortcut, the pooled shortcut when
  a 1x1 projection reads it, and the output.
- Transformer: LN1 output (and its pooled copy when downsampling), the attention's saved tensors
  (see below), the output projection's input (a copy: heads are transposed back) and output, LN2
  output, the FFN's two 4D-wide maps, the output. LayerNorm statistics are fp32.
- Attention kernels differ (`layers.BIAS_GRAD_KERNELS`): on CPU the math implementation runs
  (saves scaled q and k, a contiguous v and the softmax probabilities: O(T^2) per head and image;
  in fp32 whatever the activation dtype, as PyTorch's math path upcasts bf16/fp16 by default); on
  CUDA the memory-efficient kernel, which keeps the q/k/v views of the qkv projection, the output,
  the log-sum-exp and the gathered bias (no O(T^2) per image), and whose backward allocates a
  gradient for the bias expanded over the batch, (B, heads, T, T) (`backward_bytes`).
- BatchNorm takes a bf16/fp16 input with fp32 parameters and statistics (`layers.BatchNorm2d`)
  and saves the input in its own dtype.

The counts were checked against allocations measured on CPU block by block (tests/unit/
test_footprint.py); the planner (`coatnet_scale.plan`) turns them into a peak for a whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coatnet_scale.models.config import ModelConfig
from coatnet_scale.models.flops import (
    BlockSpec,
    block_macs,
    block_specs,
    head_macs,
    stem_macs,
)
from coatnet_scale.models.layers import FFN_EXPANSION, MBCONV_EXPANSION, SE_RATIO

AttentionKernel = Literal["math", "fused"]
FP32, INT64 = 4, 8
NORM_STATS = 2 * FP32  # mean and 1/std per normalised row (LayerNorm) or channel (BatchNorm)


@dataclass(frozen=True)
class UnitFootprint:
    """One unit of the forward pass: the stem, a block, or the head (with the loss)."""

    stage: str  # stem, s1..s4, head
    kind: str  # stem, mbconv, transformer, head
    params: int
    macs: int  # forward MACs per image
    saved_bytes: int  # per image: tensors kept for the backward pass, besides the output
    output_bytes: int  # per image: the output, which the next unit keeps (checkpointed or not)
    fixed_bytes: int  # per step, whatever the batch: gathered relative-position biases, indices
    largest_bytes: int  # per image: the largest single tensor, which sizes backward's working set
    largest_param: int  # elements of the largest parameter tensor (optimizer temporaries)
    backward_bytes: int = 0  # per image: what this unit's backward allocates beyond the working
    # set of its largest tensors (the memory-efficient attention kernel's bias gradient)


def _stem(cfg: ModelConfig, act: int) -> UnitFootprint:
    width, pixels = cfg.arch().stem_width, (cfg.image_size // 2) ** 2
    params = 9 * cfg.in_chans * width + 2 * width + 9 * width * width
    # conv1 output (BN input), BN output, GELU output; conv2's output is the stem output.
    saved = 3 * act * width * pixels
    return UnitFootprint(
        "stem",
        "stem",
        params,
        stem_macs(cfg),
        saved,
        act * width * pixels,
        0,
        act * width * pixels,
        9 * width * width,
    )


def _mbconv(spec: BlockSpec, cfg: ModelConfig, act: int) -> tuple[int, int, int, int, int]:
    hidden, squeeze = MBCONV_EXPANSION * spec.dim_out, int(SE_RATIO * spec.dim_out)
    pix_in, pix_out = spec.side_in**2, spec.side_out**2
    pix_expand = pix_out if cfg.mbconv_stride == "expand1x1" else pix_in
    # BN saves the block input itself: the previous unit's output, counted there.
    saved = act * spec.dim_in * pix_in  # normalised input, read by the 1x1 expansion
    saved += 3 * act * hidden * pix_expand  # expansion out (BN in), BN out, GELU out
    saved += 4 * act * hidden * pix_out  # dwconv out (BN in), BN out, GELU out, SE out
    saved += act * (2 * hidden + 2 * squeeze)  # SE: pooled vector, its squeeze, gate
    if spec.stride > 1:
        if cfg.mbconv_pool == "max":
            saved += INT64 * spec.dim_in * pix_out  # max-pool indices
        if spec.dim_in != spec.dim_out:
            saved += act * spec.dim_in * pix_out  # pooled shortcut, read by the 1x1 projection
    params = hidden * (spec.dim_in + 9 + 4 + spec.dim_out) + 2 * spec.dim_in
    params += 2 * hidden * squeeze + hidden + squeeze + spec.dim_out
    if spec.dim_in != spec.dim_out:
        params += spec.dim_in * spec.dim_out + spec.dim_out
    largest = act * hidden * max(pix_expand, pix_out)
    return (
        params,
        saved,
        act * spec.dim_out * pix_out,
        largest,
        hidden * max(spec.dim_in, spec.dim_out),
    )


def _transformer(
    spec: BlockSpec, cfg: ModelConfig, act: int, attention: AttentionKernel
) -> tuple[int, int, int, int, int, int, int]:
    dim, heads = spec.dim_out, spec.dim_out // cfg.arch().head_dim
    tokens_in, tokens = spec.side_in**2, spec.side_out**2
    ffn = FFN_EXPANSION * dim
    saved = NORM_STATS * tokens_in  # LN1 statistics
    if spec.stride == 1 or cfg.attn_pool == "max":
        saved += act * spec.dim_in * tokens_in  # LN1 output (read by qkv, or by amax's backward)
    if spec.stride > 1:
        saved += act * spec.dim_in * tokens  # pooled LN1 output, read by the qkv projection
        if cfg.attn_pool == "max" or spec.dim_in != dim:
            saved += act * spec.dim_in * tokens  # pooled input: amax's result / the projection's
    fixed = INT64 * tokens * tokens  # the bias gather's copy of the relative-position index
    backward = 0
    if attention == "math":
        # q, k, v and the probabilities, upcast to fp32 by the math path
        saved += 3 * FP32 * dim * tokens + FP32 * heads * tokens * tokens
        largest = FP32 * heads * tokens * tokens
    else:
        # The kernel aligns the bias's last dimension to 16 elements (PyTorch pads the mask and
        # allocates the bias gradient padded): 49 -> 64, 196 -> 208 key columns.
        keys = -(-tokens // 16) * 16
        saved += 4 * act * dim * tokens + FP32 * heads * tokens  # qkv, output; log-sum-exp
        fixed += act * heads * tokens * keys  # the gathered bias, saved for its gradient
        backward = act * heads * tokens * keys  # the bias gradient, expanded over the batch
        largest = act * ffn * tokens
    saved += 2 * act * dim * tokens  # output projection: its input (a copy) and output
    saved += act * dim * tokens + NORM_STATS * tokens  # LN2 output and statistics
    saved += 2 * act * ffn * tokens  # FFN hidden before and after GELU
    params = 2 * spec.dim_in + 3 * spec.dim_in * dim + 3 * dim + dim * dim + dim
    params += heads * (2 * spec.side_out - 1) ** 2 + 2 * dim + 2 * dim * ffn + ffn + dim
    if spec.dim_in != dim:
        params += spec.dim_in * dim + dim
    largest = max(largest, act * ffn * tokens)
    largest_param = max(3 * spec.dim_in * dim, dim * ffn)
    return params, saved, act * dim * tokens, fixed, largest, largest_param, backward


def _head(cfg: ModelConfig, act: int) -> UnitFootprint:
    dim, classes = cfg.arch().stages[-1][-1].width, cfg.num_classes
    prelogits = cfg.head == "gap_ln_prelogits_fc"
    params = dim * classes + classes + ((2 * dim + dim * dim + dim) if prelogits else 0)
    # pooled features, LN output, pre-logits before/after tanh; the loss's fp32 log-softmax
    saved = act * dim * (4 if prelogits else 1) + FP32 * classes
    return UnitFootprint(
        "head",
        "head",
        params,
        head_macs(cfg),
        saved,
        act * classes,
        0,
        FP32 * classes,
        dim * max(dim if prelogits else 0, classes),
    )


def unit_footprints(
    cfg: ModelConfig, act_bytes: int, attention: AttentionKernel = "fused"
) -> list[UnitFootprint]:
    """Stem, every block of S1..S4 and the head, in forward order, for activations of
    `act_bytes` bytes per element (4 fp32, 2 bf16/fp16) and the given attention kernel."""
    units = [_stem(cfg, act_bytes)]
    for spec in block_specs(cfg):
        macs = block_macs(spec, cfg.mbconv_stride)
        if spec.kind == "mbconv":
            params, saved, output, largest, biggest = _mbconv(spec, cfg, act_bytes)
            fixed = backward = 0
        else:
            params, saved, output, fixed, largest, biggest, backward = _transformer(
                spec, cfg, act_bytes, attention
            )
        units.append(
            UnitFootprint(
                spec.stage,
                spec.kind,
                params,
                macs,
                saved,
                output,
                fixed,
                largest,
                biggest,
                backward,
            )
        )
    units.append(_head(cfg, act_bytes))
    return units
