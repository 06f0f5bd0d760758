"""Stateless seeds: a 64-bit hash of integers.

Per-slot augmentation, per-step mixup, per-rank random streams and the data order all need
randomness that any process can compute alone, for any position, without carrying or replaying an
RNG state: a resumed run, another rank or another loader worker must draw the same numbers for the
same (seed, position). A hash of the integers that name the position gives that.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def seed_for(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chain): cheap, stateless per-position randomness."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x


def rng(*values: int) -> np.random.Generator:
    """A numpy generator seeded by `seed_for(*values)`."""
    return np.random.default_rng(seed_for(*values))


def seed_weights(seed: int) -> None:
    """The generators that draw the initial weights: the same seed on every rank (and every
    device generator), so every rank builds the same model."""
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank streams for everything drawn during training (python, numpy, torch on the CPU and
    every GPU): stochastic depth and dropout masks differ between ranks, as if each rank's
    micro-batch were part of one big batch. Restored from the checkpoint on resume."""
    random.seed(seed_for(seed, rank, 1))
    np.random.seed(seed_for(seed, rank, 2) % (1 << 32))
    torch.manual_seed(seed_for(seed, rank, 3))
