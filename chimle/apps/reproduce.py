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
  photos      (only when asked: `--parts photos`, many hours on a CPU: use --resume) Table 1 where level 1
              works at 64 px: 8x SR on 256 px crops of the photo corpus (`data: photos`), CHIMLE against
              cIMLE at equal compute over 3 seeds, on scikit-image's photos cut into 128 px tiles
              (`chimle.evaluation.photo_table`).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist, or env
CHIMLE_FASHION_MNIST); without it the factors part leaves that row out and says so.

Data: scikit-image's photos; astronaut, coffee, motorcycle_left and motorcycle_right train, chelsea and
rocket are held out (cut into tiles for the metrics). Every part writes PART/result.json when it
finishes, and report.md / report.html (figures inline) are written from those after every part, so
an interrupted run keeps what it finished and `--resume` skips it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..data.digits import find_named
from ..data.imageio import builtin_photo_dir, load_image, pyplot, save_figure, save_tiles
from ..data.tasks import make_task
from ..distances import make_distance
from ..evaluation import cpu_report, digit_table, photo_table
from ..evaluation import mnist_illustration as fig1
from ..evaluation.ablation import AblationOptions, over_seeds, plot_ablation, run_ablation
from ..evaluation.efficiency import EfficiencyOptions, level_diagnostics, run_efficiency, sample_efficiency
from ..evaluation.held_out import evaluate_tower, held_out_crops
from ..evaluation.report import write_report
from ..evaluation.stats import VERDICT_Z, mean_std, z_of_means
from ..inference.weights import load_with_task
from ..search import level_costs, search_cost
from ..training.config import load_config
from ..training.trainer import Trainer, train_or_reuse

__all__ = ["cmd_reproduce", "run_report", "report_blocks", "Sizes", "Data", "QUICK", "FULL", "PARTS", "EXTRA_PARTS"]

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
    photos: photo_table.PhotoSizes = photo_table.PhotoSizes()  # the photos part


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
    photos=photo_table.QUICK,
)


@dataclass(frozen=True)
class Data:
    """Where the parts read: the photos `_split` makes (train, held out, held-out tiles) and the MNIST digits."""

    train: Path = Path()
    held_out: Path = Path()
    tiles: Path = Path()
    mnist: str | Path | None = None  # None: as `chimle mnist` finds them (`chimle.data.digits.find_data`)


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
    return train_or_reuse(load_config(base=base), quiet=True)


def _mnist_recipe(sz: Sizes) -> tuple[fig1.Recipe, fig1.Counts]:
    return fig1.Recipe(steps=sz.mnist_steps, pool=sz.mnist_pool), fig1.Counts(eval_inputs=sz.mnist_eval_inputs)


def part_mnist(out: Path, sz: Sizes, data: Data) -> dict:
    m = fig1.run(out, *_mnist_recipe(sz), data=data.mnist, quiet=True)
    return {k: v for k, v in m.items() if isinstance(v, (int, float, list, str))}


def _sr_tower(root: Path, sz: Sizes, train_dir: Path) -> tuple[Trainer, dict[int, Path]]:
    """The efficiency part's SR tower, trained in stages with a snapshot of the weights after each (the
    training-length factor); one run, so the snapshots lie on one trajectory (no learning-rate schedule)."""
    snaps = {}
    for steps in tqdm(sorted({*sz.length_stages, sz.sr_steps}), desc="SR tower stages", unit="stage"):
        tr = _train(root, sz, "sr", steps, 0, train_dir)
        snap = root / "checkpoints" / f"step_{steps}.pt"
        if tr.step == steps and not snap.exists():  # a run trained past this stage has no snapshot of it
            shutil.copy(tr.checkpoint_path, snap)
        if snap.exists():
            snaps[steps] = snap
    return tr, snaps


def part_efficiency(out: Path, sz: Sizes, data: Data) -> dict:
    tr, _ = _sr_tower(out / "sr8", sz, data.train)
    options = EfficiencyOptions(seeds=sz.efficiency_seeds, budgets=sz.efficiency_budgets, schedules=[list(sz.schedule)])
    r = run_efficiency(tr.checkpoint_path, data.held_out, out, options, images=sz.efficiency_images, distance="alex")
    return {"rows": r["rows"], "figure": "efficiency/efficiency.png"}


