"""CoAtNet building blocks: stem, MBConv, relative attention, Transformer block, classifier head.

Paper: Dai et al., "CoAtNet: Marrying Convolution and Attention for All Data Sizes",
arXiv:2106.04803v2 ([P]); details the paper leaves open follow the official MaxViT code ([MV]) as
recommended in docs/architecture.md (sections 2 and 4).

Layouts: convolutional blocks take and return NCHW tensors (optionally in channels_last memory);
Transformer blocks take and return NHWC tensors, so LayerNorm and Linear run on the last dimension
without the permutes a 2D LayerNorm needs. A channels_last NCHW tensor and its NHWC view share
memory, so switching layouts between stages costs nothing.

Construction never initialises weights: `init_weights` in coatnet.py does that, so a model can be
built on the meta device (or under deepspeed.zero.Init) and initialised afterwards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerNorm2d,
    Mlp,
    NormMlpClassifierHead,
    SEModule,
    register_notrace_function,
    register_notrace_module,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

PoolType = Literal["avg", "max"]
# Attention kernels that return a gradient for an additive bias, in order of preference
# (`RelPosAttention`): never cuDNN or flash attention, which do not.
BIAS_GRAD_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
Layout = Literal["nchw", "nhwc"]

BN_EPS = 1e-5  # PyTorch/timm convention; [MV] uses the TF values eps 1e-3, momentum 0.99
LN_EPS = 1e-5  # [MV]
FFN_EXPANSION = 4  # [P Table 3 caption]
MBCONV_EXPANSION = 4  # [P Table 3 caption]; hidden width from the output width, as in [MV]
SE_RATIO = 0.25  # [P Table 3 caption]; squeeze width int(0.25 * D_out), as in [MV] and timm


def pool2x2_nchw(x: torch.Tensor, pool: str) -> torch.Tensor:
    """2x2 pooling with stride 2 on an NCHW tensor."""
    return F.max_pool2d(x, 2) if pool == "max" else F.avg_pool2d(x, 2)


def pool2x2_nhwc(x: torch.Tensor, pool: str) -> torch.Tensor:
    """2x2 pooling with stride 2 on an NHWC tensor, by reshaping (no permute to NCHW)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.amax(dim=(2, 4)) if pool == "max" else x.mean(dim=(2, 4))


@register_notrace_module  # a leaf for FX, as torch.nn's own BatchNorm2d is
class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose statistics and affine parameters stay fp32 when the model runs in bf16/fp16.

    DeepSpeed's bf16/fp16 modes cast every parameter and buffer to the low precision; running
    statistics accumulated in bf16 would drift, and the kernels refuse bf16 parameters next to
    fp32 statistics. PyTorch's batch-norm kernels (cuDNN and native on CUDA, native on CPU) take a
    bf16/fp16 input with fp32 weight, bias and statistics directly ("mixed type": they accumulate
    in fp32 and save the input in its own dtype for the backward), so only the per-channel
    parameters are cast, not the activation: an fp32 copy of every BN input would double the
    memory of the largest maps of the network.

    Written without `super().forward` and with the buffer repair outside TorchScript, so the
    model scripts (`torch.jit.script`); `.float()` of an fp32 tensor is the tensor itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _fp32_statistics(self)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm2d
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight.float(),
            self.bias.float(),
            self.training or not self.track_running_stats,
            exponential_average_factor,
            self.eps,
        )


def _fp32_statistics(norm: nn.Module) -> None:
    """Running statistics back to fp32 if a low-precision cast made them bf16/fp16."""
    if norm.running_mean is not None and norm.running_mean.dtype != torch.float32:
        norm.running_mean.data = norm.running_mean.float()
        norm.running_var.data = norm.running_var.float()


@register_notrace_function  # FX: its test of dtypes and shapes runs, not traced
def residual_add(branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """branch + shortcut, written into `branch` when that is safe.

    `branch` is the output of a conv/linear (or of DropPath), whose backward does not need it, so
    adding in place saves one activation-sized allocation per residual. Under autocast the branch
    may be bf16 while the residual stream is fp32: then the sum is a new fp32 tensor, keeping the
    stream in full precision.
    """
    if branch.dtype == shortcut.dtype and branch.shape == shortcut.shape:
        return branch.add_(shortcut)
    return branch + shortcut


class Stem(nn.Module):
    """S0: conv3x3/2 -> BN -> GELU -> conv3x3 [P Fig. 4].

    No norm or activation after the second conv, because the next block is pre-normed; no conv bias
    (as in timm, which is what the reference parameter counts assume).
    """

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.layout: str = "nchw"  # a `Layout`; an instance attribute so TorchScript sees it
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False)
        self.norm1 = BatchNorm2d(width, eps=BN_EPS)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x))))


