"""CHIMLE's ablation ladder (Fig. 7) on photos: one configuration trained four times, then scored.

    rows = run_ablation("photos/train", "photos/held_out", "abl/", AblationOptions(steps=600))

The rungs (`chimle.search.ABLATIONS`): full CHIMLE, no IC, no IC + PE, and no IC + PE + CD, which is
cIMLE with as many samples. Each trains on the same data for the same steps from the same seed (a rerun
reuses finished rungs and resumes an interrupted one), then draws `samples` samples for each held-out
crop (`chimle.evaluation.held_out.held_out_crops`) and reports KID (unbiased at few images), FID (biased
at few images) and LPIPS to the target, best of K and mean. OUT/ablation.json, ablation.md and
ablation.png hold the rows; each rung's scores are reused while they are fresh (`fresh_metrics`).
`over_seeds` makes the mean and spread of several seeds' ladders, as `chimle reproduce` reports them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.imageio import atomic_write, pyplot, save_figure
from ..inference.sample import generate
from ..rng import Stream, seeded
from ..search import ABLATIONS
from ..training.config import load_config
from ..training.trainer import train_or_reuse
from . import metrics
from .evaluate import write_markdown_table
from .held_out import fresh_metrics, held_out_crops
from .inception import features
from .stats import mean_std

__all__ = ["AblationOptions", "run_ablation", "plot_ablation", "over_seeds"]


@dataclass(frozen=True)
class AblationOptions:
    """The recipe every rung trains with and how it is scored (`chimle bench ablation`'s options)."""

    steps: int = 600
    preset: str = "tiny"
    task: str = "sr"
    scale: int = 8
    crop: int = 64
    samples: int = 6  # per held-out crop
    crops_per_image: int = 8  # held-out crops per photo
    overrides: Sequence[str] = ()  # config overrides, KEY=VALUE
    device: str = "cpu"


def run_ablation(
    data: str | os.PathLike, held_out: str | os.PathLike, out: str | os.PathLike, options: AblationOptions
) -> list[dict[str, Any]]:
    """Train (or reuse) every rung on `data` and score it on crops of the photos in `held_out`; one row
    per rung, also written to OUT/ablation.json, ablation.md and ablation.png."""
    o, out_dir = options, Path(out)
    rows = []
    held: dict[str, torch.Tensor] = {}  # the held-out crops and their Inception features: the same for every rung
    for rung in ABLATIONS:
        cfg = load_config(
            overrides=list(o.overrides),
            base={
                "name": rung,
                "out": str(out_dir / rung),
                "preset": o.preset,
                "data.task": o.task,
                "data.scale": o.scale,
                "data.crop": o.crop,
                "data.data": str(data),
                "search.ablation": rung,
                "train.steps": o.steps,
                "train.device": o.device,
                "train.sample_every": 0,
            },
        )
        trainer = train_or_reuse(cfg)  # a rerun reuses finished rungs, resumes an interrupted one
        # ... and their metrics, when measured on these weights with the same held-out set and counts
        saved = trainer.out / "eval" / "ablation.json"
        counts = {
            "held_out": str(Path(held_out).resolve()),
            "crop": o.crop,
            "crops_per_image": o.crops_per_image,
            "samples": o.samples,
        }
        if (cached := fresh_metrics(saved, trainer.checkpoint_path, **counts)) is not None:
            rows.append(cached["row"])
            continue
        if not held:
            x, y = held_out_crops(trainer.task, held_out, o.crop, trainer.model_cfg.levels, o.crops_per_image)
            held |= {"x": x, "y": y, "features": features(y, device=trainer.device)}
        x, y = held["x"], held["y"]
        g = seeded(0, Stream.ABLATION, device=trainer.device)  # on the model's device, as generate draws there
        fake = generate(trainer.model, x.to(trainer.device), o.samples, g, task=trainer.task).cpu()
        with torch.no_grad():
            d = torch.stack(
                [trainer.distance(fake[k].to(trainer.device), y.to(trainer.device)).cpu() for k in range(o.samples)]
            )  # (K, N)
        # one Inception pass per set for both; KID is unbiased at these few images, FID is not
        fr, ff = held["features"], features(fake.flatten(0, 1), device=trainer.device)
        kid, kid_subsets_std = metrics.kid(fr, ff, generator=seeded(0, Stream.KID))
        rows.append(
            {
                "ablation": rung,
                "kid": kid,
                "kid_subsets_std": kid_subsets_std,
                "fid": metrics.fid(fr, ff),
                "lpips_best_of_k": float(d.min(0).values.mean()),
                "lpips_mean": float(d.mean()),
                "final_train_loss": trainer.last["loss"],
                "images": int(y.shape[0]),
                "samples": o.samples,
            }
        )
        record = json.dumps({**counts, "row": rows[-1]}, indent=2).encode()
        atomic_write(saved, lambda f, record=record: f.write(record))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=2))
    write_markdown_table(rows, out_dir / "ablation.md")
    panels = [("kid", "kid_subsets_std", "KID (lower is better; bars: over its subsets)")]
    panels += [("lpips_best_of_k", None, "LPIPS to target, best of K"), ("fid", None, "FID (biased at few images)")]
    plot_ablation(rows, out_dir / "ablation.png", panels)
    return rows


def over_seeds(per_seed: Sequence[Sequence[dict[str, Any]]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per rung: the mean and spread (KEY, KEY_std) over the seeds' ladders of every key."""
    rows = []
    for i, rung in enumerate(r["ablation"] for r in per_seed[0]):
        row: dict[str, Any] = {"ablation": rung}
        for key in keys:
            row[key], row[f"{key}_std"] = mean_std([s[i][key] for s in per_seed])
        rows.append(row)
    return rows


def plot_ablation(rows: Sequence[dict[str, Any]], path: Path, panels: Sequence[tuple[str, str | None, str]]) -> None:
    """One bar chart per panel (row key, key of its error bars or None, title), the rungs side by side:
    the layout of `bench ablation` (one seed) and of the report (over seeds, beside the paper's FID)."""
    plt = pyplot()
    names = [r["ablation"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, err, title) in zip(axes, panels):
        color = "#999999" if key.startswith("paper") else "#4c72b0"
        ax.bar(names, [r[key] for r in rows], yerr=[r[err] for r in rows] if err else None, capsize=4, color=color)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    save_figure(fig, path)
