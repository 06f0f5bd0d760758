"""CoAtNet-0..7 (+ a tiny debug variant): single-device PyTorch, no DeepSpeed, no torch.distributed.

Importing this package registers the variants with timm (`timm.create_model("coatnet6")`).
"""

from coatnet_scale.models import timm_registry as _timm_registry  # noqa: F401  (registers names)
from coatnet_scale.models.coatnet import (
    EXPORT_WEIGHTS,
    STAGE_STRIDES,
    CoAtNet,
    adapt_state_dict,
    build_model,
    checkpoint_filter_fn,
    create_model,
    load_weights,
    read_state_dict,
)
from coatnet_scale.models.config import ARCHS, STAGE_NAMES, CoAtNetArch, ModelConfig, Segment

__all__ = [
    "ARCHS",
    "STAGE_NAMES",
    "STAGE_STRIDES",
    "EXPORT_WEIGHTS",
    "CoAtNet",
    "CoAtNetArch",
    "ModelConfig",
    "Segment",
    "adapt_state_dict",
    "build_model",
    "checkpoint_filter_fn",
    "create_model",
    "load_weights",
    "read_state_dict",
]