class MBConvBlock(nn.Module):
    """Pre-activation MBConv with SE [P §2.2, A.1].

    Regular block: x + DropPath(body(BN(x))), body = 1x1 expand (4 D_out) -> BN/GELU -> dw3x3 ->
    BN/GELU -> SE(int(0.25 D_out), SiLU) -> 1x1 project.

    Downsampling block, Eq. (5): Proj(Pool(x)) + body(BN(x)) with the stride on the 1x1 expansion
    (`stride_on="expand1x1"`), or on the depthwise conv (`"dwconv"`, the "Strided DConv" row of
    Table 9 and timm's default). The shortcut projection exists only when the width changes.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        stride: int,
        stride_on: Literal["expand1x1", "dwconv"],
        pool: PoolType,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.layout: str = "nchw"
        hidden = MBCONV_EXPANSION * dim_out
        self.stride = stride
        self.pool = pool
        self.shortcut = nn.Conv2d(dim_in, dim_out, 1, bias=True) if dim_in != dim_out else None
        self.norm = BatchNorm2d(dim_in, eps=BN_EPS)
        expand_stride = stride if stride_on == "expand1x1" else 1
        dw_stride = stride if stride_on == "dwconv" else 1
        self.conv_expand = nn.Conv2d(dim_in, hidden, 1, stride=expand_stride, bias=False)
        self.norm_expand = BatchNorm2d(hidden, eps=BN_EPS)
        self.conv_dw = nn.Conv2d(
            hidden, hidden, 3, stride=dw_stride, padding=1, groups=hidden, bias=False
        )
        self.norm_dw = BatchNorm2d(hidden, eps=BN_EPS)
        self.act = nn.GELU()
        self.se = SEModule(hidden, rd_channels=int(SE_RATIO * dim_out), act_layer=nn.SiLU)
        self.conv_proj = nn.Conv2d(hidden, dim_out, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = pool2x2_nchw(x, self.pool) if self.stride > 1 else x
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        y = self.act(self.norm_expand(self.conv_expand(self.norm(x))))
        y = self.act(self.norm_dw(self.conv_dw(y)))
        y = self.conv_proj(self.se(y))
        return residual_add(self.drop_path(y), shortcut)


def _relative_position_index(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat index into a (2H-1)x(2W-1) table for every (query, key) pair of an HxW grid.

    index[i, j] = (row_i - row_j + H - 1) * (2W - 1) + (col_i - col_j + W - 1): the query-minus-key
    convention of [P] Eq. (3) read with (i, j) as the query. Ours, not timm's
    `gen_relative_position_index` (the same index, tested): TorchScript cannot compile timm's.
    """
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + height - 1
    d_col = cols[:, None] - cols[None, :] + width - 1
    return d_row * (2 * width - 1) + d_col


# Cached per grid and device, so the index is neither a buffer (nothing to re-create after
# building on meta) nor recomputed each step.
relative_position_index = lru_cache(maxsize=64)(_relative_position_index)


