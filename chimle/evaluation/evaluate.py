"""Evaluation of a trained tower: every metric of the papers on held-out photos.

    chimle eval CHECKPOINT --data HELD_OUT_DIR --num 10 --out eval/      # writes metrics.json, metrics.md, PNGs

    from chimle.evaluation.evaluate import evaluate
    result = evaluate(model, task, "photos/held_out", num_samples=10, out_dir="eval")

`evaluate` takes deterministic centre crops of the held-out photos, makes the task's inputs, draws
`num_samples` samples per input (every level's component drawn independently, as at test time) and
computes (the metric functions are in `chimle.metrics`):

    fid, kid, kid_std          samples vs the real crops on InceptionV3 2048-d features; all K*N samples
                               are the fake set (FID/KID grow biased when there are few images: a warning
                               says how many were used; the papers use thousands)
    fwv_0.3, fwv_0.2, fwv_0.15 faithfulness-weighted variance (CHIMLE's table uses sigma 0.2)
    lpips_diversity            mean LPIPS between two samples of one input
    prd_f8, prd_f1_8           PRD recall / precision weights (Sajjadi et al.), plot in prd.png
    ivo_mean, ivo_std          inference via optimisation, MSE in units of 10^-3 as the papers report it
    lpips_to_target_mean       LPIPS of a sample to the observed image; *_best_of_k: the closest of K
                               per input
    chroma_spread_tint, chroma_spread_regional
                               how samples differ in colour: by a whole-image tint, or by region
                               (`metrics.chroma_spread`, Lab a/b units)
    chroma_error_best_of_k, chroma_error_mean
                               colourisation: Lab chroma distance of a sample to the photo, the closest of
                               K per input and the mean (`metrics.chroma_error`)
    consistency_mae, consistency_shift
                               does a sample observe back to its input (`metrics.consistency`): mean
                               absolute error and mean shift per channel (absent for paired / night)

LPIPS is LPIPS-alex (the LPIPS default) for all of these. KID and FwV are stored unscaled; the
papers print them x 10^3, and metrics.md shows both.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.dataset import ImageDataset
from ..data.imageio import check_range01
from ..data.tasks import Task
from ..inference.figures import save_grid
from ..inference.sample import generate
from ..model import TowerModel
from ..rng import Stream, seeded
from . import metrics
from .inception import features

__all__ = ["evaluate", "EvalOptions", "write_markdown_table", "FWV_SIGMAS"]

FWV_SIGMAS = (0.3, 0.2, 0.15)  # the bandwidths the cIMLE and CHIMLE papers report


def _held_out(
    task: Task, data: str | os.PathLike | ImageDataset, crop: int, levels: int, max_images: int | None
) -> tuple[Tensor, Tensor, list[str]]:
    """(inputs, targets, names) of the centre crops of the held-out photos."""
    if isinstance(data, ImageDataset):
        ds = data
        if ds.train:
            raise ValueError("evaluate needs an ImageDataset with train=False (deterministic centre crops)")
    else:
        if task.paired:
            raise ValueError(
                "the paired task reads inputs from a second folder: pass an ImageDataset "
                "(train=False, input_root=...) as `data`"
            )
        ds = ImageDataset(data, task, crop=crop, levels=levels, train=False)
    n = len(ds) if max_images is None else min(len(ds), max_images)
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 held-out images, got {n} from {data}")
    items = [ds[i] for i in range(n)]
    return (
        torch.stack([it["input"] for it in items]),
        torch.stack([it["target"] for it in items]),
        [it["name"] for it in items],
    )


def _recorded(fn: Callable[[], Any], notes: list[str]) -> Any:
    """fn(), with its warnings appended to `notes` (and shown again to the caller once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    for w in caught:
        notes.append(str(w.message))
        warnings.warn(str(w.message), w.category, stacklevel=3)
    return out


@dataclass(frozen=True)
class EvalOptions:
    """The slower parts of `evaluate` and its figure.

    ivo_runs / ivo_steps / ivo_images: IvO is the slow one (runs * steps forward and backward passes per
        image): ivo_runs=0 turns it off, ivo_images limits it to the first inputs (None: all).
    prd_clusters: k-means clusters of PRD; batch_size: inputs sampled at once; grid_inputs: rows of samples.png.
    """

    ivo_runs: int = 5
    ivo_steps: int = 200
    ivo_images: int | None = None
    prd_clusters: int = 20
    batch_size: int = 8
    grid_inputs: int = 8


def evaluate(
    model: TowerModel,
    task: Task,
    data: str | os.PathLike | ImageDataset,
    num_samples: int = 10,
    out_dir: str | os.PathLike = "eval",
    crop: int | None = None,
    seed: int = 0,
    max_images: int | None = None,
    options: EvalOptions = EvalOptions(),
) -> dict[str, Any]:
    """All metrics of the papers on the held-out photos in `data`; writes them to `out_dir`.

    data: a folder of held-out photos (centre crops of side `crop`, default the model's training
        size `model.cfg.input_size * task.scale`), or an ImageDataset with train=False.
    num_samples: K samples per input; the fake set of FID/KID/PRD is all K * N of them.
    options: IvO's runs and steps (ivo_runs=0 turns it off), PRD's clusters, the batch and the grid
        (`EvalOptions`).
    Writes out_dir/metrics.json (every value, the counts used and the warnings), metrics.md, prd.png
    and samples.png (input | samples | target, at most `grid_inputs` rows). Returns the JSON's dict.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (diversity needs two samples per input), got {num_samples}")
    t0 = time.time()
    o = options
    batch_size = o.batch_size
    device = model.device
    crop = crop or model.cfg.input_size * task.scale
    x, y, names = _held_out(task, data, crop, model.cfg.levels, max_images)
    check_range01(x, "inputs")
    check_range01(y, "targets")
    n = x.shape[0]

    g = seeded(seed, Stream.EVAL_SAMPLES, device=device)
    samples = torch.cat(
        [
            generate(model, x[lo : lo + batch_size], num_samples, g, task=task).float().cpu()
            for lo in range(0, n, batch_size)
        ],
        1,
    )  # (K, N, 3, H, W)
    check_range01(samples, "samples")
    if samples.shape[1:] != y.shape:
        raise ValueError(
            f"samples {tuple(samples.shape[1:])} do not match the targets {tuple(y.shape)}: "
            f"is the checkpoint trained for this task ({task.name})?"
        )
    fake = samples.flatten(0, 1)

    notes: list[str] = []
    r: dict[str, Any] = {
        "task": task.name,
        "images": n,
        "samples_per_input": num_samples,
        "fake_images": int(fake.shape[0]),
        "crop": crop,
        "seed": seed,
    }
    # One Inception pass per set serves FID, KID and PRD.
    fr = features(y, dims=2048, device=device)
    ff = features(fake, dims=2048, device=device)
    r["fid"] = _recorded(lambda: metrics.fid(fr, ff), notes)
    r["kid"], r["kid_std"] = _recorded(lambda: metrics.kid(fr, ff, generator=seeded(seed, Stream.KID)), notes)
    r["kid_subset_size"] = min(50, n)

    # LPIPS-alex on the model's device (a no-op on the CPU); the distances come back (K, N) on the CPU
    samples_d, y_d = samples.to(device), y.to(device)
    to_mean, to_target = metrics.faithfulness_distances(samples_d, y_d)
    for sigma in FWV_SIGMAS:
        r[f"fwv_{sigma}"] = metrics.fwv_from_distances(to_mean, to_target, sigma)
    r["lpips_diversity"] = metrics.lpips_diversity(samples_d)
    del samples_d, y_d
    r["lpips_to_target_mean"] = float(to_target.double().mean())
    r["lpips_to_target_best_of_k"] = float(to_target.double().min(0).values.mean())
    # colour modes: a tint of the whole image, or regions coloured differently (metrics.chroma_spread)
    r["chroma_spread_tint"], r["chroma_spread_regional"] = metrics.chroma_spread(samples).values()
    if task.name == "colorize":  # does some sample colour the photo as it is (metrics.chroma_error)
        err = metrics.chroma_error(samples, y)
        r["chroma_error_best_of_k"], r["chroma_error_mean"] = err["best_of_k"], err["mean"]
    if task.observe(samples[:1, :1].flatten(0, 1)) is not None:
        c = metrics.consistency(samples, x, task.observe)
        r["consistency_mae"], r["consistency_shift"] = c["mae"], c["shift"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision, recall = _recorded(lambda: metrics.prd_curve(fr, ff, num_clusters=o.prd_clusters, seed=seed), notes)
    r["prd_f8"], r["prd_f1_8"] = metrics.prd_f_beta(precision, recall)
    metrics.plot_prd({task.name: (precision, recall)}, out / "prd.png")

    if o.ivo_runs > 0 and o.ivo_steps > 0:
        k = n if o.ivo_images is None else max(1, min(n, o.ivo_images))
        mean, std = metrics.ivo(
            model,
            x[:k],
            y[:k],
            runs=o.ivo_runs,
            steps=o.ivo_steps,
            generator=seeded(seed, Stream.IVO, device=device),
            to_rgb=task.rgb,
            batch_size=batch_size,
        )
        r.update(ivo_mean=mean * 1e3, ivo_std=std * 1e3, ivo_images=k, ivo_runs=o.ivo_runs, ivo_steps=o.ivo_steps)

    rows = min(n, o.grid_inputs)
    save_grid(out / "samples.png", x[:rows], samples[:8, :rows], y[:rows], task=task)
    r["units"] = {
        "ivo_mean": "MSE x 1e3 (the papers' 10^-3 scale)",
        "kid": "unscaled (papers: x 1e3)",
        "fwv": "unscaled (papers: x 1e3)",
        "lpips": "LPIPS-alex",
        "inception_dims": 2048,
    }
    r["names"] = names
    r["warnings"] = notes
    r["seconds"] = round(time.time() - t0, 2)
    r["files"] = {
        k: str(out / f)
        for k, f in (
            ("json", "metrics.json"),
            ("markdown", "metrics.md"),
            ("prd_plot", "prd.png"),
            ("grid", "samples.png"),
        )
    }
    (out / "metrics.json").write_text(json.dumps(r, indent=2))
    _write_metrics_md(r, out / "metrics.md")
    return r


_DESCRIPTIONS = [  # (key, description, scale shown in the "papers' scale" column)
    ("fid", "FID, samples vs real crops (lower is better)", 1),
    ("kid", "KID mean (lower is better)", 1e3),
    ("kid_std", "KID std over subsets", 1e3),
    ("fwv_0.3", "FwV, sigma 0.3 (higher is better)", 1e3),
    ("fwv_0.2", "FwV, sigma 0.2 (CHIMLE Table 1)", 1e3),
    ("fwv_0.15", "FwV, sigma 0.15", 1e3),
    ("lpips_diversity", "LPIPS diversity (pairs of samples)", 1),
    ("prd_f8", "PRD F8 (recall)", 1),
    ("prd_f1_8", "PRD F1/8 (precision)", 1),
    ("ivo_mean", "IvO MSE x 1e3, mean of runs (lower is better)", 1),
    ("ivo_std", "IvO MSE x 1e3, std of runs", 1),
    ("lpips_to_target_mean", "LPIPS sample to target, mean", 1),
    ("lpips_to_target_best_of_k", "LPIPS sample to target, best of K", 1),
    ("consistency_mae", "consistency: mean |observe(sample) - input| (lower is better)", 1),
    ("chroma_spread_tint", "chroma spread over samples: mean chroma (whole-image tints), Lab units", 1),
    ("chroma_spread_regional", "chroma spread over samples after removing the mean chroma (regions), Lab units", 1),
    ("chroma_error_best_of_k", "chroma distance to the photo, best of K (colourisation), Lab units", 1),
    ("chroma_error_mean", "chroma distance to the photo, mean over samples (colourisation), Lab units", 1),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def _write_metrics_md(r: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Evaluation: {r['task']}, {r['images']} images x {r['samples_per_input']} samples "
        f"({r['crop']} px centre crops)",
        "",
        "| metric | value | papers' scale | what |",
        "| --- | --- | --- | --- |",
    ]
    for key, what, scale in _DESCRIPTIONS:
        if key in r:
            shown = _fmt(r[key] * scale) + (" (x1e-3)" if scale != 1 else "")
            lines.append(f"| {key} | {_fmt(r[key])} | {shown} | {what} |")
    if r["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in r["warnings"]]
    path.write_text("\n".join(lines) + "\n")


def write_markdown_table(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """A Markdown table of `rows` (one column per key, in first-seen order); floats to 4 digits."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
