"""The CoAtNet model: S0 stem, S1-S2 MBConv, S3-S4 Transformer with relative attention.

Paper: Dai et al. 2021, arXiv:2106.04803v2, Table 3 (C-C-T-T layout), Appendix A.1 (blocks,
downsampling Eq. (4)/(5), head) and A.2 (CoAtNet-5..7, the split S3 of CoAtNet-6/7). The variant
table lives in `models/config.py`; docs/architecture.md documents every choice the paper leaves
open and where this implementation departs from it (the switches of `ModelConfig`).

The model follows timm's conventions (forward_features / forward_head, reset_classifier,
set_grad_checkpointing, no_weight_decay, pretrained_cfg) and torchtitan's build contract:
construction allocates no initialised weights; `init_weights()` does, so the model can be built on
the meta device or under `deepspeed.zero.Init` (applied from `distributed/`, never here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from coatnet_scale.models.config import (
    STAGE_NAMES,
    CoAtNetArch,
    ModelConfig,
    block_drop_rates,
)
from coatnet_scale.models.layers import (
    ClassifierHead,
    Layout,
    MBConvBlock,
    RelPosBias,
    Stem,
    TransformerBlock,
    grid_after,
    init_module_,
    resize_rel_pos_table,
)

STAGE_STRIDES = {"stem": 2, "s1": 4, "s2": 8, "s3": 16, "s4": 32}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed/DDP and torch.compile wrappers
EXPORT_WEIGHTS = "model.safetensors"  # the weights file of an export folder


def _build_stage(
    arch: CoAtNetArch, cfg: ModelConfig, index: int, dim_in: int, drop_rates: Iterator[float]
) -> nn.Sequential:
    """Blocks of stage S(index+1); the first block halves the resolution [P Table 3]."""
    grid = grid_after(cfg.image_size, STAGE_STRIDES[STAGE_NAMES[index + 1]])
    blocks: list[nn.Module] = []
    for seg_index, seg in enumerate(arch.stages[index]):
        for i in range(seg.depth):
            stride = 2 if seg_index == 0 and i == 0 else 1
            if seg.block == "mbconv":
                block: nn.Module = MBConvBlock(
                    dim_in, seg.width, stride, cfg.mbconv_stride, cfg.mbconv_pool, next(drop_rates)
                )
            else:
                block = TransformerBlock(
                    dim_in, seg.width, arch.head_dim, grid, stride, cfg.attn_pool, next(drop_rates)
                )
            blocks.append(block)
            dim_in = seg.width
    return nn.Sequential(*blocks)


def _to_layout(x: torch.Tensor, current: Layout, wanted: Layout) -> torch.Tensor:
    if current == wanted:
        return x
    return x.permute(0, 2, 3, 1) if wanted == "nhwc" else x.permute(0, 3, 1, 2)


@contextlib.contextmanager
def _batchnorm_stats_preserved(module: nn.Module) -> Iterator[None]:
    """Undo the running-statistics update of the recomputed forward under activation checkpointing.

    Without this, every checkpointed BatchNorm updates its running mean/var twice per step (forward
    and recompute), so evaluation numbers would depend on whether checkpointing was on.
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for b, old in zip(m.buffers(recurse=False), buffers, strict=True):
                    b.copy_(old)


