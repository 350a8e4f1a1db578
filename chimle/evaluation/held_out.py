"""Held-out crops for the quality benchmarks, and metrics that are reused while they are fresh.

    x, y = held_out_crops(task, "photos/held_out", crop=64, levels=3, crops_per_image=8)
    saved = fresh_metrics(run / "eval" / "metrics.json", run / "checkpoints" / "last.pt", samples=6)
    r = evaluate_tower(trainer, "tiles/", samples=10, crop=128)   # evaluate(), reused while fresh

`held_out_crops` takes several deterministic random crops of each held-out photo (few photos give more
crops, as FID and KID need images); `fresh_metrics` returns saved metrics only when they were written
after the checkpoint (so on those weights) with the same counts: minutes of sampling and Inception per
model on a CPU are not spent again when a benchmark or a report is rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..data.dataset import ImageDataset
from ..data.tasks import Task
from .evaluate import EvalOptions, evaluate

if TYPE_CHECKING:
    from ..training.trainer import Trainer

__all__ = ["held_out_crops", "fresh_metrics", "evaluate_tower"]


def held_out_crops(
    task: Task, folder: str | os.PathLike, crop: int, levels: int, crops_per_image: int, seed: int = 7
) -> tuple[Tensor, Tensor]:
    """(inputs, targets): `crops_per_image` deterministic random crops of each photo in `folder`."""
    ds = ImageDataset(folder, task, crop=crop, levels=levels, train=True, seed=seed)
    items = []
    for e in range(crops_per_image):
        ds.set_epoch(e)
        items += [ds[i] for i in range(len(ds))]
    return torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items])


def fresh_metrics(path: Path, checkpoint: Path, **counts: Any) -> dict | None:
    """The metrics saved at `path` if they were written after `checkpoint` (so on those weights) with the
    same `counts` (a count given as None matches any); None otherwise."""
    if not (path.exists() and checkpoint.exists() and path.stat().st_mtime > checkpoint.stat().st_mtime):
        return None
    saved = json.loads(path.read_text())
    return saved if all(v is None or saved.get(k) == v for k, v in counts.items()) else None


def evaluate_tower(tr: Trainer, tiles: str | os.PathLike, samples: int, crop: int, images: int | None = None) -> dict:
    """`evaluate` (no IvO) of a trained tower on held-out tiles, written to its run's eval/ and reused while that
    metrics.json is newer than the tower's checkpoint and has the same counts (minutes per tower on a CPU:
    Inception sees every sample). What the report's towers use."""
    path = tr.out / "eval" / "metrics.json"
    saved = fresh_metrics(path, tr.checkpoint_path, samples_per_input=samples, images=images, crop=crop)
    if saved is not None:
        return saved
    return evaluate(
        tr.model,
        tr.task,
        tiles,
        num_samples=samples,
        out_dir=path.parent,
        crop=crop,
        max_images=images,
        options=EvalOptions(ivo_runs=0),
    )
