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

# No `from __future__ import annotations` here: FX writes the forward's annotations into the code
# it generates, and TorchScript cannot read a postponed (string) annotation there.
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import calculate_drop_path_rates
from timm.models import clean_state_dict
from timm.models._features import feature_take_indices
from torch import nn

from coatnet_scale.models.config import STAGE_NAMES, CoAtNetArch, ModelConfig
from coatnet_scale.models.layers import (
    MBConvBlock,
    RelPosBias,
    Stem,
    TransformerBlock,
    classifier_head,
    grid_after,
    init_module_,
    resize_rel_pos_table,
)

STAGE_STRIDES = {"stem": 2, "s1": 4, "s2": 8, "s3": 16, "s4": 32}
INPUT_MULTIPLE = 32  # input height and width: every stage halves the grid by 2x2 pooling
EXPORT_WEIGHTS = "model.safetensors"  # the weights file of an export folder
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed/DDP and torch.compile wrappers
CLASSIFIER = "head"  # the classifier head's module name (initialised as a classifier)
# State-dict names this code wrote before the head became timm's NormMlpClassifierHead.
LEGACY_KEYS = {"head.pre_logits.0.": "head.pre_logits.fc."}


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


def _to_layout(x: torch.Tensor, current: str, wanted: str) -> torch.Tensor:
    """An NCHW tensor as NHWC or back (a view: free for a channels_last tensor)."""
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
    """CoAtNet-N for image classification; see the module docstring for sources and contract.

    timm's model contract holds (checked by tests/unit/test_timm_contract.py): any input size that
    is a multiple of 32 (the relative-position tables are resized for other grids,
    `RelPosBias`), unpooled features after `reset_classifier(0, "")`, `forward_intermediates`
    and `features_only`, TorchScript and FX.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        arch = cfg.arch()
        self.num_classes = cfg.num_classes
        self.image_size = cfg.image_size
        self.channels_last = cfg.channels_last
        self.stem = Stem(cfg.in_chans, arch.stem_width)
        depth = sum(seg.depth for stage in arch.stages for seg in stage)
        drop_rates = iter(calculate_drop_path_rates(cfg.drop_path_rate, depth))
        stages, dim = [], arch.stem_width
        for index in range(len(arch.stages)):
            stages.append(_build_stage(arch, cfg, index, dim, drop_rates))
            dim = arch.stages[index][-1].width
        self.stages = nn.ModuleList(stages)
        self.num_features = dim
        self.head = classifier_head(dim, cfg.num_classes, cfg.head == "gap_ln_prelogits_fc")
        self.head_hidden_size: int = self.head.num_features
        self.grad_checkpointing: frozenset[str] = frozenset()
        self.feature_info = [
            dict(num_chs=arch.stem_width, reduction=2, module="stem"),
            *(
                dict(num_chs=a[-1].width, reduction=STAGE_STRIDES[n], module=f"stages.{i}")
                for i, (n, a) in enumerate(zip(STAGE_NAMES[1:], arch.stages, strict=True))
            ),
        ]
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    # ---- construction contract -------------------------------------------------------------

    @torch.no_grad()
    def init_weights(
        self, around: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    ) -> None:
        """Initialise every parameter and buffer (`init_module_`: timm's default for CoAtNet), one
        module at a time, in module order; `around(module)` wraps each module's initialisation
        (ZeRO-3 gathers the module's partitions there)."""
        for name, module in self.named_modules():
            with around(module) if around is not None else contextlib.nullcontext():
                init_module_(module, classifier=is_classifier(name))

    def set_input_size(self, image_size: int) -> None:
        """Make `image_size` the built size: bilinearly resize every relative-position table to its
        grid (fine-tuning at 384/512 trains tables of that size). Running at another size needs
        no call: the tables are resized on the fly."""
        if image_size < INPUT_MULTIPLE or image_size % INPUT_MULTIPLE:
            raise ValueError(f"image size must be a positive multiple of 32, got {image_size}")
        for name, stage in zip(STAGE_NAMES[1:], self.stages, strict=False):  # pruned: fewer
            grid = grid_after(image_size, STAGE_STRIDES[name])
            for module in stage.modules():
                if isinstance(module, RelPosBias):
                    module.set_grid(grid)
        self.image_size = image_size
        self.cfg = dataclasses.replace(self.cfg, image_size=image_size)
        record_input_size(self)

    # ---- what the trainer reads --------------------------------------------------------------

    @torch.jit.ignore
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

    @torch.jit.ignore
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

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer groups (for layer-wise LR decay): stem, then stages or blocks."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return dict(stem=r"^stem", blocks=[(blocks, None), (r"^head\.norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier for a new class count (initialised as in `init_weights`);
        `global_pool=""` removes the pooling too: the model then returns the (B, C, H/32, W/32)
        map, through the head's norm and pre-logits applied per position (timm's head)."""
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"CoAtNet pools by global average or not at all, not {global_pool!r}")
        if global_pool == "" and num_classes > 0 and self.cfg.head == "gap_fc":
            raise ValueError(
                "an unpooled classifier needs the pre-logits head (model.head="
                "gap_ln_prelogits_fc, whose layers become 1x1 convolutions); use num_classes=0"
            )
        self.num_classes = num_classes
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features
        init_module_(self.head.fc, classifier=True)

    # ---- forward ---------------------------------------------------------------------------

    def _units(self) -> Iterator[tuple[str, nn.Module]]:
        """(stage name, block) in forward order: the checkpoint units."""
        yield "stem", self.stem
        for name, stage in zip(STAGE_NAMES[1:], self.stages, strict=False):  # pruned: fewer
            for block in stage:
                yield name, block

    def _stage_checkpointed(self, index: int) -> bool:
        """Whether stage `index` (0 = stem) runs under activation checkpointing now."""
        return (
            bool(self.grad_checkpointing)
            and torch.is_grad_enabled()
            and (STAGE_NAMES[index] in self.grad_checkpointing)
        )

    def _forward_stages(
        self, x: torch.Tensor, take: list[int], last: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the stem (feature 0) and stages 1..`last`; returns the last NCHW map and the NCHW
        maps of the features in `take`. One loop for `forward_features` and
        `forward_intermediates`, written so that TorchScript compiles it."""
        # 32 = INPUT_MULTIPLE, written out: TorchScript cannot read a module-level constant
        torch._assert(x.shape[-2] % 32 == 0, "input height must be a multiple of 32")
        torch._assert(x.shape[-1] % 32 == 0, "input width must be a multiple of 32")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if torch.jit.is_scripting():  # (no checkpointing: not compiled)
            x = self.stem(x)
        elif self._stage_checkpointed(0):
            x = checkpointed(self.stem, x)
        else:
            x = self.stem(x)
        features: list[torch.Tensor] = [x] if 0 in take else []
        layout = "nchw"
        for index, stage in enumerate(self.stages):
            if index < last:
                for block in stage:
                    x = _to_layout(x, layout, block.layout)
                    layout = block.layout
                    if torch.jit.is_scripting():
                        x = block(x)
                    elif self._stage_checkpointed(index + 1):
                        x = checkpointed(block, x)
                    else:
                        x = block(x)
                if index + 1 in take:
                    features.append(_to_layout(x, layout, "nchw"))
        return _to_layout(x, layout, "nchw"), features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> last-stage feature map (B, D4, H/32, W/32); H and W are any
        multiples of 32."""
        return self._forward_stages(x, [], len(self.stages))[0]

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's multi-scale features: the maps of the stem (index 0) and of S1..S4 (1..4), all
        NCHW (`feature_info` gives their channels and strides); `indices` takes the last n (int)
        or the listed ones. `norm` has nothing to apply: the final norm belongs to the head."""
        if output_fmt != "NCHW":
            raise ValueError(f"CoAtNet's intermediates are NCHW, not {output_fmt}")
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        last = max_index if stop_early or intermediates_only else len(self.stages)
        x, features = self._forward_stages(x, take, last)
        return features if intermediates_only else (x, features)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last feature in `indices` and (by default) the head: what
        timm's `features_only` wrapper calls. Returns the absolute feature indices."""
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        self.feature_info = self.feature_info[: max_index + 1]
        if max_index < len(STAGE_NAMES) - 1 or prune_head:
            # no classifier, no pooling; the head's norm and pre-logits go too (sized for S4)
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
            self.num_classes = 0
            self.head = classifier_head(self.num_features, 0, prelogits=False)
            self.head.reset(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def record_input_size(model: CoAtNet) -> None:
    """Keep timm's `pretrained_cfg` (what timm's data config reads) at the model's built size."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        side = model.image_size
        model.pretrained_cfg = model.default_cfg = {
            **cfg,
            "input_size": (cfg["input_size"][0], side, side),
            "pool_size": (side // 32, side // 32),
        }


def is_classifier(module_name: str) -> bool:
    """Whether a module (by its name in a `CoAtNet`) belongs to the classifier head."""
    return module_name == CLASSIFIER or module_name.startswith(CLASSIFIER + ".")


def current_key(key: str) -> str:
    """Today's name for a parameter or buffer name written by an earlier version (`LEGACY_KEYS`);
    any other name is returned as it is."""
    for old, new in LEGACY_KEYS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _rename_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load-time hook: rename keys written before the head was timm's (every load path, also
    DeepSpeed's resume, goes through `load_state_dict`)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        renamed = prefix + current_key(key[len(prefix) :])
        if renamed != key:
            state_dict[renamed] = state_dict.pop(key)


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
    """Adapt a state dict to `model`: strip wrapper prefixes (timm's `clean_state_dict`), rename
    legacy keys, resize rel-pos tables, reshape a head layer between Linear and 1x1 conv (an
    unpooled head), drop a classifier whose class count differs. Pure function (timm's
    `checkpoint_filter_fn` convention)."""
    for nested in ("module", "state_dict", "model"):
        if nested in state_dict and isinstance(state_dict[nested], Mapping):
            state_dict = state_dict[nested]
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    state_dict = dict(state_dict)
    while any(k.startswith(WRAPPER_PREFIXES) for k in state_dict):  # module.module. too
        state_dict = clean_state_dict(state_dict)
    for key, value in state_dict.items():
        key = current_key(key)
        target = own.get(key)
        if target is None and key.startswith("head.fc."):
            continue  # the model has no classifier (num_classes=0)
        if target is not None and target.shape != value.shape:
            if key.endswith("rel_pos.table"):
                grid = ((target.shape[-2] + 1) // 2, (target.shape[-1] + 1) // 2)
                value = resize_rel_pos_table(value, grid)
            elif key.startswith("head.fc."):
                continue  # class count changed: keep the freshly initialised classifier
            elif key.startswith("head.") and target.numel() == value.numel():
                value = value.reshape(target.shape)  # Linear <-> 1x1 conv of an unpooled head
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
