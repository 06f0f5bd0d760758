"""The CoAtNet variant table and the model's config section.

A model size is data, not a subclass (as timm's model configs do it): every variant is one
`CoAtNetArch` row that can be read side by side with the paper's tables.

Sources (see docs/architecture.md):
- CoAtNet-0..4: Table 3 of Dai et al. 2021 (arXiv:2106.04803v2), head size 32.
- CoAtNet-5: Appendix A.2, Table 11, head size 64.
- CoAtNet-6/7: Appendix A.2, Table 12, head size 128, with S3 split into an MBConv part followed
  by a Transformer part at the same 1/16 resolution.
- The CoAtNet-6 S4 width: Table 12 prints D=2048, which gives 1.348B parameters instead of the
  published 1.47B; D=3072 reproduces 1.47B (docs/architecture.md section 3.4, a suspected
  erratum). Table 12 as printed is the default; `c6_s4_width=3072` selects the erratum reading.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal

from coatnet_scale.fields import ConfigError, option

BlockType = Literal["mbconv", "transformer"]
STAGE_NAMES = ("stem", "s1", "s2", "s3", "s4")


@dataclass(frozen=True)
class Segment:
    """A run of `depth` blocks of one type and width inside a stage."""

    block: BlockType
    depth: int
    width: int


@dataclass(frozen=True)
class CoAtNetArch:
    """One row of the paper's stage tables.

    `stages` holds S1..S4; each stage is one or more segments. Only the first block of a stage
    downsamples; the first block of a later segment in the same stage (the Transformer part of
    CoAtNet-6/7's S3) changes width without pooling.
    """

    stem_width: int
    stages: tuple[tuple[Segment, ...], ...]
    head_dim: int
    paper_params: float | None = None  # published parameter count [P Tables 4, 5]; None for debug
    paper_macs_224: float | None = None  # published FLOPs (= MACs) at 224 [P Table 4], Eq. (5)


def _c(depth: int, width: int) -> tuple[Segment, ...]:
    return (Segment("mbconv", depth, width),)


def _t(depth: int, width: int) -> tuple[Segment, ...]:
    return (Segment("transformer", depth, width),)


def _split_s3(mb_depth: int, mb_width: int, tfm_depth: int, tfm_width: int) -> tuple[Segment, ...]:
    """CoAtNet-6/7's S3 [P A.2, Table 12]: MBConv blocks then Transformer blocks, both at 1/16."""
    return (Segment("mbconv", mb_depth, mb_width), Segment("transformer", tfm_depth, tfm_width))


ARCHS: dict[str, CoAtNetArch] = {
    # Table 3. Published FLOPs are MACs (docs/architecture.md section 3.2).
    "coatnet0": CoAtNetArch(64, (_c(2, 96), _c(3, 192), _t(5, 384), _t(2, 768)), 32, 25e6, 4.2e9),
    "coatnet1": CoAtNetArch(64, (_c(2, 96), _c(6, 192), _t(14, 384), _t(2, 768)), 32, 42e6, 8.4e9),
    "coatnet2": CoAtNetArch(
        128, (_c(2, 128), _c(6, 256), _t(14, 512), _t(2, 1024)), 32, 75e6, 15.7e9
    ),
    "coatnet3": CoAtNetArch(
        192, (_c(2, 192), _c(6, 384), _t(14, 768), _t(2, 1536)), 32, 168e6, 34.7e9
    ),
    "coatnet4": CoAtNetArch(192, (_c(2, 192), _c(12, 384), _t(28, 768), _t(2, 1536)), 32, 275e6),
    # Table 11, head size 64.
    "coatnet5": CoAtNetArch(192, (_c(2, 256), _c(12, 512), _t(28, 1280), _t(2, 2048)), 64, 688e6),
    # Table 12, head size 128, split S3.
    "coatnet6": CoAtNetArch(
        192, (_c(2, 192), _c(4, 384), _split_s3(8, 768, 42, 1536), _t(2, 2048)), 128, 1.47e9
    ),
    "coatnet7": CoAtNetArch(
        192, (_c(2, 256), _c(4, 512), _split_s3(8, 1024, 42, 2048), _t(2, 3072)), 128, 2.44e9
    ),
    # Not in the paper: the same block structure at toy widths, for fast tests. It has the split S3
    # of CoAtNet-6/7 and a stem as wide as S1 (the pool-only shortcut of CoAtNet-2, -3, -4 and -6).
    "coatnet_debug": CoAtNetArch(
        16, (_c(2, 16), _c(2, 32), _split_s3(1, 48, 2, 64), _t(2, 96)), 16
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """The `model` config section: which variant, at which resolution, with which paper switches."""

    name: str = option("coatnet0", "variant: coatnet0..coatnet7 or coatnet_debug")
    num_classes: int = option(1000, "classifier outputs (0: no classifier, pooled features)")
    image_size: int = option(224, "input resolution (multiple of 32); sizes the rel-pos tables")
    in_chans: int = option(3, "input channels")
    drop_path_rate: float = option(0.0, "stochastic depth rate of the last block (linear ramp)")
    mbconv_stride: Literal["expand1x1", "dwconv"] = option(
        "expand1x1", "MBConv downsampling: stride on the 1x1 expansion (Eq. 5) or on the dwconv"
    )
    mbconv_pool: Literal["avg", "max"] = option("avg", "2x2 pool on the MBConv shortcut")
    attn_pool: Literal["max", "avg"] = option("max", "2x2 pool in downsampling attention (Eq. 4)")
    head: Literal["gap_ln_prelogits_fc", "gap_fc"] = option(
        "gap_ln_prelogits_fc", "classifier head: GAP+LN+Linear/tanh+FC, or the paper's GAP+FC"
    )
    c6_s4_width: Literal[2048, 3072] = option(
        2048, "CoAtNet-6 S4 width: 2048 as in Table 12, 3072 matches the published 1.47B"
    )
    channels_last: bool = option(True, "run the convolutional stages in channels_last memory")

    def validate(self) -> None:
        """Raise ConfigError (key relative to this section) for an impossible combination."""
        if self.name not in ARCHS:
            close = difflib.get_close_matches(self.name, list(ARCHS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = ", ".join(ARCHS)
            raise ConfigError(
                "name", f"unknown variant {self.name!r}{hint}; choose one of {allowed}"
            )
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(
                "image_size", f"must be a positive multiple of 32, got {self.image_size}"
            )
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if self.in_chans < 1:
            raise ConfigError("in_chans", f"must be >= 1, got {self.in_chans}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError("drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if self.c6_s4_width != 2048 and self.name != "coatnet6":
            raise ConfigError("c6_s4_width", f"applies to coatnet6 only, not {self.name}")

    def arch(self) -> CoAtNetArch:
        """The stage table of this variant, with the CoAtNet-6 S4 switch applied."""
        arch = ARCHS[self.name]
        if self.name == "coatnet6" and self.c6_s4_width != 2048:
            s4 = _t(arch.stages[3][0].depth, self.c6_s4_width)
            arch = dataclasses.replace(arch, stages=(*arch.stages[:3], s4))
        return arch
