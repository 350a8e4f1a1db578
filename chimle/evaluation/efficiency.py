"""Sample efficiency of the latent search (CHIMLE Fig. 2, TIM Fig. 3) and per-level diagnostics.

chimle bench efficiency CHECKPOINT --data HELD_OUT_DIR --out eff/    # `run_efficiency`

curve = sample_efficiency(model, x, y, chimle.LPIPS("vgg"), EfficiencyOptions(seeds=10))
rows = level_diagnostics(model, x, y, chimle.LPIPS("vgg"))
result = run_efficiency("runs/sr8/checkpoints/last.pt", "held_out/", "eff/")   # both, on held-out crops
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import latent
from ..data.imageio import pyplot, save_figure
from ..data.tasks import make_task
from ..distances.lpips import LPIPS
from ..inference.weights import load_with_task
from ..loss import Distance, ToRGB
from ..model import TowerModel
from ..rng import seeded
from ..search import Scorer, SearchOptions, hierarchical, level_costs, search_cost
from .evaluate import write_markdown_table
from .held_out import held_out_crops

__all__ = [
    "EfficiencyOptions",
    "sample_efficiency",
    "level_diagnostics",
    "plot_efficiency",
    "run_efficiency",
    "BUDGETS",
]

BUDGETS = (1, 2, 4, 8, 16, 32)  # CHIMLE candidates per level on the efficiency curve


@dataclass(frozen=True)
class EfficiencyOptions:
    """What the efficiency curve measures (`sample_efficiency`): `seeds` seeds from `seed`, CHIMLE with m
    candidates at every level for each m in `budgets` and with each non-uniform schedule, cIMLE with up
    to `flat_max` whole codes per image (None: 16 * L * max(budgets))."""

    seeds: int = 10
    budgets: Sequence[int] = BUDGETS
    flat_max: int | None = None
    schedules: Sequence[Sequence[int]] = ()
    seed: int = 0


def sample_efficiency(
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    options: EfficiencyOptions = EfficiencyOptions(),
    to_rgb: ToRGB | None = None,
    memory_budget: int | str | None = None,
    chunk_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """How many generated samples flat cIMLE needs to get as close to the observed images as
    hierarchical CHIMLE gets with m candidates per level (CHIMLE Fig. 2, TIM Fig. 3), counted two ways.

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
        n with D(n) <= t(m), or "> flat_max" when not reached; ratio_samples = cimle_samples / (L * m).
    Compute: a partial evaluation is not a sample's worth of work (a level-l candidate runs level l
        only, on the cached prefix), so every row also gives CHIMLE's cost in full-forward equivalents
        (`chimle.search.search_cost`, FLOPs of this model and distance; a cIMLE sample costs exactly 1)
        and ratio_compute = cimle_samples / chimle_compute: the comparison at equal compute.
    schedules: non-uniform candidate counts (m_1, ..., m_L), e.g. the paper's shape (200, 200, 20, 10);
        each runs `search.hierarchical` once per seed and adds a row (per_level_m "200,200,20,10").

    budgets, seeds, flat_max, schedules and seed are the fields of `options` (`EfficiencyOptions`).
    x, y: held-out inputs and observed images in [0, 1]; distance as in the search (LPIPS-vgg in the
    papers); to_rgb for colourisation. Deterministic for fixed `seed`.
    Returns {"rows": [{per_level_m, chimle_samples, chimle_compute, lpips_threshold, threshold_std,
    cimle_samples, ratio_samples, ratio_compute}], "cimle_curve": D(1..flat_max), "level_costs", and the
    counts used}; threshold_std is the spread of t over seeds.
    """
    seeds, flat_max, seed, schedules = options.seeds, options.flat_max, options.seed, options.schedules
    budgets = sorted({int(m) for m in options.budgets})
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
    extra: dict[tuple[int, ...], list[float]] = {tuple(int(m) for m in sched): [] for sched in schedules}
    if any(len(k) != levels or min(k) < 1 for k in extra):
        raise ValueError(f"each schedule needs {levels} positive counts, got {[list(k) for k in extra]}")
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
    for s in range(seeds):
        for sched in schedules:  # non-uniform schedules: the search itself, one run per seed
            _, d = hierarchical(
                model,
                x,
                y,
                distance,
                sched,
                seeded(seed, s, 2, device=device),
                to_rgb=to_rgb,
                options=SearchOptions(memory_budget=memory_budget),
            )
            extra[tuple(sched)].append(float(d.double().mean()))
    costs = level_costs(model, tuple(x.shape[-2:]), distance, to_rgb)
    per_seed = [(str(m), [m] * levels, chimle.mean(2)[:, b]) for b, m in enumerate(budgets)]
    per_seed += [(",".join(map(str, k)), list(k), np.asarray(v)) for k, v in extra.items()]
    curve = np.minimum.accumulate(flat, axis=2).mean((0, 1))  # D(n), n = 1..n_max
    rows = []
    for name, sched, ts in per_seed:
        t, samples, compute = float(ts.mean()), sum(sched), search_cost(costs, sched)
        reached = np.nonzero(curve <= t)[0]
        cimle: int | str = int(reached[0]) + 1 if reached.size else f"> {n_max}"
        rows.append(
            {
                "per_level_m": int(name) if name.isdigit() else name,
                "chimle_samples": samples,
                "chimle_compute": round(compute, 3),
                "lpips_threshold": t,
                "threshold_std": float(ts.std()),
                "cimle_samples": cimle,
                "ratio_samples": _ratio(cimle, samples, n_max),
                "ratio_compute": _ratio(cimle, compute, n_max),
            }
        )
    return {
        "rows": rows,
        "levels": levels,
        "images": n,
        "seeds": seeds,
        "budgets": budgets,
        "schedules": [list(k) for k in extra],
        "flat_max": n_max,
        "level_costs": [c._asdict() for c in costs],
        "cimle_curve": curve.tolist(),
    }


def _ratio(cimle: int | str, chimle: float, n_max: int) -> float | str:
    """cIMLE's work over CHIMLE's for the same distance (> 1: CHIMLE needs less), or a lower bound."""
    return cimle / chimle if isinstance(cimle, int) else f"> {n_max / chimle:.3g}"


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
    """PNG like CHIMLE Fig. 2, twice: the work CHIMLE needs (log scale) against the LPIPS distance it
    reaches, counted in generated samples (left: every partial evaluation one sample) and in
    full-forward equivalents (right: equal compute), with the cIMLE best-of-n curve, which is the same
    in both units (one cIMLE sample = one full forward); unreached thresholds are marked at flat_max."""
    plt = pyplot()

    rows, n_max = result["rows"], result["flat_max"]
    t = [r["lpips_threshold"] for r in rows]
    curve = np.asarray(result["cimle_curve"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, unit in ((axes[0], "chimle_samples", "samples"), (axes[1], "chimle_compute", "full forwards")):
        ax.plot(curve, np.arange(1, len(curve) + 1), color="#dd8452", lw=0.8, alpha=0.5, label="cIMLE best-of-n")
        ax.errorbar(
            t,
            [r[key] for r in rows],
            xerr=[r["threshold_std"] for r in rows],
            fmt="o",
            color="#4c72b0",
            label=f"CHIMLE ({unit})",
            capsize=2,
        )
        hit = [(ti, r["cimle_samples"]) for ti, r in zip(t, rows) if isinstance(r["cimle_samples"], int)]
        if hit:
            ax.plot(*zip(*hit), "s", color="#dd8452", label="cIMLE, same distance")
        miss = [ti for ti, r in zip(t, rows) if not isinstance(r["cimle_samples"], int)]
        if miss:
            ax.plot(miss, [n_max] * len(miss), "^", color="#c44e52", label=f"cIMLE: > {n_max}")
        ax.set_yscale("log")
        ax.set(
            xlabel="LPIPS distance to the observed image", ylabel=f"work needed ({unit})", title=f"counted in {unit}"
        )
        ax.invert_xaxis()  # stricter thresholds to the right, as the curve is read
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"Sample efficiency ({result['images']} images, {result['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def run_efficiency(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    options: EfficiencyOptions = EfficiencyOptions(),
    *,
    images: int = 8,
    crop: int | None = None,
    device: str = "cpu",
    distance: str = "vgg",
) -> dict[str, Any]:
    """`sample_efficiency` and `level_diagnostics` of a checkpoint on `images` held-out crops of the photos
    in `data` (side `crop`, default the model's training size), with LPIPS-`distance`. Writes
    OUT/efficiency.json (the result, its "level_diagnostics" included), efficiency.png, efficiency.md and
    levels.md; returns the result."""
    model, task_cfg = load_with_task(checkpoint, device)
    task = make_task(**task_cfg)
    crop = crop or model.cfg.input_size * task.scale
    x, y = held_out_crops(task, data, crop, model.cfg.levels, max(1, images // 2))
    x, y = x[:images].to(device), y[:images].to(device)
    lpips = LPIPS(distance).to(device)
    result = sample_efficiency(model, x, y, lpips, options, to_rgb=task.rgb)
    result["level_diagnostics"] = level_diagnostics(model, x, y, lpips, to_rgb=task.rgb)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "efficiency.json").write_text(json.dumps(result, indent=2, default=float))
    plot_efficiency(result, out_dir / "efficiency.png")
    write_markdown_table(result["rows"], out_dir / "efficiency.md")
    write_markdown_table(result["level_diagnostics"], out_dir / "levels.md")
    return result
