"""Sample efficiency of the latent search (CHIMLE Fig. 2, TIM Fig. 3) and per-level diagnostics.

chimle bench efficiency CHECKPOINT --data HELD_OUT_DIR --out eff/    # `sample_efficiency` + its plot

curve = sample_efficiency(model, x, y, chimle.LPIPS("vgg"), seeds=10)
rows = level_diagnostics(model, x, y, chimle.LPIPS("vgg"))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import latent
from ..data.imageio import pyplot, save_figure
from ..loss import Distance, ToRGB
from ..model import TowerModel
from ..rng import seeded
from ..search import Scorer

__all__ = ["sample_efficiency", "level_diagnostics", "plot_efficiency", "BUDGETS"]

BUDGETS = (1, 2, 4, 8, 16, 32)  # CHIMLE candidates per level on the efficiency curve


def sample_efficiency(
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    seeds: int = 10,
    to_rgb: ToRGB | None = None,
    budgets: Sequence[int] = BUDGETS,
    flat_max: int | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    chunk_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
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
    budgets = sorted({int(m) for m in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive candidate counts, got {budgets}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    levels, top, n = model.cfg.levels, budgets[-1], x.shape[0]
    n_max = int(flat_max or 16 * levels * top)
    sc = Scorer(model, x, y, distance, to_rgb, memory_budget)  # checks [0, 1]
    layout, device = sc.layout, sc.device
    chunk = max(1, min(n_max, chunk_bytes // (4 * n * sum(layout.dims()))))  # codes held at once
    chimle = np.zeros((seeds, len(budgets), n))
    flat = np.zeros((seeds, n, n_max))
    with sc.context():
        for s in range(seeds):
            # CHIMLE, nested candidates: pool row i * top + j is candidate j of input i (the order
            # search.hierarchical draws them in with m = top).
            g = seeded(seed, s, 0, device=device)
            prefixes = [sc.initial] * len(budgets)
            for level in range(1, levels + 1):
                pool = layout.sample_level(level, n * top, g, device)
                if level == 1:  # one shared prefix: score the pool once, each budget looks at its first m
                    d_all = sc.score(sc.initial, 1, [pool], top)
                for b, m in enumerate(budgets):
                    rows = (torch.arange(n, device=device)[:, None] * top + torch.arange(m, device=device)).flatten()
                    d = d_all[:, :m] if level == 1 else sc.score(prefixes[b], level, latent.index([pool], rows), m)
                    best = d.argmin(1)
                    if level == levels:
                        chimle[s, b] = d.gather(1, best[:, None])[:, 0].float().cpu().numpy()
                    else:
                        pick = torch.arange(n, device=device) * top + best
                        prefixes[b] = sc.step(level, prefixes[b], sc.fmt(latent.index([pool], pick)[0]))
            # cIMLE: whole codes, judged by the full output.
            g = seeded(seed, s, 1, device=device)
            for lo in range(0, n_max, chunk):
                c = min(chunk, n_max - lo)
                d = sc.score(sc.initial, 1, layout.sample(n * c, g, device), c)
                flat[s, :, lo : lo + c] = d.float().cpu().numpy()
    thresholds = chimle.mean((0, 2))
    curve = np.minimum.accumulate(flat, axis=2).mean((0, 1))  # D(n), n = 1..n_max
    rows = []
    for m, t in zip(budgets, thresholds):
        reached = np.nonzero(curve <= t)[0]
        cimle: int | str = int(reached[0]) + 1 if reached.size else f"> {n_max}"
        ratio: float | str = cimle / (levels * m) if isinstance(cimle, int) else f"> {n_max / (levels * m):.3g}"
        rows.append(
            {
                "per_level_m": m,
                "chimle_samples": levels * m,
                "lpips_threshold": float(t),
                "cimle_samples": cimle,
                "ratio": ratio,
            }
        )
    return {
        "rows": rows,
        "levels": levels,
        "images": n,
        "seeds": seeds,
        "budgets": budgets,
        "flat_max": n_max,
        "chimle_std": chimle.mean(2).std(0).tolist(),
        "cimle_curve": curve.tolist(),
    }


def level_diagnostics(
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    draws: int = 24,
    to_rgb: ToRGB | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
) -> list[dict[str, float]]:
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
    sc = Scorer(model, x, y, distance, to_rgb, memory_budget)  # checks [0, 1]
    layout, device, n, levels = sc.layout, sc.device, x.shape[0], model.cfg.levels
    g = seeded(seed, 2, device=device)
    base = latent.repeat(layout.sample(n, g, device), draws)  # row i * draws + j: input i
    rows = []
    with sc.context():
        for level in range(1, levels + 1):
            codes = latent.replace(base, level, layout.sample_level(level, n * draws, g, device))
            final = sc.score(sc.initial, 1, codes, draws).double().cpu()  # (N, draws)
            part = sc.score(sc.initial, 1, codes[:level], draws).double().cpu()
            corr = [torch.corrcoef(torch.stack([f, p]))[0, 1].item() for f, p in zip(final, part)]
            rows.append(
                {
                    "level": level,
                    "final_std": final.std(1).mean().item(),
                    "partial_final_corr": float(np.nanmean(corr)) if not np.isnan(corr).all() else float("nan"),
                }
            )
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
    ax.set(
        xlabel="LPIPS distance to the observed image",
        ylabel="generated samples needed",
        title=f"Sample efficiency ({result['images']} images, {result['seeds']} seeds)",
    )
    ax.invert_xaxis()  # stricter thresholds to the right, as the curve is read
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