def _recompute_contexts(
    block: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Eager checkpointing's contexts: none around the forward, BatchNorm statistics preserved
    around the recompute."""
    return contextlib.nullcontext(), _batchnorm_stats_preserved(block)


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run one block under non-reentrant activation checkpointing.

    The RNG state is restored for the recompute (stochastic depth draws the same masks), so outputs
    and gradients equal those of the plain forward.

    Under `torch.compile` the call is traced into a graph whose recompute AOTAutograd plans: the
    BatchNorm statistics updates are functionalised and applied once, in the forward, so the
    eager-mode context is neither needed nor allowed (Dynamo takes a `context_fn` only for
    selective checkpointing policies, see torch/_higher_order_ops/wrap.py). In eager mode the
    context is a `functools.partial` of a module-level function rather than a closure, which is
    also what Dynamo would accept.
    """
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(
        block, x, use_reentrant=False, context_fn=functools.partial(_recompute_contexts, block)
    )


class CoAtNet(nn.Module):
    """CoAtNet-N for image classification; see the module docstring for sources and contract."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        arch = cfg.arch()
        self.num_classes = cfg.num_classes
        self.image_size = cfg.image_size
        self.stem = Stem(cfg.in_chans, arch.stem_width)
        drop_rates = iter(block_drop_rates(arch, cfg.drop_path_rate))
        stages, dim = [], arch.stem_width
        for index in range(len(arch.stages)):
            stages.append(_build_stage(arch, cfg, index, dim, drop_rates))
            dim = arch.stages[index][-1].width
        self.stages = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = dim
        self.head = ClassifierHead(dim, cfg.num_classes, cfg.head == "gap_ln_prelogits_fc")
        self.grad_checkpointing: frozenset[str] = frozenset()
        self.feature_info = [
            dict(num_chs=arch.stem_width, reduction=2, module="stem"),
            *(
                dict(num_chs=a[-1].width, reduction=STAGE_STRIDES[n], module=f"stages.{i}")
                for i, (n, a) in enumerate(zip(STAGE_NAMES[1:], arch.stages, strict=True))
            ),
        ]

    # ---- construction contract -------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer (`init_module_`: timm's default for CoAtNet)."""
        for module in self.modules():
            init_module_(module)

    def set_input_size(self, image_size: int) -> None:
        """Adapt to a new input resolution: bilinearly resize every relative-position table."""
        if image_size < 32 or image_size % 32:
            raise ValueError(f"image size must be a positive multiple of 32, got {image_size}")
        for name, stage in zip(STAGE_NAMES[1:], self.stages, strict=True):
            grid = grid_after(image_size, STAGE_STRIDES[name])
            for module in stage.modules():
                if isinstance(module, RelPosBias):
                    module.set_grid(grid)
        self.image_size = image_size
        self.cfg = dataclasses.replace(self.cfg, image_size=image_size)

    # ---- what the trainer reads --------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters not to decay: the weights and biases of normalisation layers,
        every bias, and the relative-position tables.

        Decided by module type and parameter name, never by the stored shape: under ZeRO-3 a
        parameter is stored as a flat partition of shape (0,), and a shape test (timm's
        `param_groups_weight_decay` too) would exempt every parameter from decay.
        """
        names = set()
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm)
            for param_name, _ in module.named_parameters(recurse=False):
                if is_norm or param_name == "bias" or isinstance(module, RelPosBias):
                    names.add(prefix + param_name)
        return names

    def set_grad_checkpointing(
        self, enable: bool = True, stages: Iterable[str] | None = None
    ) -> None:
        """Switch activation checkpointing on or off for every block of the given stages.

        `stages` names stages from ("stem", "s1", "s2", "s3", "s4"); None means all. Each block is
        one checkpoint unit. The policy is chosen outside the model (config ->
        `distributed/`); this method only records it (timm's signature, extended by `stages`).
        """
        chosen = set(STAGE_NAMES if stages is None else stages)
        unknown = chosen - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {STAGE_NAMES}")
        current = set(self.grad_checkpointing)
        self.grad_checkpointing = frozenset(current | chosen if enable else current - chosen)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer groups (for layer-wise LR decay): stem, then stages or blocks."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return dict(stem=r"^stem", blocks=[(blocks, None), (r"^head\.norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier for a new class count (initialised as in `init_weights`)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"CoAtNet pools by global average only, not {global_pool!r}")
        self.num_classes = num_classes
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        self.head.reset(num_classes)
        init_module_(self.head.fc)

    # ---- forward ---------------------------------------------------------------------------

    def _units(self) -> Iterator[tuple[str, nn.Module]]:
        yield "stem", self.stem
        for name, stage in zip(STAGE_NAMES[1:], self.stages, strict=True):
            for block in stage:
                yield name, block

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> last-stage feature map (B, D4, H/32, W/32)."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        layout: Layout = "nchw"
        use_checkpointing = bool(self.grad_checkpointing) and torch.is_grad_enabled()
        for stage_name, block in self._units():
            x = _to_layout(x, layout, block.layout)
            layout = block.layout
            if use_checkpointing and stage_name in self.grad_checkpointing:
                x = checkpointed(block, x)
            else:
                x = block(x)
        return _to_layout(x, layout, "nchw")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- building and checkpoint adaptation ------------------------------------------------------


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> CoAtNet:
    """Build on the meta device, then materialise on `device` and initialise (skipped for meta).

    Building on meta first means no memory is touched by PyTorch's default per-layer init, which
    `init_weights` would overwrite anyway.
    """
    with torch.device("meta"):
        model = CoAtNet(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: CoAtNet) -> dict:
    """Adapt a state dict to `model`: strip wrapper prefixes, resize rel-pos tables, drop a head
    whose class count differs. Pure function (timm's `checkpoint_filter_fn` convention)."""
    for nested in ("module", "state_dict", "model"):
        if nested in state_dict and isinstance(state_dict[nested], Mapping):
            state_dict = state_dict[nested]
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        target = own.get(key)
        if key.endswith("rel_pos.table") and target is not None and target.shape != value.shape:
            grid = ((target.shape[-2] + 1) // 2, (target.shape[-1] + 1) // 2)
            value = resize_rel_pos_table(value, grid)
        if key.startswith("head.fc.") and target is not None and target.shape != value.shape:
            continue  # class count changed: keep the freshly initialised classifier
        out[key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch state-dict file, or of an export folder."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_WEIGHTS
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], model: CoAtNet, source: str = "the state dict"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` adapted to `model` (which may live on the meta device), and the names of tensors it
    does not provide (a replaced classifier). Any other mismatch is an error naming the tensors."""
    filtered = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    wrong_shape = [k for k, v in filtered.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in filtered]
    unexpected = [k for k in filtered if k not in own]
    not_head = [k for k in missing if not k.startswith("head.fc.")]
    if not_head or unexpected or wrong_shape:
        raise ValueError(
            f"{source} does not fit {model.cfg.name}: {len(wrong_shape)} tensors of another shape "
            f"{wrong_shape[:3]}, missing {not_head[:3]}, unexpected {unexpected[:3]}"
        )
    return filtered, missing


def load_weights(model: CoAtNet, path: str | Path) -> list[str]:
    """Load weights made at any resolution or class count (a file or an export folder).

    Returns the names of parameters left at their initial values (a replaced classifier); any other
    mismatch is an error.
    """
    filtered, missing = adapt_state_dict(read_state_dict(path), model, str(path))
    model.load_state_dict(filtered, strict=False)
    return missing


def create_model(
    name: str,
    checkpoint: str | Path | None = None,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> CoAtNet:
    """Build a variant by name (`create_model("coatnet6", image_size=512, num_classes=100)`).

    `overrides` are `ModelConfig` fields. With `checkpoint`, weights are loaded and adapted to this
    resolution and class count (rel-pos tables resized bilinearly, classifier replaced).
    """
    cfg = ModelConfig(name=name, **overrides)
    model = build_model(cfg, device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model
