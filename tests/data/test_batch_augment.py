"""The augmentation on the device: the same ops and magnitudes as the paper's RandAugment (the
per-image Pillow reference, randaugment.py, which follows TF and uses timm's ops), drawn per slot,
independent of how samples are batched, and mixup/CutMix pairs fixed by the slots.

Tolerances, measured against the Pillow reference on photo-like images: every op but Rotate
equals Pillow's output exactly except for an occasional +-1 (float rounding of AutoContrast's
scale); Rotate's nearest-neighbour source pixel differs where the rotated pixel centre falls within
rounding of a pixel edge (Pillow steps through the rows incrementally): under 1% of pixels.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data_pipeline import photo_like
from coatnet_scale.data import randaugment
from coatnet_scale.data.batch_augment import LAYER_FIELDS, BatchAugment, Mixing, apply_op, draw
from coatnet_scale.data.randaugment import OPS, SIGNED, op_argument
from coatnet_scale.data.transforms import Normalizer


def photos(count: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.open(io.BytesIO(photo_like(rng, width, height))).convert("RGB") for _ in range(count)
    ]


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images])


class CentreAt:
    """Stands in for `random` in the Pillow reference's Cutout: a fixed centre."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y
        self.calls = 0

    def randrange(self, n: int) -> int:
        self.calls += 1
        return self.x if self.calls % 2 else self.y


@pytest.mark.parametrize("magnitude", [9, 15, 20])
@pytest.mark.parametrize("op", OPS)
def test_each_op_matches_the_pillow_reference(op: str, magnitude: int, monkeypatch) -> None:
    images = photos(8, 96, 80, seed=magnitude)
    batch = as_batch(images).float()
    argument = op_argument(op, magnitude, 96) or 0
    for sign in (1, -1) if op in SIGNED else (1,):
        monkeypatch.setattr(randaugment, "random", CentreAt(40, 30))
        expected = as_batch([randaugment.APPLY[op](img, argument * sign) for img in images])
        centres = torch.tensor([[40, 30]] * len(images))
        got = apply_op(op, batch.clone(), torch.full((8,), float(argument * sign)), centres)
        diff = (got - expected.float()).abs()
        assert got.shape == expected.shape
        if op == "Rotate":
            assert (diff > 0).float().mean() < 0.01, f"{op} {argument * sign}"
        else:
            assert diff.max() <= 1 and diff.mean() < 0.01, f"{op} {argument * sign}"


def test_the_draws_follow_tfs_randaugment_procedure() -> None:
    """Each layer picks one of the 16 ops uniformly and applies it with p ~ U(0.2, 0.8) (0.5 on
    average), geometric ops with a random sign; a fair flip; cutout centres anywhere."""
    ops, applied, signs, flips = [], [], [], []
    for slot in range(6000):
        random.seed(slot)
        params, _ = draw(32, 0.5, 2, Mixing())
        flips.append(params[0])
        for layer in range(2):
            op, on, sign, x, y = params[1 + layer * LAYER_FIELDS : 1 + (layer + 1) * LAYER_FIELDS]
            ops.append(op)
            applied.append(on)
            signs.append(sign)
            assert 0 <= x < 32 and 0 <= y < 32
    counts = np.bincount(ops, minlength=16)
    expected = len(ops) / 16
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))  # within 5 sigma
    assert abs(np.mean(applied) - 0.5) < 0.02
    assert abs(np.mean(np.array(signs) == -1) - 0.5) < 0.02
    assert abs(np.mean(flips) - 0.5) < 0.03


def augmenter(
    mixing: Mixing | None = None, layers: int = 2, smoothing: float = 0.1
) -> BatchAugment:
    return BatchAugment(32, layers, 15, mixing or Mixing(), 10, smoothing, Normalizer("cpu"))


def drawn(slots: range, layers: int, mixing: Mixing) -> tuple[torch.Tensor, torch.Tensor]:
    params, mixes = [], []
    for slot in slots:
        random.seed(slot)
        p, m = draw(32, 0.5, layers, mixing)
        params.append(p)
        mixes.append(m)
    return torch.tensor(params), torch.tensor(mixes)


@pytest.mark.parametrize("mixing", [Mixing(), Mixing(0.8, 1.0)])
def test_a_sample_is_augmented_the_same_in_any_batch(mixing: Mixing) -> None:
    """What elastic resume needs: a batch of 8 and the same slots as two batches of 4 (another
    rank count) give the same images and targets."""
    images = as_batch(photos(8, 32, 32))
    labels = torch.arange(8) % 10
    slots = range(100, 108)
    params, mixes = drawn(slots, 2, mixing)
    slot_tensor = torch.tensor(list(slots))
    augment = augmenter(mixing)
    whole_x, whole_y = augment(images, params, mixes, slot_tensor, labels)
    halves = [
        augment(images[i:j], params[i:j], mixes[i:j], slot_tensor[i:j], labels[i:j])
        for i, j in ((0, 4), (4, 8))
    ]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole_x)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_y)
    assert not torch.equal(whole_x, Normalizer("cpu")(images))  # something was done


