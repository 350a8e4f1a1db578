"""Training checkpoints: an atomic write of the training state, its format version, and the check
that a resumed run continues the same trajectory.

A checkpoint holds the model, the optimizer, the step, the RNG state, the resolved config, the last
logged losses and the pool's *recipe* (round, the winning candidate of every search, the distances),
never the pool's codes: those are redrawn bit-for-bit from their seeds on resume (`chimle.search.replay`),
so the file is the size of model + optimizer whatever the pool (the codes of a paper-preset pool
are 400 x 435,712 floats, 700 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.imageio import atomic_write

__all__ = ["FORMAT", "save_state", "trajectory_changes", "RESUMABLE_CHANGES"]

FORMAT = "chimle-train-2"

# Config fields a resumed run may change: they do not alter what the run computes (or, for
# train.steps, only how far it goes). Anything else would silently break "same trajectory".
RESUMABLE_CHANGES = frozenset(
    {
        "name",
        "out",
        "train.steps",
        "train.checkpoint_every",
        "train.log_every",
        "train.sample_every",
        "train.grid_inputs",
        "train.grid_samples",
        "train.device",
        "data.val_data",
        "data.verify",
        "data.cache",
        "search.memory_budget",
        "search.compile",
    }
)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training state atomically; an interruption leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def trajectory_changes(saved_yaml: str, current_yaml: str) -> list[str]:
    """'key: old -> new' for every config field that differs between the saved run and the current
    config and would change the trajectory (see RESUMABLE_CHANGES)."""
    old, new = _flat(yaml.safe_load(saved_yaml)), _flat(yaml.safe_load(current_yaml))
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    ]
