"""The pool of one IMLE round: P training crops, the latent code chosen for each, and its recipe.

Each round (REFERENCE.md: 400 images, then 10,000 steps) picks P random crops, searches one code per
crop (CHIMLE's Algorithm 1 or cIMLE's flat selection), and trains on those (input, code, target)
triples. The crops are cut once per round, not once per step (a JPEG task would re-encode its input
on every step). A checkpoint stores the pool's `recipe` (the winners of every search); the codes are
redrawn from the search's seeds (`chimle.search.replay`), bit-equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import latent
from ..latent import Codes

__all__ = ["Pool"]


@dataclass
class Pool:
    round: int
    inputs: Tensor  # (P, Cin, h, w) on the CPU (moved to the device a batch at a time)
    targets: Tensor  # (P, 3, H, W) on the CPU
    codes: Codes  # the chosen code of every entry, P rows per level component, on the training device
    dists: Tensor  # (P,) the search's distance of each chosen code
    picks: Tensor  # (P, L) winning candidate of every level, (P, 1) for the flat search, (P, 0) for z = 0

    def batch(self, rows: list[int], device: torch.device) -> tuple[Tensor, Tensor, Codes]:
        """(inputs, targets, codes) of pool entries `rows`, on `device`."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        codes = latent.index(self.codes, idx.to(self.codes[0].style.device))
        return self.inputs[idx].to(device), self.targets[idx].to(device), latent.to(codes, device)

    def recipe(self) -> dict[str, Any]:
        """What a checkpoint keeps: enough to redraw the codes (with the run's config and seed)."""
        return {"round": self.round, "picks": self.picks.to(torch.int32).cpu(), "dists": self.dists.cpu()}