def _curve(
    factor: str, setting: str, level1: int, model, x, y, distance, to_rgb, sz: Sizes, top: int = 0
) -> list[dict]:
    """The efficiency curve of one setting, compactly: per CHIMLE budget m <= `top` (and the schedule)
    the ratio in samples and at equal compute, with how well level 1's partial output predicts the
    final distance. cIMLE draws 8 x L x the largest m codes per image (a ratio up to ~8 is measured)."""
    budgets = [m for m in sz.factor_budgets if m <= (top or max(sz.factor_budgets))]
    levels = model.cfg.levels
    sched = [list(sz.schedule)] if len(sz.schedule) == levels and not top else []
    options = EfficiencyOptions(
        seeds=sz.factor_seeds, budgets=budgets, flat_max=8 * levels * max(budgets), schedules=sched
    )
    r = sample_efficiency(model, x, y, distance, options, to_rgb=to_rgb)
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
    x, y = held_out_crops(task, held, crop, model.cfg.levels, max(1, n // 2))
    lpips = make_distance("alex")
    return _curve(factor, setting, crop // 4, model, x[:n], y[:n], lpips, task.rgb, sz, top=4 if large else 0)


def _checkpoint_curve(
    factor: str, setting: str, checkpoint: Path | str, held: Path, crop: int, sz: Sizes
) -> list[dict]:
    model, task_cfg = load_with_task(checkpoint)
    return _sr_curve(factor, setting, model, make_task(**task_cfg), held, crop, sz)


def _digits_curve(setting: str, tower_out: Path, data: str | Path | None, sz: Sizes) -> list[dict]:
    """Pixel L2 (the distance the digit towers train with) on unseen digits of the `chimle mnist` split."""
    model, _ = load_with_task(tower_out / "checkpoints" / "last.pt")
    x, y = fig1.unseen_pairs(data, 4 * sz.factor_images)
    task = make_task("paired", in_channels=1, out_channels=1)
    return _curve("distance", setting, 7, model, x, y, make_distance("l2"), task.rgb, sz)


def _cached(path: Path, curve: Callable[[], list[dict]]) -> list[dict]:
    """One setting's rows, `curve()`, computed once (an interrupted factors part resumes setting by setting)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(curve(), default=float))
    return json.loads(path.read_text())


def part_factors(out: Path, sz: Sizes, data: Data) -> dict:
    rows: list[dict] = []
    notes: list[str] = []
    tr, snaps = _sr_tower(out.parent / "efficiency" / "sr8", sz, data.train)
    held, last = data.held_out, f"{sz.sr_steps} steps"

    def final(factor: str, setting: str) -> Callable[[], list[dict]]:  # the last snapshot, a panel's baseline
        return lambda: [r | {"factor": factor, "setting": setting} for r in rows if r["setting"] == last]

    def tanh() -> list[dict]:  # the authors' raw tanh between SR levels: the same recipe with feedback "tanh"
        t = _train(out / "sr8_tanh", sz, "sr", sz.sr_steps, 0, data.train, model={"feedback": "tanh"})
        return _sr_curve("tanh feedback", f"{sz.sr_steps} steps, tanh", t.model, t.task, held, sz.crop, sz)

    def digits(setting: str, tower: Path, digit_data: str | Path | None) -> Callable[[], list[dict]]:
        def curve() -> list[dict]:
            if tower != out.parent / "mnist":  # the mnist part's finished tower is taken as it is
                fig1.run_or_reuse(tower, *_mnist_recipe(sz), data=digit_data)
            return _digits_curve(setting, tower, digit_data, sz)

        return curve

    # (the file its rows are cached in or None, the rows), in the report's order; first training length,
    # snapshots of one run
    length = lambda s, p: lambda: _checkpoint_curve("training length", f"{s} steps", p, held, sz.crop, sz)  # noqa: E731
    jobs: list[tuple[str | None, Callable[[], list[dict]]]] = [(f"length_{s}", length(s, p)) for s, p in snaps.items()]
    # resolution: the same tower on larger held-out crops, and the shipped model (trained 15,000 steps)
    jobs.append((None, final("resolution", f"{last}, {sz.crop} px")))
    jobs += [
        (f"resolution_{c}", lambda c=c: _sr_curve("resolution", f"{last}, {c} px", tr.model, tr.task, held, c, sz))
        for c in sz.resolution_crops[1:]
    ]
    jobs += [
        (f"shipped_{c}", lambda c=c: _checkpoint_curve("resolution", f"sr8-small, {c} px", "sr8-small", held, c, sz))
        for c in (sz.resolution_crops[0], sz.resolution_crops[-1])
    ]
    jobs += [(None, final("tanh feedback", f"{last}, image (chimle)")), ("tanh", tanh)]
    # pixel L2 on digits: the mnist part's tower (trained here if that part has not run), and Fashion-MNIST
    mnist_tower = out.parent / "mnist" if (out.parent / "mnist" / "metrics.json").exists() else out / "mnist"
    jobs.append(("mnist", digits("MNIST, pixel L2", mnist_tower, data.mnist)))
    try:
        fashion = find_named("fashion-mnist")
        jobs.append(("fashion", digits("Fashion-MNIST, pixel L2", out / "fashion", fashion)))
    except FileNotFoundError as e:
        notes.append(f"Fashion-MNIST not found, left out: {e}")
    for name, job in tqdm(jobs, desc="reproduce factors", unit="setting"):
        rows += job() if name is None else _cached(out / "rows" / f"{name}.json", job)
    _plot_factors(rows, out / "factors.png")
    return {"rows": rows, "notes": notes, "figure": "factors/factors.png"}


def _plot_factors(rows: list[dict], path: Path) -> None:
    """ratio_compute against m for every setting, one panel per factor (uniform budgets only)."""
    plt = pyplot()
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["factor"] == factor):
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


def part_ablation(out: Path, sz: Sizes, data: Data) -> dict:
    per_seed = []
    for seed in tqdm(range(sz.ablation_seeds), desc="reproduce ablation", unit="seed"):
        options = AblationOptions(
            steps=sz.ablation_steps,
            preset=sz.preset,
            crop=sz.crop,
            samples=sz.eval_samples,
            crops_per_image=sz.ablation_crops,
            overrides=(f"train.seed={seed}", "model.blocks=1", f"train.pool_size={sz.pool}"),
        )
        per_seed.append(run_ablation(data.train, data.held_out, out / f"seed{seed}", options))
    rows = over_seeds(per_seed, ("kid", "fid", "lpips_best_of_k", "lpips_mean"))
    for row, paper in zip(rows, PAPER_ABLATION_FID_SR):
        row["paper_fid_sr"] = paper
    panels = [("kid", "kid_std", "KID (ours, lower is better)")]
    panels += [("lpips_best_of_k", "lpips_best_of_k_std", "LPIPS to target, best of K (ours)")]
    panels += [("paper_fid_sr", None, "FID, paper (SR, Fig. 7)")]
    plot_ablation(rows, out / "ablation.png", panels)
    return {
        "rows": rows,
        "seeds": sz.ablation_seeds,
        "steps": sz.ablation_steps,
        "images": per_seed[0][0]["images"],
        "samples": per_seed[0][0]["samples"],
        "figure": "ablation/ablation.png",
    }


def part_table1(out: Path, sz: Sizes, data: Data) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {}  # (task, method) -> one evaluation per seed
    pairs = [(task, seed) for task in TASKS for seed in range(sz.table1_seeds)]
    for task, seed in tqdm(pairs, desc="reproduce table1", unit="pair"):
        chimle = _train(out / task / f"chimle_s{seed}", sz, task, sz.table1_steps, seed, data.train)
        # cIMLE at the search compute of CHIMLE's schedule (full-forward equivalents, FLOPs)
        costs = level_costs(chimle.model, chimle.input_hw, make_distance("alex"), chimle.task.rgb)
        m_flat = max(1, round(search_cost(costs, sz.schedule)))
        cimle = _train(
            out / task / f"cimle_s{seed}",
            sz,
            task,
            sz.table1_steps,
            seed,
            data.train,
            method="cimle",
            num_samples=m_flat,
        )
        for name, tr in (("chimle", chimle), ("cimle", cimle)):
            m = evaluate_tower(tr, data.tiles, sz.eval_samples, 64, sz.eval_images)
            runs.setdefault((task, name), []).append({**m, "m_flat": m_flat})
    rows = []
    for (task, name), evals in runs.items():
        row = {"task": task, "method": name, "search": _search_label(name, sz, evals[0]["m_flat"])}
        for key in ("kid", "fid", "lpips_to_target_best_of_k", "fwv_0.2", "lpips_diversity"):
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in evals])
        row["kid_subset_std"] = evals[0]["kid_std"]
        row["paper_fid"] = PAPER_TABLE1_FID[task][0 if name == "chimle" else 1]
        rows.append(row)
    by = {(r["task"], r["method"]): r for r in rows}
    plot_table1(by, out / "table1.png")
    return {
        "rows": rows,
        "comparison": [_compare(task, by[task, "chimle"], by[task, "cimle"], sz.table1_seeds) for task in TASKS],
        "seeds": sz.table1_seeds,
        "steps": sz.table1_steps,
        "images": rows and runs[TASKS[0], "chimle"][0]["images"],
        "samples": sz.eval_samples,
        "figure": "table1/table1.png",
    }


def _compare(task: str, a: dict, b: dict, n: int) -> dict:
    """CHIMLE (row `a`) minus cIMLE (`b`) on one task, for KID and LPIPS to the target: the difference of the
    means over `n` seeds in standard errors (`chimle.evaluation.stats.z_of_means`), and the verdict."""
    out: dict[str, Any] = {"task": task}
    for key, short in (("kid", "kid"), ("lpips_to_target_best_of_k", "lpips")):
        z = z_of_means(a[key], a[f"{key}_std"], b[key], b[f"{key}_std"], n)
        out[f"{short}_diff"], out[f"{short}_z"] = a[key] - b[key], z
        out[f"{short}_verdict"] = (
            "CHIMLE lower" if z < -VERDICT_Z else "cIMLE lower" if z > VERDICT_Z else "within noise"
        )
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


def _search_label(method: str, sz: Sizes, m_flat: int) -> str:
    return f"m = {','.join(map(str, sz.schedule))}" if method == "chimle" else f"{m_flat} whole codes"


def part_digits(out: Path, sz: Sizes, data: Data) -> dict:
    r = digit_table.run(out, sz.digits)
    r["figures"] = [f"digits/{f}" for f in r["figures"]]
    return r


def part_photos(out: Path, sz: Sizes, data: Data) -> dict:
    r = photo_table.run(out, sz.photos)
    r["figure"] = f"photos/{r['figure']}"
    return r


# The report's parts (run by default), and those that run only when named (`--parts digits,photos`).
PARTS: dict[str, Callable[[Path, Sizes, Data], dict]] = {
    "mnist": part_mnist,
    "efficiency": part_efficiency,
    "factors": part_factors,
    "ablation": part_ablation,
    "table1": part_table1,
}
EXTRA_PARTS: dict[str, Callable[[Path, Sizes, Data], dict]] = {"digits": part_digits, "photos": part_photos}


def run_report(
    out: str | Path,
    sizes: Sizes = FULL,
    parts: tuple[str, ...] = tuple(PARTS),
    resume: bool = False,
    quick: bool = False,
    mnist: str | Path | None = None,
) -> dict:
    """Run the `parts` (reusing finished ones with `resume`) and write the report; returns the results.
    mnist: the MNIST digits of the mnist and factors parts (None: as `chimle mnist` finds them)."""
    out = Path(out)
    data = Data(*_split(out), mnist=mnist) if set(parts) & set(PARTS) else Data(mnist=mnist)  # extra parts: their own
    results: dict[str, dict] = {}
    for name in parts:
        done = out / name / "result.json"
        if resume and done.exists():
            results[name] = json.loads(done.read_text())
            continue
        t0 = time.time()
        r = {**PARTS, **EXTRA_PARTS}[name](out / name, sizes, data)
        r["seconds"] = round(time.time() - t0, 1)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(r, indent=1, default=float))
        results[name] = r
        write_report(out, report_blocks(results, sizes, quick))
    write_report(out, report_blocks(results, sizes, quick))
    return results


def report_blocks(results: dict[str, dict], sz: Sizes, quick: bool) -> list:
    """The report of `results` (`chimle.evaluation.cpu_report`), with the command that makes it."""
    command = "chimle reproduce --out OUT" + (" --quick" if quick else "")
    if set(results) != set(PARTS):  # a partial report says which parts it holds
        command += f" --parts {','.join(results)}"
    return cpu_report.report_blocks(results, asdict(sz), command)


def cmd_reproduce(a: argparse.Namespace) -> int:
    """`chimle reproduce` (its options: `chimle.apps.cli`): run the parts asked for, then name the report."""
    parts = tuple(x for x in a.parts.split(",") if x)
    if unknown := [x for x in parts if x not in {**PARTS, **EXTRA_PARTS}]:
        raise ValueError(f"unknown part(s) {unknown}; choose from {list({**PARTS, **EXTRA_PARTS})}")
    if not a.quick:
        heavy = ["the report's parts train 40 towers, hours on a CPU"] if set(parts) & set(PARTS) else []
        if "photos" in parts:
            heavy.append("the photos part 6 towers on 256 px crops, about 7 hours on one core")
        if heavy:
            print(f"reproduce: {'; '.join(heavy)}; --resume goes on after a stop (--quick: minutes)", file=sys.stderr)
    sizes = QUICK if a.quick else FULL
    if a.digit_data:
        sizes = replace(sizes, digits=replace(sizes.digits, data=tuple(x for x in a.digit_data.split(",") if x)))
    run_report(a.out, sizes, parts, resume=a.resume, quick=a.quick, mnist=a.mnist)
    print(f"report: {Path(a.out) / 'report.md'} and report.html")
    return 0
