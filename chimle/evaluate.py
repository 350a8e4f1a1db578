"""Evaluation of a trained tower: every metric of the papers on held-out photos, and the
sample-efficiency curve of CHIMLE Fig. 2 / TIM Fig. 3.

    chimle eval CHECKPOINT --data HELD_OUT_DIR --num 10 --out eval/      # writes metrics.json, metrics.md, PNGs
    chimle bench efficiency CHECKPOINT --data HELD_OUT_DIR --out eff/    # `sample_efficiency` + its plot

    from chimle.evaluate import evaluate, sample_efficiency
    result = evaluate(model, task, "photos/held_out", num_samples=10, out_dir="eval")
    curve = sample_efficiency(model, x, y, chimle.LPIPS("vgg"), seeds=10)

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

LPIPS is LPIPS-alex (the LPIPS default) for all of these. KID and FwV are stored unscaled; the
papers print them x 10^3, and metrics.md shows both.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import latent, metrics
from .data import ImageDataset, Task
from .imageio import check_range01, pyplot, save_figure
from .model import TowerModel
from .train import seeded

__all__ = ["evaluate", "sample_efficiency", "level_diagnostics", "plot_efficiency", "write_markdown_table", "FWV_SIGMAS", "BUDGETS"]

FWV_SIGMAS = (0.3, 0.2, 0.15)  # the bandwidths the cIMLE and CHIMLE papers report
BUDGETS = (1, 2, 4, 8, 16, 32)  # CHIMLE candidates per level on the efficiency curve
ToRGB = Callable[[Tensor, Tensor], Tensor]


def _held_out(task: Task, data: str | os.PathLike | ImageDataset, crop: int, levels: int,
              max_images: int | None) -> tuple[Tensor, Tensor, list[str]]:
    """(inputs, targets, names) of the centre crops of the held-out photos."""
    if isinstance(data, ImageDataset):
        ds = data
        if ds.train:
            raise ValueError("evaluate needs an ImageDataset with train=False (deterministic centre crops)")
    else:
        if task.paired:
            raise ValueError("the paired task reads inputs from a second folder: pass an ImageDataset "
                             "(train=False, input_root=...) as `data`")
        ds = ImageDataset(data, task, crop=crop, levels=levels, train=False)
    n = len(ds) if max_images is None else min(len(ds), max_images)
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 held-out images, got {n} from {data}")
    items = [ds[i] for i in range(n)]
    return (torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items]),
            [it["name"] for it in items])


def _recorded(fn: Callable[[], Any], notes: list[str]) -> Any:
    """fn(), with its warnings appended to `notes` (and shown again to the caller once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    for w in caught:
        notes.append(str(w.message))
        warnings.warn(str(w.message), w.category, stacklevel=3)
    return out


def evaluate(model: TowerModel, task: Task, data: str | os.PathLike | ImageDataset, num_samples: int = 10,
             out_dir: str | os.PathLike = "eval", crop: int | None = None, seed: int = 0,
             max_images: int | None = None, *, ivo_runs: int = 5, ivo_steps: int = 200,
             ivo_images: int | None = None, prd_clusters: int = 20, batch_size: int = 8,
             grid_inputs: int = 8) -> dict[str, Any]:
    """All metrics of the papers on the held-out photos in `data`; writes them to `out_dir`.

    data: a folder of held-out photos (centre crops of side `crop`, default the model's training
        size `model.cfg.input_size * task.scale`), or an ImageDataset with train=False.
    num_samples: K samples per input; the fake set of FID/KID/PRD is all K * N of them.
    ivo_runs / ivo_steps / ivo_images: IvO is the slow one (runs * steps forward and backward passes
        per image): ivo_runs=0 turns it off, ivo_images limits it to the first inputs.
    Writes out_dir/metrics.json (every value, the counts used and the warnings), metrics.md, prd.png
    and samples.png (input | samples | target, at most `grid_inputs` rows). Returns the JSON's dict.
    """
    from .inception import features
    from .sample import generate, save_grid

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (diversity needs two samples per input), got {num_samples}")
    t0 = time.time()
    device = model.device
    crop = crop or model.cfg.input_size * task.scale
    x, y, names = _held_out(task, data, crop, model.cfg.levels, max_images)
    check_range01(x, "inputs")
    check_range01(y, "targets")
    n = x.shape[0]

    g = seeded(seed, 1, device=device)
    samples = torch.cat([generate(model, x[lo:lo + batch_size], num_samples, g, task=task).float().cpu()
                         for lo in range(0, n, batch_size)], 1)  # (K, N, 3, H, W)
    check_range01(samples, "samples")
    if samples.shape[1:] != y.shape:
        raise ValueError(f"samples {tuple(samples.shape[1:])} do not match the targets {tuple(y.shape)}: "
                         f"is the checkpoint trained for this task ({task.name})?")
    fake = samples.flatten(0, 1)

    notes: list[str] = []
    r: dict[str, Any] = {"task": task.name, "images": n, "samples_per_input": num_samples,
                         "fake_images": int(fake.shape[0]), "crop": crop, "seed": seed}
    # One Inception pass per set serves FID, KID and PRD.
    fr = features(y, dims=2048, device=device)
    ff = features(fake, dims=2048, device=device)
    r["fid"] = _recorded(lambda: metrics.fid(fr, ff), notes)
    r["kid"], r["kid_std"] = _recorded(lambda: metrics.kid(fr, ff, generator=seeded(seed, 2)),
                                       notes)
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision, recall = _recorded(lambda: metrics.prd_curve(fr, ff, num_clusters=prd_clusters, seed=seed), notes)
    r["prd_f8"], r["prd_f1_8"] = metrics.prd_f_beta(precision, recall)
    metrics.plot_prd({task.name: (precision, recall)}, out / "prd.png")

    if ivo_runs > 0 and ivo_steps > 0:
        k = n if ivo_images is None else max(1, min(n, ivo_images))
        mean, std = metrics.ivo(model, x[:k], y[:k], runs=ivo_runs, steps=ivo_steps,
                                generator=seeded(seed, 3, device=device), to_rgb=task.output_to_rgb,
                                batch_size=batch_size)
        r.update(ivo_mean=mean * 1e3, ivo_std=std * 1e3, ivo_images=k, ivo_runs=ivo_runs, ivo_steps=ivo_steps)

    rows = min(n, grid_inputs)
    save_grid(out / "samples.png", x[:rows], samples[:8, :rows], y[:rows], task=task)
    r["units"] = {"ivo_mean": "MSE x 1e3 (the papers' 10^-3 scale)", "kid": "unscaled (papers: x 1e3)",
                  "fwv": "unscaled (papers: x 1e3)", "lpips": "LPIPS-alex", "inception_dims": 2048}
    r["names"] = names
    r["warnings"] = notes
    r["seconds"] = round(time.time() - t0, 2)
    r["files"] = {k: str(out / f) for k, f in (("json", "metrics.json"), ("markdown", "metrics.md"),
                                               ("prd_plot", "prd.png"), ("grid", "samples.png"))}
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
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def _write_metrics_md(r: dict[str, Any], path: Path) -> None:
    lines = [f"# Evaluation: {r['task']}, {r['images']} images x {r['samples_per_input']} samples "
             f"({r['crop']} px centre crops)", "",
             "| metric | value | papers' scale | what |", "| --- | --- | --- | --- |"]
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


# -----------------------------------------------------------------------------------------------
# sample efficiency (CHIMLE Fig. 2, TIM Fig. 3)


def sample_efficiency(model: TowerModel, x: Tensor, y: Tensor, distance: Callable[[Tensor, Tensor], Tensor],
                      seeds: int = 10, to_rgb: ToRGB | None = None, budgets: Sequence[int] = BUDGETS,
                      flat_max: int | None = None, seed: int = 0, memory_budget: int | str | None = None,
                      chunk_bytes: int = 256 * 2 ** 20) -> dict[str, Any]:
    """How many generated samples flat cIMLE needs to get as close to the observed images as
    hierarchical CHIMLE gets with m candidates per level (CHIMLE Fig. 2, TIM Fig. 3).

    CHIMLE: for each per-level budget m in `budgets` (m candidates at every level, so L * m generated
        samples: each partial evaluation counts as one sample), run Algorithm 1 (the selection of
        `chimle.search.hierarchical`) and take the mean over images of the selected code's distance
        to the observed image at the last level; the threshold t(m) is its mean over `seeds` seeds.
        Within a seed the candidate sets are nested (budget m uses the first m of the max(budgets)
        candidates drawn per level and input), so the thresholds compare like with like; at the
        largest budget the selection is exactly `search.hierarchical` with that seed's generator.
    cIMLE: per seed, draw flat_max whole codes per image (default 16 * L * max(budgets)), in chunks,
        and measure each full output; D(n) = mean over images and seeds of the minimum distance
        among the first n draws (the expected best-of-n). For each t(m), cimle_samples = the smallest
        n with D(n) <= t(m), or "> flat_max" when not reached; ratio = cimle_samples / (L * m).

    x, y: held-out inputs and observed images in [0, 1]; distance as in the search (LPIPS-vgg in the
    papers); to_rgb for colourisation. Deterministic for fixed `seed`.
    Returns {"rows": [{per_level_m, chimle_samples, lpips_threshold, cimle_samples, ratio}], "cimle_curve":
    D(1..flat_max), "chimle_std": per-budget std over seeds, and the counts used}.
    """
    from . import search

    budgets = sorted({int(m) for m in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive candidate counts, got {budgets}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    levels, top, n = model.cfg.levels, budgets[-1], x.shape[0]
    n_max = int(flat_max or 16 * levels * top)
    ev = search._Evaluator(model, x, y, distance, to_rgb, memory_budget)  # checks [0, 1]
    layout, device = ev.layout, ev.device
    chunk = max(1, min(n_max, chunk_bytes // (4 * n * sum(layout.dims()))))  # codes held at once
    chimle = np.zeros((seeds, len(budgets), n))
    flat = np.zeros((seeds, n, n_max))
    with ev.context():
        for s in range(seeds):
            # CHIMLE, nested candidates: pool row i * top + j is candidate j of input i (the order
            # search.hierarchical draws them in with m = top).
            g = seeded(seed, s, 0, device=device)
            prefixes = [ev.initial] * len(budgets)
            for level in range(1, levels + 1):
                pool = layout.sample_level(level, n * top, g, device)
                if level == 1:  # one shared prefix: score the pool once, each budget looks at its first m
                    d_all = ev.score(ev.initial, 1, [pool], top)
                for b, m in enumerate(budgets):
                    rows = (torch.arange(n, device=device)[:, None] * top + torch.arange(m, device=device)).flatten()
                    d = d_all[:, :m] if level == 1 else ev.score(prefixes[b], level, latent.index([pool], rows), m)
                    best = d.argmin(1)
                    if level == levels:
                        chimle[s, b] = d.gather(1, best[:, None])[:, 0].float().cpu().numpy()
                    else:
                        pick = torch.arange(n, device=device) * top + best
                        prefixes[b] = ev.step(level, prefixes[b], ev.fmt(latent.index([pool], pick)[0]))
            # cIMLE: whole codes, judged by the full output.
            g = seeded(seed, s, 1, device=device)
            for lo in range(0, n_max, chunk):
                c = min(chunk, n_max - lo)
                d = ev.score(ev.initial, 1, layout.sample(n * c, g, device), c)
                flat[s, :, lo:lo + c] = d.float().cpu().numpy()
    thresholds = chimle.mean((0, 2))
    curve = np.minimum.accumulate(flat, axis=2).mean((0, 1))  # D(n), n = 1..n_max
    rows = []
    for m, t in zip(budgets, thresholds):
        reached = np.nonzero(curve <= t)[0]
        cimle: int | str = int(reached[0]) + 1 if reached.size else f"> {n_max}"
        ratio: float | str = cimle / (levels * m) if isinstance(cimle, int) else f"> {n_max / (levels * m):.3g}"
        rows.append({"per_level_m": m, "chimle_samples": levels * m, "lpips_threshold": float(t),
                     "cimle_samples": cimle, "ratio": ratio})
    return {"rows": rows, "levels": levels, "images": n, "seeds": seeds, "budgets": budgets, "flat_max": n_max,
            "chimle_std": chimle.mean(2).std(0).tolist(), "cimle_curve": curve.tolist()}


def level_diagnostics(model: TowerModel, x: Tensor, y: Tensor, distance: Callable[[Tensor, Tensor], Tensor],
                      draws: int = 24, to_rgb: ToRGB | None = None, seed: int = 0,
                      memory_budget: int | str | None = None) -> list[dict[str, float]]:
    """Why CHIMLE does or does not beat cIMLE on a model: per level l, redraw only component l
    (`draws` times, the other components fixed at one random code per input) and report

        final_std           std over the draws of d(final output, y): how much of the final
                            distance level l's component controls
        partial_final_corr  Pearson correlation over the draws between d(level-l output, y at level l)
                            and d(final output, y): how well partial evaluation at level l predicts
                            the final distance (1 at the last level by construction)

    both averaged over images. CHIMLE's premise (Sect. 2.2) is a coarse level that carries much of
    the variation and a partial evaluation that predicts the final; a weakly trained tower can break
    the second, and then hierarchical search gains little over flat search.
    """
    from . import search

    ev = search._Evaluator(model, x, y, distance, to_rgb, memory_budget)  # checks [0, 1]
    layout, device, n, levels = ev.layout, ev.device, x.shape[0], model.cfg.levels
    g = seeded(seed, 2, device=device)
    base = latent.repeat(layout.sample(n, g, device), draws)  # row i * draws + j: input i
    rows = []
    with ev.context():
        for level in range(1, levels + 1):
            codes = latent.replace(base, level, layout.sample_level(level, n * draws, g, device))
            final = ev.score(ev.initial, 1, codes, draws).double().cpu()  # (N, draws)
            part = ev.score(ev.initial, 1, codes[:level], draws).double().cpu()
            corr = [torch.corrcoef(torch.stack([f, p]))[0, 1].item() for f, p in zip(final, part)]
            rows.append({"level": level, "final_std": final.std(1).mean().item(),
                         "partial_final_corr": float(np.nanmean(corr)) if not np.isnan(corr).all() else float("nan")})
    return rows


def plot_efficiency(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG like CHIMLE Fig. 2: generated samples needed (log scale) against the LPIPS distance reached,
    for CHIMLE (L * m) and cIMLE (the best-of-n curve); unreached thresholds are marked at flat_max."""
    plt = pyplot()

    rows, n_max = result["rows"], result["flat_max"]
    t = [r["lpips_threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    curve = np.asarray(result["cimle_curve"])
    ax.plot(curve, np.arange(1, len(curve) + 1), color="#dd8452", lw=0.8, alpha=0.5, label="cIMLE best-of-n D(n)")
    ax.plot(t, [r["chimle_samples"] for r in rows], "o-", color="#4c72b0", label="CHIMLE")
    hit = [(ti, r["cimle_samples"]) for ti, r in zip(t, rows) if isinstance(r["cimle_samples"], int)]
    if hit:
        ax.plot(*zip(*hit), "s-", color="#dd8452", label="cIMLE")
    miss = [ti for ti, r in zip(t, rows) if not isinstance(r["cimle_samples"], int)]
    if miss:
        ax.plot(miss, [n_max] * len(miss), "^", color="#c44e52", label=f"cIMLE: > {n_max}")
    ax.set_yscale("log")
    ax.set(xlabel="LPIPS distance to the observed image", ylabel="generated samples needed",
           title=f"Sample efficiency ({result['images']} images, {result['seeds']} seeds)")
    ax.invert_xaxis()  # stricter thresholds to the right, as the curve is read
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