def test_mixup_and_cutmix_pair_slot_2k_with_2k_plus_1() -> None:
    images = as_batch(photos(6, 32, 32))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    slots = torch.arange(11, 17)  # odd start: slot 11's partner (10) is not in this batch
    for mixing in (Mixing(mixup_alpha=1.0), Mixing(cutmix_alpha=1.0)):
        params, mixes = drawn(range(11, 17), 0, mixing)
        params[:, 0] = 0  # no flips: compare pixels directly
        x, y = augmenter(mixing, layers=0, smoothing=0.0)(images, params, mixes, slots, labels)
        plain = Normalizer("cpu")(images)
        assert torch.equal(x[0], plain[0]) and torch.equal(y[0], torch.eye(6, 10)[0])
        for first in (1, 3):  # pairs (12, 13) and (14, 15)
            a, b = first, first + 1
            lam = y[a, labels[a]].item()
            assert 0 <= lam <= 1 and y[b, labels[b]].item() == pytest.approx(lam)
            assert y[a, labels[b]].item() == pytest.approx(1 - lam)
            assert torch.allclose(y.sum(1), torch.ones(6))
            if mixing.cutmix_alpha:  # the pasted box's area is 1 - lam
                from_b = (x[a] == plain[b]).all(0) & (x[a] != plain[a]).any(0)
                assert from_b.float().mean().item() == pytest.approx(1 - lam, abs=0.05)
            else:
                expected = lam * plain[a] + (1 - lam) * plain[b]
                assert torch.allclose(x[a], expected, atol=1e-4)
        # slot 16's partner (17) is not in the batch either: unmixed
        assert torch.equal(x[5], plain[5]) and y[5, labels[5]].item() == 1.0


def test_flips_follow_the_draws() -> None:
    images = as_batch(photos(4, 32, 32))
    params = torch.zeros(4, 1, dtype=torch.long)
    params[1, 0] = params[3, 0] = 1
    x, _ = augmenter(layers=0)(
        images, params, torch.zeros(4, 4), torch.arange(4), torch.zeros(4, dtype=torch.long)
    )
    plain = Normalizer("cpu")(images)
    assert torch.equal(x[0], plain[0]) and torch.equal(x[2], plain[2])
    assert torch.equal(x[1], plain[1].flip(-1)) and torch.equal(x[3], plain[3].flip(-1))


class Replay:
    """Stands in for `random` inside the Pillow reference: replays one sample's draws."""

    def __init__(self, op: str, centre: tuple[int, int]) -> None:
        self.op, self.centre, self.calls = op, centre, 0

    def choice(self, options):
        return self.op

    def uniform(self, low: float, high: float) -> float:
        return 1.0  # probability 1: applied (the batch draws said so)

    def random(self) -> float:
        return 0.0  # (the ops themselves draw nothing but Cutout's centre)

    def randrange(self, n: int) -> int:
        self.calls += 1
        return self.centre[0] if self.calls % 2 else self.centre[1]


def test_the_batch_gives_each_sample_what_the_pillow_reference_gives_it(monkeypatch) -> None:
    """Per-sample ops, signs and cutout centres over two layers and a flip, through
    `BatchAugment`'s indexing: each sample equals the Pillow reference run with its draws (+-1;
    a sample that was rotated may differ at under 1% of its pixels)."""
    images = photos(24, 48, 48, seed=5)
    layers, magnitude = 2, 15
    params, _ = drawn(range(200, 224), layers, Mixing())
    augment = BatchAugment(48, layers, magnitude, Mixing(), 10, 0.0, Normalizer("cpu"))
    got = augment.augment_pixels(as_batch(images), params)
    for i, img in enumerate(images):
        row = params[i].tolist()
        if row[0]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        rotated = False
        for layer in range(layers):
            op, applied, sign, x, y = row[1 + layer * LAYER_FIELDS : 1 + (layer + 1) * LAYER_FIELDS]
            if not applied:
                continue
            name = OPS[op]
            monkeypatch.setattr(randaugment, "random", Replay(name, (x, y)))
            argument = op_argument(name, magnitude, 48)
            if name in SIGNED:
                argument = argument * sign
            img = randaugment.APPLY[name](img, argument)
            rotated |= name == "Rotate"
        diff = (got[i] - as_batch([img])[0].float()).abs()
        if rotated:
            assert (diff > 1).float().mean() < 0.01, i
        else:
            assert diff.max() <= 1, (i, row)


def test_a_sample_never_mixes_with_an_invalid_partner() -> None:
    images = as_batch(photos(4, 32, 32))
    labels = torch.tensor([0, 1, 2, 3])
    mixing = Mixing(mixup_alpha=1.0)
    params, mixes = drawn(range(4), 0, mixing)
    params[:, 0] = 0
    valid = torch.tensor([True, False, True, True])  # slot 1 is a bad sample's filler
    x, y = augmenter(mixing, layers=0, smoothing=0.0)(
        images, params, mixes, torch.arange(4), labels, valid
    )
    plain = Normalizer("cpu")(images)
    assert torch.equal(x[0], plain[0]) and y[0, 0].item() == 1.0  # its partner (1) is invalid
    assert y[2, 2].item() < 1.0 and y[3, 2].item() > 0.0  # the valid pair (2, 3) mixes
