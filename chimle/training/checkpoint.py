"""Training checkpoints: an atomic write of the training state that keeps the previous one, its format
version, the finiteness check before a write, and the check that a resumed run continues the same
trajectory.

A checkpoint holds the model, the optimizer, the step, the RNG state, the resolved config, the last
logged losses and the pool's *recipe* (round, the winning candidate of every search, the distances),
never the pool's codes: those are redrawn bit-for-bit from their seeds on resume (`chimle.search.replay`),
so the file is the size of model + optimizer whatever the pool (docs/measurements.md: what a
paper-preset pool's codes would weigh).

Two checkpoints are kept: `last.pt` and `previous.pt` (the one before it), so a damaged or bad last one
always has a fallback. A write goes to a staging file first; only a complete, fsynced file replaces
`last.pt`, the old `last.pt` having become `previous.pt` (a hard link, no copy). A write that fails
(full disk, I/O error, no permission) leaves both files as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.imageio import atomic_write
from .config import Config

__all__ = ["FORMAT", "save_state", "previous_path", "nonfinite", "trajectory_changes", "RESUMABLE_CHANGES"]

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
        "train.on_nonfinite",  # only acts once training has diverged
        "train.check_weights_every",
        "train.dist_timeout",
    }
)


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before `path` is kept: last.pt -> previous.pt."""
    path = Path(path)
    return path.with_name("previous" + path.suffix if path.stem == "last" else f"{path.stem}.previous{path.suffix}")


def save_state(path: str | Path, state: dict[str, Any], keep_previous: bool = True) -> Path:
    """Write a training state atomically; the file it replaces becomes `previous_path(path)`.

    A failure at any point (an exception from the writer, a full disk, a kill) leaves `path` and the
    previous checkpoint as they were: the state is written and fsynced to a staging file in the same
    folder, and only then renamed over `path`.
    """
    path = Path(path)
    staged = path.with_name(f".{path.name}.new")
    try:
        atomic_write(staged, lambda f: torch.save(state, f))
        if keep_previous and path.exists():
            _replace_with_link(path, previous_path(path))
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise
    return path


def _replace_with_link(src: Path, dst: Path) -> None:
    """Make `dst` the file `src` is (a hard link: no copy, `src` stays), atomically over an old `dst`."""
    tmp = dst.with_name(f".{dst.name}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links: copy (last.pt stays in place either way)
        atomic_write(tmp, lambda f: f.write(src.read_bytes()))
    os.replace(tmp, dst)


def nonfinite(state: dict[str, Any]) -> list[str]:
    """Names of the model and optimizer tensors of `state` that hold a NaN or an inf (empty: all finite).
    Checked before every write, so that a diverged state never replaces a good checkpoint (the loss is
    checked by the training loop: a non-finite step's update is never applied)."""
    bad = [f"model.{k}" for k, v in state["model"].items() if v.is_floating_point() and not bool(v.isfinite().all())]
    for i, s in state["optimizer"].get("state", {}).items():
        bad += [
            f"optimizer.state.{i}.{k}"
            for k, v in s.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())
        ]
    return bad


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
    config and would change the trajectory (see RESUMABLE_CHANGES). A field that a run saved by an older
    chimle does not have counts as its default (which is what that version did)."""
    old, new = _flat(yaml.safe_load(saved_yaml)), _flat(yaml.safe_load(current_yaml))
    defaults = _flat(dataclasses.asdict(Config()))
    old = {k: old.get(k, defaults.get(k)) for k in set(old) | set(new)}
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old)
        if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    ]