def resize_rel_pos_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize per-head (2H-1)x(2W-1) tables to a new grid by bilinear interpolation [P A.1].

    `align_corners=False` is the half-pixel convention of `tf.image.resize` used by [MV]. Unlike
    timm's BEiT-style geometric resampling, this is the paper's plain bilinear resize.
    Differentiable: a model run at another size than it was built for trains its tables through it.
    """
    size = (2 * grid[0] - 1, 2 * grid[1] - 1)
    if table.shape[-2] == size[0] and table.shape[-1] == size[1]:
        return table
    resized = F.interpolate(table[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].to(table.dtype)


@register_notrace_module  # FX: called with the traced grid size, not traced through
class RelPosBias(nn.Module):
    """One trainable (2H-1)x(2W-1) bias table per head [P §2.1 Eq. (3), A.1; kecam issue #10].

    `forward(height, width)` gathers the (heads, HW, HW) bias added to the attention logits before
    the softmax, for any grid: the table is kept at the size the model was built for and resized
    bilinearly (`resize_rel_pos_table`, as a checkpoint loaded at another resolution) when the
    input's grid differs, so one model runs at any input size. What depends only on the grid, the
    gather index, is cached per grid (`relative_position_index`). The resized table and the
    gathered bias are recomputed each call (a small interpolation and one gather, against the
    attention's B x heads x T x T): a cache keyed on the table's storage and version missed writes
    through `.data` (the EMA evaluation swaps weights that way), and one per grid grew without
    bound across evaluation sizes.
    """

    def __init__(self, num_heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.table = nn.Parameter(torch.empty(num_heads, 2 * grid[0] - 1, 2 * grid[1] - 1))

    def set_grid(self, grid: tuple[int, int]) -> None:
        """Change the built grid, resizing the table bilinearly (fine-tuning at 384/512)."""
        with torch.no_grad():
            self.table = nn.Parameter(resize_rel_pos_table(self.table.data, grid))
        self.grid = grid

    def forward(self, height: int, width: int) -> torch.Tensor:
        return _gather_bias(self.table, height, width)


def _gather_bias(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    table = resize_rel_pos_table(table, (height, width))
    # Two branches, not one `or`: TorchScript compiles only the first (is_scripting is constant
    # for it) and cannot compile torch.compiler.is_compiling.
    if torch.jit.is_scripting():  # noqa: SIM114
        index = _relative_position_index(height, width, table.device)
    elif torch.compiler.is_compiling():  # traced into the graph: no cache call for Dynamo
        index = _relative_position_index(height, width, table.device)
    else:
        index = relative_position_index(height, width, table.device)
    return table.flatten(1)[:, index]


@register_notrace_function  # FX keeps the kernel choice (a traced `with` would be lost)
def biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Softmax attention with an additive bias that gets a gradient (`BIAS_GRAD_KERNELS`)."""
    if torch.jit.is_scripting():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with sdpa_kernel(BIAS_GRAD_KERNELS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class RelPosAttention(nn.Module):
    """Multi-head self-attention with a pre-softmax relative bias, on NHWC tokens [P Eq. (3)].

    q, k, v map D_in to heads * head_dim with heads = D_out / head_dim (the [MV] convention that
    matches the published parameter counts, docs/architecture.md section 4, row 5); the output
    projection maps to D_out.
    The bias is passed to `scaled_dot_product_attention` as an additive mask that needs a
    gradient. Not every kernel returns one: cuDNN attention (which PyTorch may prefer on H100) and
    the flash kernels do not, which would either fail or leave the tables untrained. So the choice
    is explicit (`BIAS_GRAD_KERNELS`): the memory-efficient kernel, which computes the bias
    gradient (CUDA; it keeps no T x T probabilities but allocates a (B, heads, T, T) bias gradient
    in the backward, which the planner counts), else the math implementation (CPU, and shapes
    the memory-efficient kernel refuses).
    """

    def __init__(self, dim_in: int, dim_out: int, head_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if dim_out % head_dim:
            raise ValueError(f"width {dim_out} is not a multiple of the head size {head_dim}")
        self.num_heads = dim_out // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim_in, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)
        self.rel_pos = RelPosBias(self.num_heads, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = biased_attention(q, k, v, self.rel_pos(h, w).to(q.dtype))
        return self.proj(y.transpose(1, 2).reshape(b, h, w, -1))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block with relative attention ("TFMRel") on NHWC tokens.

    Regular: x + DropPath(Attn(LN(x))), then x + DropPath(FFN(LN(x))).
    Downsampling, Eq. (4): Proj(Pool(x)) + Attn(Pool(LN(x))), norm before pool [P A.1].
    Width change without pooling (first Transformer block of CoAtNet-6/7's S3): Proj(x) +
    Attn(LN(x)) [docs/architecture.md section 2.5].
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        head_dim: int,
        grid: tuple[int, int],
        stride: int,
        pool: PoolType,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.layout: str = "nhwc"
        self.stride = stride
        self.pool = pool
        self.shortcut = nn.Linear(dim_in, dim_out) if dim_in != dim_out else None
        self.norm1 = nn.LayerNorm(dim_in, eps=LN_EPS)
        self.attn = RelPosAttention(dim_in, dim_out, head_dim, grid)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, eps=LN_EPS)
        self.mlp = Mlp(dim_out, FFN_EXPANSION * dim_out, act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.stride > 1:
            x = pool2x2_nhwc(x, self.pool)
            y = pool2x2_nhwc(y, self.pool)
        if self.shortcut is not None:
            x = self.shortcut(x)
        x = residual_add(self.drop_path1(self.attn(y)), x)
        return residual_add(self.drop_path2(self.mlp(self.norm2(x))), x)


def classifier_head(width: int, num_classes: int, prelogits: bool) -> nn.Module:
    """Global average pool, then either LN + Linear/tanh pre-logits + FC, or the paper's FC.

    [P A.1] describes GAP + FC only; [MV] and timm's paper-like configs add LN and a tanh pre-logits
    layer, which the published parameter counts need (docs/architecture.md section 2.7). timm's own
    heads (maxxvit's), so `reset_classifier(0, "")` gives unpooled features, as timm's tools expect.
    """
    if prelogits:
        return NormMlpClassifierHead(
            width,
            num_classes,
            hidden_size=width,
            pool_type="avg",
            norm_layer=functools.partial(LayerNorm2d, eps=LN_EPS),
            act_layer="tanh",
        )
    return ClassifierHead(width, num_classes, pool_type="avg")


def _drawn_in_fp32_(tensor: torch.Tensor, draw: Callable[[torch.Tensor], object]) -> None:
    """Fill `tensor` with `draw` applied to an fp32 tensor, whatever the tensor's dtype, so a
    low-precision parameter gets its fp32 draw rounded, exactly what casting an fp32-initialised
    model gives (ZeRO-3 builds its parameters in the training dtype; ZeRO 0-2 in fp32, cast by
    DeepSpeed)."""
    if tensor.dtype == torch.float32:
        draw(tensor)
        return
    values = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
    draw(values)
    with torch.no_grad():
        tensor.copy_(values)


def conv_init_std(conv: nn.Conv2d) -> float:
    """He (fan-out) standard deviation of EfficientNet's conv init, with the fan-out counted per
    group as timm does: sqrt(2 / (k_h * k_w * out / groups)), so a depthwise 3x3 gets sqrt(2/9)."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    return math.sqrt(2.0 / fan_out)


def init_module_(module: nn.Module, classifier: bool = False) -> None:
    """Initialise one module's own parameters and buffers, as timm's CoAtNet does by default
    ("vit_eff"; the paper is silent):

    * convolutions (stem, MBConv, SE): N(0, `conv_init_std`), EfficientNet's He fan-out init;
    * Transformer linears (qkv, projections, FFN, shortcut): Xavier uniform, as in ViT;
    * the classifier head's layers (`classifier`: a module under `head.`) and relative-position
      tables: N(0, 0.02), truncated, the scale of PyTorch's default for these widths, which timm
      leaves the head at;
    * zero biases; norms at weight 1, bias 0.

    Why not N(0, 0.02) everywhere, as this code did before: a 0.02 conv init shrinks every MBConv
    branch (a depthwise 3x3 wants 0.47), and a CoAtNet-0 trained on the 8x8 digits stayed at
    chance for about 50 steps (8-13% top-1 at step 50 for 3 seeds), where this init reaches
    96-99% by step 50 (bench/init_plateau.py; docs/architecture.md section 2.8).

    Kept per module so that a sharded build can initialise one module at a time.
    """
    if classifier and isinstance(module, nn.Linear | nn.Conv2d):
        _drawn_in_fp32_(module.weight, lambda t: nn.init.trunc_normal_(t, std=0.02))
    elif isinstance(module, nn.Linear):
        _drawn_in_fp32_(module.weight, nn.init.xavier_uniform_)
    elif isinstance(module, nn.Conv2d):
        std = conv_init_std(module)
        _drawn_in_fp32_(module.weight, lambda t: nn.init.normal_(t, std=std))
    elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
    elif isinstance(module, RelPosBias):
        _drawn_in_fp32_(module.table, lambda t: nn.init.trunc_normal_(t, std=0.02))
    if isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
        nn.init.zeros_(module.bias)


def fp32_batchnorm_statistics(model: nn.Module) -> None:
    """Running statistics back to fp32 after a low-precision build or cast (`zero.Init` makes every
    buffer bf16/fp16). Done once, outside `forward`, so a compiled forward never meets the repair
    (it changes a buffer's dtype through `.data`, which torch.compile cannot trace)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                _fp32_statistics(m)


def grid_after(image_size: int, stride: int) -> tuple[int, int]:
    """Feature-map grid at a given total stride; image sizes are multiples of 32."""
    side = image_size // stride
    return side, side


__all__ = [
    "classifier_head",
    "MBConvBlock",
    "RelPosAttention",
    "RelPosBias",
    "Stem",
    "TransformerBlock",
    "biased_attention",
    "conv_init_std",
    "fp32_batchnorm_statistics",
    "init_module_",
    "relative_position_index",
    "resize_rel_pos_table",
    "grid_after",
]
