"""Seeded random streams: every random choice of chimle comes from a generator keyed by integers.

A run's randomness is a function of (seed, stream, round or step), never of hidden global state, so
that resume reproduces an uninterrupted run exactly and a sharded multi-process search draws what
the single-process one draws. Each use has its own named stream, so adding one never shifts another.

    g = seeded(cfg.train.seed, Stream.SEARCH, round_, chunk)        # the candidates of one search chunk
"""

from __future__ import annotations

import enum

import numpy as np
import torch

__all__ = ["Stream", "seeded", "generator_from"]


class Stream(enum.IntEnum):
    """The independent random streams (their values are part of every run's trajectory: never renumber)."""

    EVAL_SAMPLES = 1  # chimle eval: the samples drawn per held-out input
    KID = 2  # chimle eval: KID's random subsets
    IVO = 3  # chimle eval: IvO's initial codes
    PREDICT = 4  # MNIST illustration: predictions for the unseen digits
    SCATTER = 5  # MNIST illustration: the many predictions of Fig. 1b
    DIGIT_GRID = 6  # MNIST illustration: the predictions of Fig. 1a
    POOL = 11  # training: which images make the pool of a round
    SEARCH = 22  # training: the candidate codes of a round's search
    BATCH = 33  # training: which pool entries make a step's batch
    GRID = 44  # training: the codes of the sample grids
    DEMO = 55  # chimle demo: the codes of the demo grid
    ABLATION = 66  # bench ablation: the samples of each rung


def seeded(*key: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on `device` (default CPU) determined by the integers in `key`."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


def generator_from(rng: torch.Generator | int | None) -> torch.Generator:
    """A torch.Generator from a generator (used as is), a seed, or None (seed 0)."""
    if isinstance(rng, torch.Generator):
        return rng
    return torch.Generator().manual_seed(0 if rng is None else int(rng))
