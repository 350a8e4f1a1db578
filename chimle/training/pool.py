"""The pool of one IMLE round: P training crops, the latent code chosen for each, and its recipe.

Each round (the authors' schedule: 400 images, then 10,000 steps) picks P random crops, searches one code per
crop (CHIMLE's Algorithm 1 or cIMLE's flat selection), and trains on those (input, code, target)
triples. The crops are cut once per round, not once per step (a JPEG task would re-encode its input
on every step). A checkpoint stores the pool's `recipe` (the winners of every search); the codes are
redrawn from the search's seeds (`chimle.search.replay`), bit-equal.

The targets do not change during a round either, so the pool also keeps what the loss makes of each
target (`level_targets`: the target resized to every level and its LPIPS features), computed the
first time the entry is drawn and reused on every later step of the round, as long as they fit in a
memory budget (the sizes per entry are in docs/measurements.md, "CPU: the training step").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import latent
from ..latent import Codes
from ..loss import Distance, LevelTarget, level_targets
from ..memory import default_budget, parse_bytes

__all__ = ["Pool"]


@dataclass
class Pool:
    round: int
    inputs: Tensor  # (P, Cin, h, w) on the CPU (moved to the device a batch at a time)
    targets: Tensor  # (P, 3, H, W) on the CPU
    codes: Codes  # the chosen code of every entry, P rows per level component, on the training device
    dists: Tensor  # (P,) the search's distance of each chosen code
    picks: Tensor  # (P, L) winning candidate of every level, (P, 1) for the flat search, (P, 0) for z = 0
    masks: Tensor | None = None  # (P, 1, H, W) per-pixel loss weights (scene layouts' loss rebalancing)
    # row -> its `level_targets`, batch 1, on the training device (filled by `loss_targets`; dies with the pool)
    target_cache: dict[int, list[LevelTarget]] = field(default_factory=dict, repr=False)
    target_cache_bytes: int = field(default=0, repr=False)
    target_cache_limit: int | None = field(default=None, repr=False)  # fixed at the first `loss_targets`

    def batch(self, rows: list[int], device: torch.device) -> tuple[Tensor, Tensor, Codes]:
        """(inputs, targets, codes) of pool entries `rows`, on `device`."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        codes = latent.index(self.codes, idx.to(self.codes[0].style.device))
        return self.inputs[idx].to(device), self.targets[idx].to(device), latent.to(codes, device)

    def loss_targets(
        self,
        rows: list[int],
        sizes: list[tuple[int, int]],
        distance: Distance,
        device: torch.device,
        budget: int | str | None = None,
    ) -> list[LevelTarget]:
        """The `level_targets` of pool entries `rows` at output `sizes`, batched: from the cache, or
        computed now and cached while the cache stays within `budget` bytes (default: a quarter of
        the free GPU memory, or 2 GiB on a CPU; 0 caches nothing).

        Each entry is computed on its own (batch 1), never together with the rest of a batch: its
        values are then the same bits whichever steps draw it and whether it was cached or not, so a
        resumed run (which starts with an empty cache) repeats the uninterrupted one exactly."""
        if not rows:  # an empty share of the batch: what `level_losses` would make of an empty y
            mask = None if self.masks is None else self.masks[:0].to(device)
            return level_targets(self.targets[:0].to(device), sizes, distance, mask=mask)
        if self.target_cache_limit is None:  # once per pool: the free memory shrinks as the cache grows
            self.target_cache_limit = _cache_budget(device) if budget is None else parse_bytes(budget)
        per_row = []
        for r in rows:
            t = self.target_cache.get(r)
            if t is None:
                mask = None if self.masks is None else self.masks[r : r + 1].to(device)
                t = level_targets(self.targets[r : r + 1].to(device), sizes, distance, mask=mask)
                size = sum(x.numel() * x.element_size() for lt in t for x in [lt.image, *(lt.features or [])])
                if self.target_cache_bytes + size <= self.target_cache_limit:
                    self.target_cache[r] = t
                    self.target_cache_bytes += size
            per_row.append(t)
        if len(per_row) == 1:
            return per_row[0]
        return [
            LevelTarget(
                torch.cat([t[l].image for t in per_row]),
                None
                if per_row[0][l].features is None
                else [torch.cat(f) for f in zip(*(t[l].features for t in per_row))],
            )
            for l in range(len(sizes))
        ]

    def recipe(self) -> dict[str, Any]:
        """What a checkpoint keeps: enough to redraw the codes (with the run's config and seed)."""
        return {"round": self.round, "picks": self.picks.to(torch.int32).cpu(), "dists": self.dists.cpu()}


def _cache_budget(device: torch.device) -> int:
    """Default bytes for the pool's target features: a quarter of the free GPU memory (memory the
    caching allocator holds but does not use counts as free; the rest is left to the training step
    and the next round's search), or on a CPU the search's default budget (2 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 4
    return default_budget(device)
