"""RandAugment at the paper's magnitudes: the argument that reaches each op at M=10, 15 and 20
follows TF's level-to-argument mapping, extrapolated and clamped to the op's domain (timm's
clamped M to 10); the ops do what that argument says; an exception inside an op propagates."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from coatnet_scale.data import randaugment
from coatnet_scale.data.randaugment import OPS, RandAugment, op_argument

# op -> arguments at M = 10, 15, 20 (224 px): TF's mapping, clamped where the op's domain ends
EXPECTED = {
    "AutoContrast": (None, None, None),
    "Equalize": (None, None, None),
    "Invert": (None, None, None),
    "Rotate": (30.0, 45.0, 60.0),
    "Posterize": (4, 6, 8),  # bits kept: TF's posterize weakens as M grows
    "Solarize": (256, 256, 256),  # threshold 256: TF's solarize inverts nothing from M=10 on
    "SolarizeAdd": (110, 165, 220),
    "Color": (1.9, 2.8, 3.7),
    "Contrast": (1.9, 2.8, 3.7),
    "Brightness": (1.9, 2.8, 3.7),
    "Sharpness": (1.9, 2.8, 3.7),
    "ShearX": (0.3, 0.45, 0.6),
    "ShearY": (0.3, 0.45, 0.6),
    "TranslateX": (100.0, 150.0, 200.0),
    "TranslateY": (100.0, 150.0, 200.0),
    "Cutout": (40, 60, 80),
}


class Scripted:
    """Stands in for `random` inside randaugment: picks `op`, applies it, keeps the sign."""

    def __init__(self, op: str) -> None:
        self.op = op

    def choice(self, options):
        return self.op

    def uniform(self, low: float, high: float) -> float:
        return 0.8  # the op's probability

    def random(self) -> float:
        return 0.7  # < 0.8: applied; >= 0.5: no sign flip

    def randrange(self, n: int) -> int:
        return n // 2


@pytest.mark.parametrize("op", OPS)
def test_the_argument_reaching_each_op_follows_tf_at_m10_15_20(op: str, monkeypatch) -> None:
    assert set(EXPECTED) == set(OPS)
    reached = []
    original = randaugment.APPLY[op]

    def spy(img, argument):
        reached.append(argument)
        return original(img, argument)

    monkeypatch.setattr(randaugment, "random", Scripted(op))
    monkeypatch.setitem(randaugment.APPLY, op, spy)
    img = Image.new("RGB", (224, 224), (90, 150, 200))
    for magnitude in (10, 15, 20):
        out = RandAugment(1, magnitude, 224)(img)
        assert out.size == (224, 224)
    expected = list(EXPECTED[op])
    if expected[0] is None:
        assert reached == [None, None, None]
        assert all(op_argument(op, m, 224) is None for m in (10, 15, 20))
    else:
        assert reached == pytest.approx(expected)
        assert [op_argument(op, m, 224) for m in (10, 15, 20)] == pytest.approx(expected)


def test_the_ops_do_what_their_argument_says() -> None:
    gradient = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    img = Image.fromarray(np.stack([gradient] * 3, -1))
    kept6 = np.asarray(randaugment.APPLY["Posterize"](img, op_argument("Posterize", 15, 224)))
    assert (kept6 % 4 == 0).all() and len(np.unique(kept6)) == 64  # 6 bits kept at M=15
    same = randaugment.APPLY["Solarize"](img, op_argument("Solarize", 15, 224))
    assert np.array_equal(np.asarray(same), np.asarray(img))  # TF: nothing inverted above M=10
    added = np.asarray(randaugment.APPLY["SolarizeAdd"](img, op_argument("SolarizeAdd", 15, 224)))
    assert added[0, 10, 0] == 10 + 165 and added[0, 200, 0] == 200  # +165 below 128 only
    black = np.asarray(randaugment.posterize(img, 0))
    assert not black.any()  # TF's 0 bits (M < 2.5): black, where Pillow refuses 0 bits
    random.seed(0)
    cut = np.asarray(randaugment.APPLY["Cutout"](img, 60))
    grey = (cut == 128).all(-1)
    assert 0 < grey.sum() <= 120 * 120  # one grey square of side 2 x 60, clipped at the edges
    rotated = np.asarray(randaugment.APPLY["Rotate"](Image.new("RGB", (64, 64), "white"), 45.0))
    assert (rotated[0, 0] == 128).all() and (rotated[32, 32] == 255).all()  # grey corners


def test_translation_and_cutout_scale_with_the_image() -> None:
    assert op_argument("TranslateX", 15, 448) == pytest.approx(300.0)
    assert op_argument("Cutout", 15, 448) == 120
    assert op_argument("TranslateX", 30, 32) == 32.0  # never beyond the image


@pytest.mark.parametrize("magnitude", [0, 5, 15, 20, 30])
def test_every_op_runs_at_any_magnitude(magnitude: int) -> None:
    img = Image.new("RGB", (32, 24), (10, 200, 90))
    for op in OPS:
        argument = op_argument(op, magnitude, 32)
        assert randaugment.APPLY[op](img, argument).size == (32, 24)


def test_an_error_inside_an_op_propagates(monkeypatch) -> None:
    def broken(img, argument):
        raise RuntimeError("our op")

    monkeypatch.setattr(randaugment, "random", Scripted("Color"))
    monkeypatch.setitem(randaugment.APPLY, "Color", broken)
    with pytest.raises(RuntimeError, match="our op"):
        RandAugment(2, 15, 32)(Image.new("RGB", (32, 32)))
