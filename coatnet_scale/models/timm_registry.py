"""Register every CoAtNet variant with timm, so `timm.create_model("coatnet6")` works.

timm registers models at import time with `@register_model` on one function per name; the names
here are the keys of `ARCHS` (coatnet0..coatnet7, coatnet_debug), which do not clash with timm's own
`coatnet_N_224` models. Building goes through timm's `build_model_with_cfg`, so an export folder
loads with `timm.create_model("local-dir:PATH", pretrained=True)` (its config.json follows timm's
convention, `checkpoint.export`), and weights at another resolution or class count go through
`checkpoint_filter_fn` (rel-pos tables resized, classifier replaced on a class-count change).
`features_only=True` wraps the model in timm's FeatureGetterNet (`forward_intermediates`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from coatnet_scale.models.coatnet import (
    CoAtNet,
    build_model,
    checkpoint_filter_fn,
    record_input_size,
)
from coatnet_scale.models.config import ARCHS, ModelConfig

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def pretrained_cfg(
    image_size: int = 224, num_classes: int = 1000, in_chans: int = 3, crop_pct: float = 0.875
) -> dict[str, Any]:
    """timm's pretrained_cfg for our models: preprocessing and the names timm's tools look up."""
    return dict(
        url="",
        num_classes=num_classes,
        input_size=(in_chans, image_size, image_size),
        pool_size=(image_size // 32, image_size // 32),
        crop_pct=crop_pct,
        interpolation="bicubic",  # as our evaluation transform resizes
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv="stem.conv1",
        classifier="head.fc",
        license="apache-2.0",
        # Any multiple of 32 runs (the rel-pos tables are resized per grid): timm's tools may
        # feed other sizes. Sizes must be multiples of 32; pretrained_cfg has no field for that.
        fixed_input_size=False,
        min_input_size=(in_chans, 32, 32),
    )


default_cfgs = generate_default_cfgs({name: pretrained_cfg() for name in ARCHS})


def _from_timm_kwargs(**kwargs: Any) -> CoAtNet:
    """timm passes `num_classes`, `in_chans` and user kwargs; `img_size` is accepted as an alias."""
    if "img_size" in kwargs:
        size = kwargs.pop("img_size")
        kwargs["image_size"] = size if isinstance(size, int) else int(size[0])
    pool = kwargs.pop("global_pool", "avg")
    unknown = set(kwargs) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(
            f"unknown CoAtNet option(s) {sorted(unknown)}; known: {sorted(_CONFIG_FIELDS)}"
        )
    # Build where the caller's default device points, so `with torch.device("meta"):` around
    # timm.create_model("coatnet7") allocates nothing.
    model = build_model(ModelConfig(**kwargs), torch.get_default_device())
    if pool != "avg":
        model.reset_classifier(model.num_classes, pool)
    return model


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CoAtNet:
    model = build_model_with_cfg(
        _from_timm_kwargs,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=False,
        # features_only goes through forward_intermediates: every map NCHW, whatever the block
        feature_cfg=dict(feature_cls="getter"),
        name=variant,
        **kwargs,
    )
    if isinstance(model, CoAtNet):  # not the features_only wrapper
        record_input_size(model)  # built at img_size=384: timm's data config says 384
    return model


@register_model
def coatnet0(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet0", pretrained, **kwargs)


@register_model
def coatnet1(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet1", pretrained, **kwargs)


@register_model
def coatnet2(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet2", pretrained, **kwargs)


@register_model
def coatnet3(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet3", pretrained, **kwargs)


@register_model
def coatnet4(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet4", pretrained, **kwargs)


@register_model
def coatnet5(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet5", pretrained, **kwargs)


@register_model
def coatnet6(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet6", pretrained, **kwargs)


@register_model
def coatnet7(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet7", pretrained, **kwargs)


@register_model
def coatnet_debug(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    return _create("coatnet_debug", pretrained, **kwargs)
