"""`chimle reproduce`: the papers' experiments at CPU scale, as one report.

    chimle reproduce --out report/ --quick          # tiny towers, few steps and seeds: minutes on 2 cores
    chimle reproduce --out report/                  # the CPU-scale report: hours on a CPU
    chimle reproduce --out report/ --resume         # reuse every finished part (and resume training runs)

Parts, each beside the paper's number or figure:
  mnist       TIM Fig. 1: predictions for unseen digits and their PCA coordinates (`chimle mnist`).
  efficiency  TIM Fig. 3 / CHIMLE Fig. 2: the samples flat cIMLE needs to get as close to the observed
              image as CHIMLE, counted in samples and at equal compute (`chimle bench efficiency`).
  factors     What makes that curve better or worse on our towers: training length (snapshots of the
              efficiency part's tower), resolution (the same tower with level 1 at up to 64 px, and the
              shipped sr8-small), the distance (pixel L2 on MNIST and Fashion-MNIST, where it is
              meaningful at every level) and the authors' raw-tanh feedback between SR levels.
  ablation    CHIMLE Fig. 7: the ablation ladder, mean and spread over seeds (`chimle bench ablation`).
  table1      CHIMLE Table 1 at CPU scale: CHIMLE and cIMLE trained on the same photos for the same steps
              with the same search compute per image (cIMLE draws as many whole codes as CHIMLE's search
              costs in full-forward equivalents, `chimle.search.search_cost`), on sr, colorize, jpeg and
              the synthetic night task; KID with its spread over subsets, LPIPS to the target best of K,
              FwV at sigma 0.2 and LPIPS diversity on held-out tiles, mean and spread over seeds.
  digits      (only when asked: `--parts digits`, about an hour on one core) Table 1 where the search pays:
              digit super-resolution (7 -> 28 px) and completion (the lower half) under pixel L2, CHIMLE
              against cIMLE at equal compute and at equal samples, and the Fig. 7 ladder, over 5 seeds,
              scored by a digit classifier of our own (`chimle.evaluation.digit_table`).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist, or env
CHIMLE_FASHION_MNIST); without it the factors part leaves that row out and says so.

Data: scikit-image's photos; astronaut, coffee, motorcycle_left and motorcycle_right train, chelsea and
rocket are held out (cut into tiles for the metrics). Every part writes PART/result.json when it
finishes, and report.md / report.html (figures inline) are written from those after every part, so
an interrupted run keeps what it finished and `--resume` skips it.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.imageio import builtin_photo_dir, load_image, pyplot, save_figure, save_tiles
from ..data.tasks import make_task
from ..distances import make_distance
from ..evaluation import digit_table
from ..evaluation.efficiency import level_diagnostics, sample_efficiency
from ..evaluation.evaluate import evaluate
from ..inference.weights import load_with_task
from ..search import level_costs, search_cost
from ..threads import add_threads_argument, use_threads
from ..training.config import load_config
from ..training.trainer import Trainer, train_or_reuse
from . import bench_quality, mnist

__all__ = ["main", "run", "Sizes", "QUICK", "FULL"]

HELD_OUT = ("chelsea", "rocket")
TASKS = ("sr", "colorize", "jpeg", "night")
PAPER_TABLE1_FID = {  # CHIMLE Table 1: (CHIMLE, cIMLE); "night" is the real night-to-day task
    "sr": (16.01, 28.42),
    "colorize": (24.33, 63.00),
    "jpeg": (73.69, 101.66),
    "night": (141.44, 166.28),
}

PAPER_ABLATION_FID_SR = (16.01, 17.06, 18.53, 21.13)  # CHIMLE Fig. 7, SR: full, no IC, no IC/PE, no IC/PE/CD


@dataclass(frozen=True)
class Sizes:
    """How large each part runs."""

    preset: str = "small"
    crop: int = 64
    mnist_steps: int = 2000
    mnist_pool: int = 200  # digits whose codes are searched each round (`chimle mnist`'s default)
    mnist_eval_inputs: int = 100  # unseen digits scored, 20 predictions each
    sr_steps: int = 3000  # the SR tower of the efficiency curve
    schedule: tuple[int, ...] = (16, 8, 4)  # CHIMLE's m_l in training (the demo's)
    efficiency_seeds: int = 3
    efficiency_images: int = 8
    efficiency_budgets: tuple[int, ...] = (1, 2, 4, 8, 16)
    length_stages: tuple[int, ...] = (500, 1000, 2000)  # snapshots of the efficiency tower (and sr_steps)
    resolution_crops: tuple[int, ...] = (64, 128, 256)  # output sides: level 1 at crop / 4 px
    factor_budgets: tuple[int, ...] = (1, 4, 16)  # CHIMLE's m per level in the factors part
    factor_seeds: int = 3
    factor_images: int = 8
    ablation_steps: int = 750
    ablation_seeds: int = 3
    ablation_crops: int = 16  # held-out crops per photo (two photos: 32 inputs)
    table1_steps: int = 600
    table1_seeds: int = 3
    eval_samples: int = 6
    eval_images: int | None = 48  # held-out tiles used (None: all)
    pool: int = 96
    digits: digit_table.DigitSizes = digit_table.DigitSizes()  # the digits part


FULL = Sizes()
QUICK = Sizes(
    preset="tiny",
    crop=32,
    mnist_steps=200,
    sr_steps=300,
    schedule=(8, 4, 2),
    efficiency_seeds=3,
    efficiency_images=4,
    efficiency_budgets=(1, 2, 4, 8),
    length_stages=(100, 200),
    resolution_crops=(32, 128),
    factor_budgets=(1, 4),
    factor_seeds=2,
    factor_images=4,
    ablation_steps=100,
    ablation_seeds=2,
    ablation_crops=8,
    table1_steps=100,
    table1_seeds=2,
    eval_samples=4,
    eval_images=24,
    pool=32,
    digits=digit_table.QUICK,
)


def _split(out: Path) -> tuple[Path, Path, Path]:
    """out/photos/{train,held_out} from the bundled photos, and out/photos/tiles: the held-out photos
    cut into 64 px tiles (two photos give ~90 tiles: enough images for KID's subsets)."""
    train, held, tiles = (out / "photos" / k for k in ("train", "held_out", "tiles"))
    for d in (train, held, tiles):
        d.mkdir(parents=True, exist_ok=True)
    for p in sorted(builtin_photo_dir().iterdir()):
        dst = (held if p.stem in HELD_OUT else train) / p.name
        if not dst.exists():
            shutil.copy(p, dst)
        if p.stem in HELD_OUT and not any(tiles.glob(f"{p.stem}_*")):
            save_tiles(load_image(p), tiles, 64, p.stem)
    return train, held, tiles


# One progress bar per part (`run` opens it): a tick per tower trained or reused and per evaluation.
_bar: tqdm | None = None


def _tick() -> None:
    if _bar is not None:
        _bar.update()


def _units(part: str, sz: Sizes) -> int:
    """The ticks a part makes: the total of its progress bar."""
    stages = len({*sz.length_stages, sz.sr_steps})
    return {
        "mnist": 1,
        "efficiency": stages + 1,
        "factors": 2 * stages + len(sz.resolution_crops) + 1 + 2 + 1 + 2,
        "ablation": sz.ablation_seeds,
        "table1": len(TASKS) * sz.table1_seeds * 4,
        "digits": digit_table.units(sz.digits),
    }[part]


def _train(
    out: Path, sz: Sizes, task: str, steps: int, seed: int, train_dir: Path, model: dict | None = None, **search: Any
) -> Trainer:
    """Train (or resume, or reuse when finished) one tower of the report (`model`: TowerConfig overrides)."""
    base = {
        "out": str(out),
        "preset": sz.preset,
        "model": {"blocks": 1, **(model or {})},
        "data.task": task,
        "data.scale": 8,
        "data.crop": sz.crop,
        "data.data": str(train_dir),
        "search.distance": "alex",
        "search.samples_per_level": list(sz.schedule),
        "search.batch": 32,
        "train.steps": steps,
        "train.pool_size": sz.pool,
        "train.steps_per_round": 200,
        "train.batch_size": 4,
        "train.lr": 2e-4,
        "train.seed": seed,
        "train.sample_every": 0,
        "train.checkpoint_every": 500,
        **{f"search.{k}": v for k, v in search.items()},
    }
    trainer = train_or_reuse(load_config(base=base), quiet=True)
    _tick()
    return trainer


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def part_mnist(out: Path, sz: Sizes, dirs) -> dict:
    m = mnist.run(out, steps=sz.mnist_steps, pool=sz.mnist_pool, eval_inputs=sz.mnist_eval_inputs, quiet=True)
    _tick()
    return {k: v for k, v in m.items() if isinstance(v, (int, float, list, str))}


def _sr_tower(root: Path, sz: Sizes, train_dir: Path) -> tuple[Trainer, dict[int, Path]]:
    """The efficiency part's SR tower, trained in stages with a snapshot of the weights after each (the
    training-length factor); one run, so the snapshots lie on one trajectory (no learning-rate schedule)."""
    snaps = {}
    for steps in sorted({*sz.length_stages, sz.sr_steps}):
        tr = _train(root, sz, "sr", steps, 0, train_dir)
        snap = root / "checkpoints" / f"step_{steps}.pt"
        if tr.step == steps and not snap.exists():  # a run trained past this stage has no snapshot of it
            shutil.copy(tr.checkpoint_path, snap)
        if snap.exists():
            snaps[steps] = snap
    return tr, snaps


def part_efficiency(out: Path, sz: Sizes, dirs) -> dict:
    train_dir, held, _ = dirs
    tr, _ = _sr_tower(out / "sr8", sz, train_dir)
    r = bench_quality.run_efficiency(
        str(tr.checkpoint_path),
        str(held),
        str(out),
        seeds=sz.efficiency_seeds,
        images=sz.efficiency_images,
        budgets=list(sz.efficiency_budgets),
        distance="alex",
        schedules=[list(sz.schedule)],
    )
    _tick()
    return {"rows": r["rows"], "figure": "efficiency/efficiency.png"}


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def _curve(
    factor: str, setting: str, level1: int, model, x, y, distance, to_rgb, sz: Sizes, top: int = 0
) -> list[dict]:
    """The efficiency curve of one setting, compactly: per CHIMLE budget m <= `top` (and the schedule)
    the ratio in samples and at equal compute, with how well level 1's partial output predicts the
    final distance. cIMLE draws 8 x L x the largest m codes per image (a ratio up to ~8 is measured)."""
    budgets = [m for m in sz.factor_budgets if m <= (top or max(sz.factor_budgets))]
    levels = model.cfg.levels
    sched = [list(sz.schedule)] if len(sz.schedule) == levels and not top else []
    n_max = 8 * levels * max(budgets)
    r = sample_efficiency(model, x, y, distance, sz.factor_seeds, to_rgb, budgets, flat_max=n_max, schedules=sched)
    diag = level_diagnostics(model, x, y, distance, to_rgb=to_rgb)
    keys = ("per_level_m", "chimle_compute", "lpips_threshold", "cimle_samples", "ratio_samples", "ratio_compute")
    return [
        {"factor": factor, "setting": setting, "level1_px": level1, **{k: row[k] for k in keys}}
        | {"corr_level1": diag[0]["partial_final_corr"], "final_std_level1": diag[0]["final_std"]}
        for row in r["rows"]
    ]


def _sr_curve(factor: str, setting: str, model, task, held: Path, crop: int, sz: Sizes) -> list[dict]:
    """LPIPS-alex (what the towers train with) on held-out crops. Crops larger than the training crop
    cost (crop / sz.crop)^2 more per sample: half the images and m <= 4 keep them to minutes."""
    large = crop > sz.crop
    n = sz.factor_images // 2 if large else sz.factor_images
    x, y = bench_quality.held_out_crops(task, held, crop, model.cfg.levels, max(1, n // 2))
    lpips = make_distance("alex")
    return _curve(factor, setting, crop // 4, model, x[:n], y[:n], lpips, task.rgb, sz, top=4 if large else 0)


def _digits_tower(out: Path, sz: Sizes, data: Path | None) -> Path:
    """A digit tower of `chimle mnist` (TIM Fig. 1's recipe) trained on `data`; reused when finished."""
    done = out / "metrics.json"
    if not (done.exists() and json.loads(done.read_text()).get("steps") == sz.mnist_steps):
        mnist.run(
            out, steps=sz.mnist_steps, data=data, pool=sz.mnist_pool, eval_inputs=sz.mnist_eval_inputs, quiet=True
        )
    _tick()
    return out


def _digits_curve(setting: str, tower_out: Path, data: Path | None, sz: Sizes) -> list[dict]:
    """Pixel L2 (the distance the digit towers train with) on unseen digits of the `chimle mnist` split."""
    model, _ = load_with_task(tower_out / "checkpoints" / "last.pt")
    digits, _ = mnist.load_mnist(data)
    _, te, _, inputs = mnist.prepare(digits)
    ev = te[: 4 * sz.factor_images]
    x = torch.from_numpy(inputs[ev])[:, None]
    y = torch.from_numpy(digits[ev])[:, None].expand(-1, 3, -1, -1)
    task = make_task("paired", in_channels=1, out_channels=1)
    return _curve("distance", setting, 7, model, x, y, make_distance("l2"), task.rgb, sz)


def _cached(path: Path, curve: Callable[..., list[dict]], *args: Any) -> list[dict]:
    """One setting's rows, `curve(*args)`, computed once (an interrupted factors part resumes setting by setting)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(curve(*args), default=float))
    _tick()
    return json.loads(path.read_text())


def fashion_mnist() -> Path:
    return Path(os.environ.get("CHIMLE_FASHION_MNIST", FASHION_MNIST))


def part_factors(out: Path, sz: Sizes, dirs) -> dict:
    train_dir, held, _ = dirs
    rows: list[dict] = []
    notes: list[str] = []
    rows_dir = out / "rows"
    tr, snaps = _sr_tower(out.parent / "efficiency" / "sr8", sz, train_dir)
    # training length: snapshots of one run
    for steps, snap in snaps.items():
        model, task_cfg = load_with_task(snap)
        setting = ("training length", f"{steps} steps", model, make_task(**task_cfg))
        rows += _cached(rows_dir / f"length_{steps}.json", _sr_curve, *setting, held, sz.crop, sz)
    # resolution: the same tower on larger held-out crops, and the shipped model (trained 15,000 steps);
    # the last snapshot at the training crop is each comparison's baseline, repeated in its panel
    final = [r for r in rows if r["setting"] == f"{sz.sr_steps} steps"]
    rows += [r | {"factor": "resolution", "setting": f"{sz.sr_steps} steps, {sz.crop} px"} for r in final]
    for crop in sz.resolution_crops[1:]:
        setting = ("resolution", f"{sz.sr_steps} steps, {crop} px", tr.model, tr.task)
        rows += _cached(rows_dir / f"resolution_{crop}.json", _sr_curve, *setting, held, crop, sz)
    shipped, task_cfg = load_with_task("sr8-small")
    for crop in (sz.resolution_crops[0], sz.resolution_crops[-1]):
        setting = ("resolution", f"sr8-small, {crop} px", shipped, make_task(**task_cfg))
        rows += _cached(rows_dir / f"shipped_{crop}.json", _sr_curve, *setting, held, crop, sz)
    # the authors' raw tanh between SR levels: the same recipe with feedback "tanh"
    rows += [r | {"factor": "tanh feedback", "setting": f"{sz.sr_steps} steps, image (chimle)"} for r in final]
    tanh = _train(out / "sr8_tanh", sz, "sr", sz.sr_steps, 0, train_dir, model={"feedback": "tanh"})
    setting = ("tanh feedback", f"{sz.sr_steps} steps, tanh", tanh.model, tanh.task)
    rows += _cached(rows_dir / "tanh.json", _sr_curve, *setting, held, sz.crop, sz)
    # pixel L2 on digits: the mnist part's tower (trained here if that part has not run), and Fashion-MNIST
    digits_out = out.parent / "mnist"
    if not (digits_out / "metrics.json").exists():
        digits_out = _digits_tower(out / "mnist", sz, None)
    rows += _cached(rows_dir / "mnist.json", _digits_curve, "MNIST, pixel L2", digits_out, None, sz)
    if (fashion := fashion_mnist()).exists():
        _digits_tower(out / "fashion", sz, fashion)
        rows += _cached(
            rows_dir / "fashion.json", _digits_curve, "Fashion-MNIST, pixel L2", out / "fashion", fashion, sz
        )
    else:
        notes.append(f"Fashion-MNIST not found at {fashion} (apt-get install dataset-fashion-mnist): left out")
    _plot_factors(rows, out / "factors.png")
    return {"rows": rows, "notes": notes, "figure": "factors/factors.png"}


def _plot_factors(rows: list[dict], path: Path) -> None:
    """ratio_compute against m for every setting, one panel per factor (uniform budgets only)."""
    plt = pyplot()
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        settings = dict.fromkeys(r["setting"] for r in rows if r["factor"] == factor)
        for setting in settings:
            pts = [
                (r["per_level_m"], r["ratio_compute"])
                for r in rows
                if r["setting"] == setting
                and isinstance(r["per_level_m"], int)
                and isinstance(r["ratio_compute"], float)
            ]
            if pts:
                ax.plot(*zip(*pts), "o-", label=setting)
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="CHIMLE candidates per level m", title=factor)
        ax.set_ylabel("cIMLE / CHIMLE work, equal compute")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def part_ablation(out: Path, sz: Sizes, dirs) -> dict:
    train_dir, held, _ = dirs
    per_seed = []
    for seed in range(sz.ablation_seeds):
        per_seed.append(
            bench_quality.run_ablation(
                str(train_dir),
                str(held),
                str(out / f"seed{seed}"),
                steps=sz.ablation_steps,
                preset=sz.preset,
                crop=sz.crop,
                samples=sz.eval_samples,
                crops_per_image=sz.ablation_crops,
                overrides=[f"train.seed={seed}", "model.blocks=1", f"train.pool_size={sz.pool}"],
            )
        )
        _tick()
    rows = []
    for i, rung in enumerate(r["ablation"] for r in per_seed[0]):
        row = {"ablation": rung}
        for key in ("kid", "fid", "lpips_best_of_k", "lpips_mean"):
            row[key], row[f"{key}_std"] = _mean_std([s[i][key] for s in per_seed])
        row["paper_fid_sr"] = PAPER_ABLATION_FID_SR[i]
        rows.append(row)
    images = per_seed[0][0]["images"]
    panels = [("kid", "kid_std", "KID (ours, lower is better)")]
    panels += [("lpips_best_of_k", "lpips_best_of_k_std", "LPIPS to target, best of K (ours)")]
    panels += [("paper_fid_sr", None, "FID, paper (SR, Fig. 7)")]
    bench_quality.plot_ablation(rows, out / "ablation.png", panels)
    return {
        "rows": rows,
        "seeds": sz.ablation_seeds,
        "steps": sz.ablation_steps,
        "images": images,
        "samples": per_seed[0][0]["samples"],
        "figure": "ablation/ablation.png",
    }


def part_table1(out: Path, sz: Sizes, dirs) -> dict:
    train_dir, _, tiles = dirs
    rows = []
    for task in TASKS:
        per_method: dict[str, list[dict]] = {}
        for seed in range(sz.table1_seeds):
            chimle = _train(out / task / f"chimle_s{seed}", sz, task, sz.table1_steps, seed, train_dir)
            # cIMLE at the search compute of CHIMLE's schedule (full-forward equivalents, FLOPs)
            costs = level_costs(chimle.model, chimle.input_hw, make_distance("alex"), chimle.task.rgb)
            m_flat = max(1, round(search_cost(costs, sz.schedule)))
            cimle = _train(
                out / task / f"cimle_s{seed}",
                sz,
                task,
                sz.table1_steps,
                seed,
                train_dir,
                method="cimle",
                num_samples=m_flat,
            )
            for name, tr in (("chimle", chimle), ("cimle", cimle)):
                r = _evaluate(tr, tiles, sz)
                _tick()
                per_method.setdefault(name, []).append({**r, "m_flat": m_flat})
        for name, runs in per_method.items():
            row = {"task": task, "method": name, "search": _search_label(name, sz, runs[0]["m_flat"])}
            for key in ("kid", "fid", "lpips_to_target_best_of_k", "fwv_0.2", "lpips_diversity"):
                row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
            row["kid_subset_std"] = runs[0]["kid_std"]
            row["paper_fid"] = PAPER_TABLE1_FID[task][0 if name == "chimle" else 1]
            rows.append(row)
    by = {(r["task"], r["method"]): r for r in rows}
    plot_table1(by, out / "table1.png")
    return {
        "rows": rows,
        "comparison": [_compare(task, by[task, "chimle"], by[task, "cimle"], sz.table1_seeds) for task in TASKS],
        "seeds": sz.table1_seeds,
        "steps": sz.table1_steps,
        "images": rows and per_method["chimle"][0]["images"],
        "samples": sz.eval_samples,
        "figure": "table1/table1.png",
    }


def _compare(task: str, a: dict, b: dict, n: int) -> dict:
    """CHIMLE (row `a`) minus cIMLE (`b`) on one task, for KID and LPIPS to the target: the difference of the means over
    `n` seeds in standard errors (sqrt(s_a^2 / n + s_b^2 / n)). Beyond 2 of them we call it a difference,
    within them noise: with 3 seeds a side a coarse test, hence z itself in the report."""
    out: dict[str, Any] = {"task": task}
    for key, short in (("kid", "kid"), ("lpips_to_target_best_of_k", "lpips")):
        diff = a[key] - b[key]
        se = math.sqrt((a[f"{key}_std"] ** 2 + b[f"{key}_std"] ** 2) / n)
        z = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
        out[f"{short}_diff"], out[f"{short}_z"] = diff, z
        out[f"{short}_verdict"] = "CHIMLE lower" if z < -2 else "cIMLE lower" if z > 2 else "within noise"
    return out


def plot_table1(by: dict[tuple[str, str], dict], path: Path) -> None:
    """KID and LPIPS to the target per task, CHIMLE beside cIMLE with the spread over seeds, and the paper's FID
    (`by`: Table 1's rows by (task, method))."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for k, (method, color) in enumerate((("chimle", "#4c72b0"), ("cimle", "#dd8452"))):
        mine = [by[t, method] for t in TASKS]
        xs = [i + (k - 0.5) * 0.38 for i in range(len(TASKS))]
        for ax, key in ((axes[0], "kid"), (axes[1], "lpips_to_target_best_of_k")):
            ys, err = [r[key] for r in mine], [r[f"{key}_std"] for r in mine]
            ax.bar(xs, ys, 0.38, yerr=err, capsize=3, color=color, label=method)
        axes[2].bar(xs, [r["paper_fid"] for r in mine], 0.38, color=color, label=method)
    titles = ("KID (ours; log scale)", "LPIPS to target, best of K (ours)", "FID, paper (CHIMLE Table 1)")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(TASKS)), TASKS)
        ax.set_title(title, fontsize=9)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _evaluate(tr: Trainer, tiles: Path, sz: Sizes) -> dict:
    """evaluate() on the held-out tiles, reused when its metrics.json is newer than the tower's last
    checkpoint and has the same counts (minutes per tower on a CPU: Inception sees every sample)."""
    saved = bench_quality.fresh_metrics(
        tr.out / "eval" / "metrics.json", tr.checkpoint_path, samples_per_input=sz.eval_samples, images=sz.eval_images
    )
    if saved is not None:
        return saved
    return evaluate(
        tr.model,
        tr.task,
        tiles,
        num_samples=sz.eval_samples,
        out_dir=tr.out / "eval",
        crop=64,
        max_images=sz.eval_images,
        ivo_runs=0,
    )


def _search_label(method: str, sz: Sizes, m_flat: int) -> str:
    return f"m = {','.join(map(str, sz.schedule))}" if method == "chimle" else f"{m_flat} whole codes"


def part_digits(out: Path, sz: Sizes, dirs) -> dict:
    r = digit_table.run(out, sz.digits, tick=_tick)
    r["figures"] = [f"digits/{f}" for f in r["figures"]]
    return r


# The report's parts (run by default), and those that run only when named (`--parts digits`).
PARTS: dict[str, Callable[[Path, Sizes, tuple], dict]] = {
    "mnist": part_mnist,
    "efficiency": part_efficiency,
    "factors": part_factors,
    "ablation": part_ablation,
    "table1": part_table1,
}
EXTRA_PARTS: dict[str, Callable[[Path, Sizes, tuple], dict]] = {"digits": part_digits}


# ---------------------------------------------------------------------------------------------
# The report: one list of blocks, rendered as Markdown and as HTML with the figures inline


def _table(rows: list[dict], keys: list[str]) -> list[str]:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)] + [
        "| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows
    ]


def report_blocks(results: dict[str, dict], sz: Sizes, quick: bool) -> list[tuple[str, Any]]:
    b: list[tuple[str, Any]] = [("h1", "chimle: the papers' experiments at CPU scale")]
    command = "chimle reproduce --out OUT" + (" --quick" if quick else "")
    if set(results) != set(PARTS):  # a partial report says which parts it holds
        command += f" --parts {','.join(results)}"
    sizes = asdict(sz)
    if "digits" not in results:  # its sizes only beside its section
        sizes.pop("digits")
    b.append(("p", f"Command: `{command}`. Sizes: {json.dumps(sizes)}."))
    if "mnist" in results:
        r = results["mnist"]
        b += [
            ("h2", "TIM Fig. 1: the MNIST illustration"),
            (
                "p",
                f"Distance to the real digit over PCA coordinates 11-784 of {r.get('inputs')} unseen inputs: best of "
                f"{r.get('K', 20)} predictions {r['rest_best_of_K']:.3f}, one prediction {r['rest_one_sample']:.3f}, "
                f"the PCA input alone {r['rest_pca_input']:.3f}. Paper: predictions spread around the real digit's "
                f"coordinates (Fig. 1b). {r['seconds']:.0f} s.",
            ),
            ("img", "mnist/fig1a_predictions.png"),
            ("img", "mnist/fig1b_coordinates.png"),
        ]
    if "efficiency" in results:
        keys = ["per_level_m", "chimle_samples", "chimle_compute", "lpips_threshold", "threshold_std"]
        keys += ["cimle_samples", "ratio_samples", "ratio_compute"]
        b += [
            ("h2", "TIM Fig. 3 / CHIMLE Fig. 2: sample efficiency"),
            (
                "p",
                "Samples flat cIMLE needs to reach the distance CHIMLE reaches, in samples (each partial "
                "evaluation one sample) and at equal compute (full-forward equivalents). Paper: CHIMLE needs "
                "fewer samples, the more so the closer the required distance.",
            ),
            ("table", _table(results["efficiency"]["rows"], keys)),
            ("img", "efficiency/efficiency.png"),
        ]
    if "factors" in results:
        r = results["factors"]
        keys = ["factor", "setting", "level1_px", "per_level_m", "chimle_compute", "lpips_threshold"]
        keys += ["cimle_samples", "ratio_samples", "ratio_compute", "corr_level1"]
        b += [
            ("h2", "What makes the efficiency curve better or worse"),
            (
                "p",
                "Each setting's curve as above (ratio > 1: CHIMLE needs less work than cIMLE for the same "
                f"distance; {sz.factor_seeds} seeds; SR: LPIPS-alex on {sz.factor_images} held-out crops; digits: "
                f"pixel L2 on {4 * sz.factor_images} unseen digits). level1_px: the side of level 1's output. "
                "corr_level1: the correlation of level 1's partial distance with the final distance when only "
                "level 1's component is redrawn (`level_diagnostics`), the premise of partial evaluation.",
            ),
            *[("p", note) for note in r["notes"]],
            ("table", _table(r["rows"], keys)),
            ("img", "factors/factors.png"),
        ]
    if "ablation" in results:
        r = results["ablation"]
        keys = ["ablation", "kid", "kid_std", "lpips_best_of_k", "lpips_best_of_k_std", "fid", "fid_std"]
        keys.append("paper_fid_sr")
        b += [
            ("h2", "CHIMLE Fig. 7: ablations"),
            (
                "p",
                f"Each rung trained {r['steps']} steps on SR (`chimle bench ablation`'s recipe: LPIPS-VGG, batch 1), "
                f"then {r.get('samples', sz.eval_samples)} samples for each of {r['images']} held-out crops; "
                f"mean and spread over {r['seeds']} seeds. Paper (SR, FID): each removal makes it worse, by 7.7%, "
                "7.8% and 12.8% on average over the tasks. KID is unbiased at this size, FID is not (beside it only).",
            ),
            ("table", _table(r["rows"], keys)),
            ("img", r["figure"]),
        ]
    if "table1" in results:
        r = results["table1"]
        keys = ["task", "method", "search", "kid", "kid_std", "kid_subset_std", "lpips_to_target_best_of_k"]
        keys += ["lpips_to_target_best_of_k_std", "fwv_0.2", "lpips_diversity", "fid", "paper_fid"]
        b += [
            ("h2", "CHIMLE Table 1 at CPU scale, equal compute"),
            (
                "p",
                f"Both methods train the same tower for the same {r.get('steps', sz.table1_steps)} steps on the same "
                "photos and batches, so their training compute is equal; cIMLE searches as many whole codes "
                "per image as CHIMLE's schedule costs in full-forward equivalents (`search`), so their search "
                f"compute is equal too. Mean and spread over {r['seeds']} seeds ({r['images']} held-out tiles, "
                f"{r.get('samples', sz.eval_samples)} samples each). kid_std: over seeds; kid_subset_std: over "
                "KID's subsets in one run. FID is biased with fewer images than 2,048 features: shown beside the "
                "paper's (real datasets, 512 px) for orientation only. Paper: CHIMLE's FID is lower on every task.",
            ),
            ("table", _table(r["rows"], keys)),
        ]
        if "comparison" in r:
            keys = ["task", "kid_diff", "kid_z", "kid_verdict", "lpips_diff", "lpips_z", "lpips_verdict"]
            b += [
                (
                    "p",
                    "CHIMLE minus cIMLE (negative: CHIMLE better), in standard errors of the difference over "
                    "seeds (z); |z| > 2 is called a difference, anything less noise.",
                ),
                ("table", _table(r["comparison"], keys)),
                ("img", r["figure"]),
            ]
    if "digits" in results:
        b += digit_blocks(results["digits"])
    b.append(("h2", "Time per part"))
    times = [{"part": k, "seconds": v["seconds"]} for k, v in results.items()]
    b.append(("table", _table(times, ["part", "seconds"])))
    return b


_DIGIT_METRICS = {
    "fid": "FID (classifier features)",
    "kid": "KID (classifier features)",
    "best_of_k": "pixel MSE, best of K",
    "diversity": "pixel L2 between samples",
    "coverage": "mode coverage",
    "class_match": "samples of the digit's class",
    "input_mse": "MSE to the input, observed",
}


def _pm(row: dict, key: str) -> str:
    return f"{row[key]:.4g} +- {row[f'{key}_std']:.2g}"


def _verdicts(rows: list[dict]) -> str:
    """How many comparisons favour each side beyond |z| = 2, in words."""
    n = len(rows)
    win = {k: [f"{r['task']} {r['metric']}" for r in rows if r["better"] == k] for k in ("CHIMLE", "cIMLE")}
    text = f"of {n} comparisons, {len(win['CHIMLE'])} favour CHIMLE beyond |z| = 2"
    text += f" ({', '.join(win['CHIMLE'])})" if win["CHIMLE"] else ""
    text += f", {len(win['cIMLE'])} favour cIMLE" + (f" ({', '.join(win['cIMLE'])})" if win["cIMLE"] else "")
    return text + f", {n - len(win['CHIMLE']) - len(win['cIMLE'])} are within noise"


def digit_blocks(r: dict) -> list[tuple[str, Any]]:
    """The digits part's section: setup, both normalisations of Table 1, the ladder and the sample figures;
    every number in its prose is read from `r` (`chimle.evaluation.digit_table.run`'s result)."""
    sz, info = r["sizes"], r["info"]
    setup = "; ".join(
        f"{i['task']} on {i['data']} ({i['train_digits']:,} train / {i['test_digits']:,} test digits from "
        f"{i['source']}, {i['split']}): CHIMLE's schedule costs {i['chimle_cost']:.2f} full-forward equivalents, "
        f"so cIMLE draws {i['m_compute']} whole codes at equal compute and {i['m_samples']} at equal samples; "
        f"{i['ambiguous_found']} ambiguous test inputs, {i['ambiguous_used']} used"
        for i in info
    )
    accuracy = ", ".join(dict.fromkeys(f"{i['data']} {100 * i['classifier_accuracy']:.1f}%" for i in info))
    b: list[tuple[str, Any]] = [
        ("h2", "Digits: where the search pays"),
        (
            "p",
            f"The `chimle mnist` tower (preset {sz['preset']}: 3 levels at 7, 14 and 28 px), pixel L2 in the search "
            f"and the loss, trained {sz['steps']} steps (pool {sz['pool']}, {sz['steps_per_round']} steps a round, "
            f"batch {sz['batch']}) with CHIMLE's m = {','.join(map(str, sz['schedule']))} or flat cIMLE; the same "
            f"seed gives every method the same initial weights, pools and batches; {sz['seeds']} seeds. {setup}.",
        ),
        (
            "p",
            f"Scores on {sz['eval_inputs']} test digits x {sz['samples']} samples (K): FID and KID on the "
            f"penultimate features of a classifier trained on the training digits (test accuracy: {accuracy}); "
            "the pixel MSE of the best of K samples; pixel diversity (mean L2 between two samples of one input); "
            f"mode coverage: on test inputs whose two likeliest classes both get p >= 0.2 from the classifier, "
            f"the fraction of those two classes found among K samples; class_match: samples classified as their "
            "digit; input_mse: how far a sample, degraded again, is from its input.",
        ),
        ("table", _table(r["summary"], ["data", "task", "method", "seeds", *_DIGIT_METRICS])),
    ]
    keys = ["data", "task", "metric", "chimle", "chimle_std", "cimle", "cimle_std", "diff", "z", "paired_z", "better"]
    for name, what in (("equal_compute", "equal compute"), ("equal_samples", "equal samples")):
        b += [
            (
                "p",
                f"CHIMLE minus cIMLE at {what} (negative: lower for CHIMLE); z over the seeds' spread as in Table 1, "
                f"paired_z over the per-seed differences (matched seeds); {_verdicts(r[name])}.",
            ),
            ("table", _table(r[name], keys)),
        ]
    if r["ladder"]:
        lad = r["ladder"]
        rows = [{"rung": x["rung"], **{k: _pm(x, k) for k in _DIGIT_METRICS}} for x in lad]
        zs = ", ".join(f"{x['rung']} {x['best_of_k_z']:+.2f}" for x in lad[1:])
        b += [
            (
                "p",
                f"CHIMLE Fig. 7's ladder on {lad[0]['task']} ({lad[0]['data']}), mean +- spread over "
                f"{lad[0]['seeds']} seeds; no_ic_pe_cd is the equal-samples cIMLE tower (the same search). Best-of-K "
                f"MSE against full, in z: {zs}.",
            ),
            ("table", _table(rows, ["rung", *_DIGIT_METRICS])),
        ]
    b.append(("p", "CHIMLE (left) and cIMLE at equal compute (right), seed 0, on ambiguous test inputs:"))
    b += [("img", f) for f in r["figures"]]
    return b


def write_report(out: Path, blocks: list[tuple[str, Any]]) -> tuple[Path, Path]:
    md, body = [], []
    for kind, v in blocks:
        if kind in ("h1", "h2"):
            md += ["#" * int(kind[1]) + " " + v, ""]
            body.append(f"<{kind}>{html.escape(v)}</{kind}>")
        elif kind == "p":
            md += [v, ""]
            body.append(f"<p>{html.escape(v)}</p>")
        elif kind == "table":
            md += [*v, ""]
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in v if "---" not in line]
            rows = "".join(
                "<tr>" + "".join(f"<{t}>{html.escape(c)}</{t}>" for c in r) + "</tr>"
                for t, r in (("th" if i == 0 else "td", r) for i, r in enumerate(cells))
            )
            body.append(f"<table>{rows}</table>")
        elif kind == "img":
            md += [f"![{v}]({v})", ""]
            data = base64.b64encode((out / v).read_bytes()).decode() if (out / v).exists() else ""
            body.append(f'<p><img alt="{html.escape(v)}" src="data:image/png;base64,{data}"></p>')
    (out / "report.md").write_text("\n".join(md))
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 6px}"
    (out / "report.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>chimle report</title><style>{style}</style>{''.join(body)}"
    )
    return out / "report.md", out / "report.html"


def run(
    out: str | Path,
    sizes: Sizes = FULL,
    parts: tuple[str, ...] = tuple(PARTS),
    resume: bool = False,
    quick: bool = False,
) -> dict:
    """Run the `parts` (reusing finished ones with `resume`) and write the report; returns the results."""
    global _bar
    out = Path(out)
    dirs = _split(out) if set(parts) & set(PARTS) else ()  # the digits part needs no photos
    results: dict[str, dict] = {}
    for name in parts:
        done = out / name / "result.json"
        if resume and done.exists():
            results[name] = json.loads(done.read_text())
            continue
        t0 = time.time()
        with tqdm(total=_units(name, sizes), desc=f"reproduce {name}", unit="run", dynamic_ncols=True) as _bar:
            r = {**PARTS, **EXTRA_PARTS}[name](out / name, sizes, dirs)
        _bar = None
        r["seconds"] = round(time.time() - t0, 1)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(r, indent=1, default=float))
        results[name] = r
        write_report(out, report_blocks(results, sizes, quick))
    write_report(out, report_blocks(results, sizes, quick))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chimle reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="report", help="folder of the report and every run it trains")
    p.add_argument("--quick", action="store_true", help="tiny towers, few steps and seeds (minutes)")
    p.add_argument("--resume", action="store_true", help="reuse finished parts and resume unfinished runs")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (the default), or {','.join(EXTRA_PARTS)}",
    )
    p.add_argument("--mnist", help="MNIST digits for the mnist part (default: as `chimle mnist` finds them)")
    p.add_argument(
        "--digit-data",
        help="comma-separated datasets of the digits part, names or folders (default: mnist), e.g. mnist,fashion-mnist",
    )
    add_threads_argument(p)
    a = p.parse_args(argv)
    parts = tuple(x for x in a.parts.split(",") if x)
    if unknown := [x for x in parts if x not in {**PARTS, **EXTRA_PARTS}]:
        p.error(f"unknown part(s) {unknown}; choose from {list({**PARTS, **EXTRA_PARTS})}")
    if not a.quick:
        print(
            "reproduce: the full report trains 40 towers, which takes hours on a CPU (--quick: minutes)",
            file=sys.stderr,
        )
    if a.mnist:
        os.environ["CHIMLE_MNIST"] = a.mnist  # where `chimle mnist` looks first
    sizes = QUICK if a.quick else FULL
    if a.digit_data:
        sizes = replace(sizes, digits=replace(sizes.digits, data=tuple(x for x in a.digit_data.split(",") if x)))
    with use_threads(a.threads):
        run(a.out, sizes, parts, resume=a.resume, quick=a.quick)
    print(f"report: {Path(a.out) / 'report.md'} and report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
