"""CHIMLE against cIMLE on photos where level 1 works at 64 px: CHIMLE Table 1's 8x SR at equal compute.

    r = run("report/photos", PhotoSizes())   # trains every tower once; a rerun resumes or reuses them
    blocks = report_blocks(r)                 # the report's section (`chimle reproduce --parts photos`)

`chimle reproduce`'s table1 part trains on 64 px crops, so level 1 works at 8-16 px, where the report's
factors part finds that partial evaluation does not pay (level 1's distance barely predicts the final
one). Here the towers train on `crop` = 256 px crops (8x SR: 32 -> 256 px), so level 1 works at 64 px,
the setting where the factors part measures CHIMLE's search needing 1.8-2.7x less work than flat cIMLE
for the same distance. Per seed, the same tower (the same initial weights, pools and batches: all seeded
by the seed) trains for the same steps with:
  chimle  the hierarchical search with m_l = `schedule`;
  cimle   flat cIMLE with as many whole codes as CHIMLE's schedule costs in full-forward equivalents
          (`chimle.search.level_costs` / `search_cost`, as the table1 part).
Each tower is scored (`chimle.evaluation.evaluate`, no IvO) on scikit-image's photos, which the photo
corpus leaves out, cut into `tile` px tiles (128 px: the 79 tiles of the shipped models' cards): KID, FID,
LPIPS to the photo best of K, LPIPS diversity and consistency, mean and spread over seeds; CHIMLE minus
cIMLE in standard errors (z, `chimle.evaluation.stats`) and paired over the matched seeds (paired_z).

OUT/METHOD_sSEED is a training run (resumed when interrupted, reused when finished) with its scores in
eval/metrics.json (reused while newer than the checkpoint and made with the same counts) and its training
wall time in train_seconds.json. A tower whose folder another process holds (the same command in another
terminal) is left to it and taken up when free, so several processes share the work. OUT/tiles_TILEpx the
held-out tiles; OUT/result.json every per-seed row and the tables; OUT/photos.png the figure.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from ..data.imageio import (
    PHOTOS,
    atomic_write,
    builtin_photo_dir,
    list_images,
    load_image,
    photo_corpus_dir,
    pyplot,
    save_figure,
    save_tiles,
)
from ..distances import make_distance
from ..search import level_costs, search_cost
from ..training.config import Config, load_config
from ..training.faults import RunFolderBusy, locked
from ..training.trainer import Trainer, train_or_reuse
from .held_out import evaluate_tower
from .report import Block, table
from .stats import VERDICT_Z, compare, mean_std

__all__ = ["PhotoSizes", "QUICK", "METRICS", "METHODS", "run", "tower_config", "cut_tiles", "tables", "plot"]
__all__ += ["verdict", "report_blocks"]

K = TypeVar("K")
V = TypeVar("V")

# evaluate()'s key -> True where lower is better (LPIPS diversity: higher, as the papers read it)
METRICS: dict[str, bool] = {
    "kid": True,
    "fid": True,
    "lpips_to_target_best_of_k": True,
    "lpips_diversity": False,
    "consistency_mae": True,
}
METHODS = ("chimle", "cimle")


@dataclass(frozen=True)
class PhotoSizes:
    """How large the photo experiment runs."""

    crop: int = 256  # training crops: 8x SR from 32 to 256 px, so level 1 works at 64 px
    preset: str = "small"
    blocks: int = 1  # RRDBs per level (model.blocks): the report's towers
    input_skip: bool = True  # model.input_skip: the shipped models' heads, which correct the upsampled input
    steps: int = 1000
    seeds: int = 3
    schedule: tuple[int, ...] = (16, 8, 4)  # CHIMLE's m_l (the report's Table 1 schedule)
    pool: int = 64  # crops whose codes are searched each round
    steps_per_round: int = 100
    batch_size: int = 2
    lr: float = 2e-4
    search_batch: int = 16  # crops searched together
    distance: str = "alex"  # LPIPS in the search and the loss
    eval_samples: int = 10  # K samples per held-out tile
    tile: int = 128  # the held-out tiles' side
    eval_images: int | None = None  # held-out tiles scored (None: all)
    data: str = PHOTOS  # the training photos: the photo corpus (`data.data: photos`), or a folder


QUICK = PhotoSizes(
    crop=32,
    preset="tiny",
    steps=4,
    seeds=2,
    schedule=(3, 2, 2),
    pool=4,
    steps_per_round=2,
    search_batch=4,
    eval_samples=2,
    tile=32,
    eval_images=3,
)


def tower_config(out: Path, sz: PhotoSizes, data: str, seed: int, method: str, m_flat: int = 1) -> Config:
    """The training config of one tower; only the search differs between the methods."""
    search = {"search.method": "cimle", "search.num_samples": m_flat} if method == "cimle" else {}
    return load_config(
        base={
            "name": f"photos_{method}_s{seed}",
            "out": str(out),
            "preset": sz.preset,
            "model": {"blocks": sz.blocks, "input_skip": sz.input_skip},
            "data.task": "sr",
            "data.scale": 8,
            "data.crop": sz.crop,
            "data.data": data,
            # decoded on demand: the corpus in memory is ~1 GB a tower (float32), and only a round's pool reads it
            "data.cache": False,
            "search.distance": sz.distance,
            "search.samples_per_level": list(sz.schedule),
            "search.batch": sz.search_batch,
            "train.steps": sz.steps,
            "train.pool_size": sz.pool,
            "train.steps_per_round": sz.steps_per_round,
            "train.batch_size": sz.batch_size,
            "train.lr": sz.lr,
            "train.seed": seed,
            "train.sample_every": 0,
            # a checkpoint every round: an interruption loses at most one round of steps (minutes at 256 px)
            "train.checkpoint_every": sz.steps_per_round,
            "train.log_every": max(1, sz.steps_per_round // 4),
            **search,
        }
    )


def _timed_train(cfg: Config) -> tuple[Trainer, float]:
    """train_or_reuse(cfg) and the tower's training wall time over every session that trained it, kept in
    OUT/train_seconds.json (an interrupted session's time counts too; reusing a finished tower adds none:
    its "step" is where the last session that returned left the tower, 0 until one has)."""
    path = cfg.out_dir / "train_seconds.json"
    t0, trainer, busy = time.time(), None, False
    try:
        trainer = train_or_reuse(cfg, quiet=True)
    except RunFolderBusy:  # another process trains it: the time (and the record) is that process's
        busy = True
        raise
    finally:
        # read now, not before: another process may have finished the tower (and its record) meanwhile
        record = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "step": 0}
        if not busy and record["step"] < cfg.train.steps:  # this session may have trained: its time counts
            record["seconds"] += time.time() - t0
            record["step"] = trainer.step if trainer is not None else record["step"]
            data = json.dumps(record).encode()
            atomic_write(path, lambda f: f.write(data))
    return trainer, record["seconds"]


def _shared(keys: list[K], work: Callable[[K], V], bar: tqdm, wait: float = 60.0) -> dict[K, V]:
    """work(key) for every key, in order, the bar moving for each. A key whose run folder another process
    holds (RunFolderBusy: it is training or evaluating that tower) is left to it and retried every `wait`
    seconds after the others: so the same `--resume` line in several terminals works on several towers
    at once, and each process reuses what the others finished."""
    done: dict[K, V] = {}
    while True:
        for key in keys:
            if key not in done:
                try:
                    done[key] = work(key)
                    bar.update()
                except RunFolderBusy:
                    continue
        if len(done) == len(keys):
            return done
        bar.set_postfix_str(f"waiting for {len(keys) - len(done)} held by other processes")
        time.sleep(wait)


def _locked_eval(tr: Trainer, tiles: Path, sz: PhotoSizes, n_tiles: int) -> dict[str, Any]:
    """evaluate_tower under the tower's run-folder lock: one process evaluates it, the others reuse it."""
    with locked(tr.out):
        return evaluate_tower(tr, tiles, sz.eval_samples, sz.tile, n_tiles)


def cut_tiles(folder: Path, side: int) -> int:
    """scikit-image's photos (held out from the corpus) cut into side x side tiles in `folder`, once (a
    hidden marker says the cut is whole: an interrupted cut is redone); returns the number of tiles."""
    done = folder / ".complete"
    if not done.exists():
        for p in sorted(builtin_photo_dir().glob("*.png")):
            save_tiles(load_image(p), folder, side, p.stem)
        done.touch()
    return len(list_images(folder))


def run(
    out: str | Path, sz: PhotoSizes = PhotoSizes(), data: str | Path | None = None, tiles: str | Path | None = None
) -> dict[str, Any]:
    """Train and score every tower (resuming or reusing those already there, a progress bar over them);
    writes OUT/result.json and OUT/photos.png and returns the result.
    data: the training photos (None: sz.data; "photos" is the corpus of `scripts/fetch_photos.sh`).
    tiles: a folder of held-out tiles (None: scikit-image's photos cut into OUT/tiles_TILEpx)."""
    out = Path(out)
    t0 = time.time()
    data = str(data if data is not None else sz.data)
    # the corpus is checked now, not after the first tower's setup (its FileNotFoundError names the script)
    train_dir = photo_corpus_dir() if data == PHOTOS else Path(data)
    if tiles is None:
        tiles = out / f"tiles_{sz.tile}px"
        cut_tiles(tiles, sz.tile)
    tiles = Path(tiles)
    available = len(list_images(tiles))
    n_tiles = available if sz.eval_images is None else min(available, sz.eval_images)
    lpips = make_distance(sz.distance)
    # cIMLE at CHIMLE's search compute, in full-forward equivalents (FLOPs: the architecture's only, so one
    # untrained CHIMLE tower gives it for every seed; building it trains and writes nothing)
    probe = Trainer(tower_config(out / "chimle_s0", sz, data, 0, "chimle"), quiet=True)
    cost = search_cost(level_costs(probe.model, probe.input_hw, lpips, probe.task.rgb), sz.schedule)
    m_flat = max(1, round(cost))
    setup = {
        "chimle_cost": cost,
        "m_flat": m_flat,
        "input_px": probe.input_hw[0],
        "level_px": [h for h, _ in probe.model.cfg.output_sizes(*probe.input_hw)],
    }
    del probe
    # seed by seed, CHIMLE then cIMLE: an interrupted run has whole pairs, and a rerun goes on where it stopped
    keys = [(method, seed) for seed in range(sz.seeds) for method in METHODS]
    configs = {k: tower_config(out / f"{k[0]}_s{k[1]}", sz, data, k[1], k[0], m_flat) for k in keys}

    def tower(key: tuple[str, int]) -> tuple[Trainer, float, dict[str, Any]]:
        # trained then evaluated as one piece of work: a process waiting for a tower another process trains
        # evaluates the finished ones meanwhile, instead of idling until every tower is trained
        tr, seconds = _timed_train(configs[key])
        return tr, seconds, _locked_eval(tr, tiles, sz, n_tiles)

    bar = tqdm(total=len(keys), desc="photo towers (trained and evaluated)", unit="tower", dynamic_ncols=True)
    done = _shared(keys, tower, bar)
    runs = []
    for method, seed in keys:
        tr, seconds, m = done[method, seed]
        runs.append(
            {"method": method, "seed": seed, **{k: m[k] for k in METRICS}, "kid_subset_std": m["kid_std"]}
            | {"final_loss": tr.last.get("loss", math.nan), "train_seconds": seconds}
            | {"eval_seconds": m["seconds"], "images": m["images"]}
        )
    bar.close()
    tabled = tables(runs)
    plot(tabled["rows"], runs, out / "photos.png", setup["level_px"][0])
    train_s = sum(r["train_seconds"] for r in runs)
    result = {
        "sizes": asdict(sz),
        "data": data,
        "train_photos": len(list_images(train_dir)),
        "tiles": n_tiles,
        "tile": sz.tile,
        **setup,
        "runs": runs,
        **tabled,
        "train_hours": train_s / 3600,
        "eval_hours": sum(r["eval_seconds"] for r in runs) / 3600,
        "figure": "photos.png",
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _search_label(method: str, schedule: list[int] | tuple[int, ...], m_flat: int) -> str:
    return f"m = {','.join(map(str, schedule))}" if method == "chimle" else f"{m_flat} whole codes"


def tables(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """From the per-seed rows: each method's mean and spread over seeds (`rows`) and CHIMLE minus cIMLE per
    metric (`comparison`: diff, z, paired_z and which is better beyond |z| = VERDICT_Z)."""
    by = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in METHODS}
    rows = []
    for method, rs in by.items():
        row: dict[str, Any] = {"method": method, "seeds": len(rs)}
        for key in (*METRICS, "train_seconds"):
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in rs])
        rows.append(row)
    comparison = []
    for key, lower in METRICS.items():
        a, b = [r[key] for r in by["chimle"]], [r[key] for r in by["cimle"]]
        c = compare(a, b)
        better = "within noise" if abs(c["z"]) <= VERDICT_Z else "CHIMLE" if (c["diff"] < 0) == lower else "cIMLE"
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        comparison.append({"metric": key, "chimle": ma, "chimle_std": sa, "cimle": mb, "cimle_std": sb, **c})
        comparison[-1]["better"] = better
    return {"rows": rows, "comparison": comparison}


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, level1: int) -> Path:
    """KID and best-of-K LPIPS per method: the mean over seeds with its spread, and each seed as a dot
    (level1: the side of level 1's output, for the title)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    panels = (("kid", "KID"), ("lpips_to_target_best_of_k", "LPIPS to the photo, best of K"))
    for ax, (key, title) in zip(axes, panels):
        for i, (row, color) in enumerate(zip(rows, ("#4c72b0", "#dd8452"))):
            ax.bar(i, row[key], 0.6, yerr=row[f"{key}_std"], capsize=4, color=color, alpha=0.8)
            seeds = [r[key] for r in runs if r["method"] == row["method"]]
            ax.plot([i] * len(seeds), seeds, "k.", ms=5)
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
        ax.set_title(f"{title} (lower is better)", fontsize=9)
    fig.suptitle(f"8x SR, level 1 at {level1} px: mean and spread over seeds (dots: the seeds)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# The report's section

_NAMES = {
    "kid": "KID",
    "fid": "FID",
    "lpips_to_target_best_of_k": "LPIPS to the photo, best of K",
    "lpips_diversity": "LPIPS diversity",
    "consistency_mae": "consistency MAE",
}


def _pm(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.4g} +- {row[f'{key}_std']:.2g}"


def verdict(comparison: list[dict[str, Any]]) -> str:
    """How many metrics favour each method beyond |z| = VERDICT_Z, in words."""
    win = {k: [_NAMES[c["metric"]] for c in comparison if c["better"] == k] for k in ("CHIMLE", "cIMLE")}
    text = f"of {len(comparison)} metrics, {len(win['CHIMLE'])} favour CHIMLE beyond |z| = {VERDICT_Z:g}"
    text += f" ({', '.join(win['CHIMLE'])})" if win["CHIMLE"] else ""
    text += f", {len(win['cIMLE'])} favour cIMLE" + (f" ({', '.join(win['cIMLE'])})" if win["cIMLE"] else "")
    return text + f", {len(comparison) - len(win['CHIMLE']) - len(win['cIMLE'])} are within noise"


def report_blocks(r: dict[str, Any]) -> list[Block]:
    """The report's section on `run`'s result `r` (its figure at r["figure"]): the setup, the table, CHIMLE
    minus cIMLE with z and the verdict, and the time; every number in its prose is read from `r`."""
    sz, levels = r["sizes"], r["level_px"]
    schedule = ",".join(map(str, sz["schedule"]))
    rows = [
        {"method": x["method"], "search": _search_label(x["method"], sz["schedule"], r["m_flat"]), "seeds": x["seeds"]}
        | {_NAMES[k]: _pm(x, k) for k in METRICS}
        | {"training, min": x["train_seconds"] / 60}
        for x in r["rows"]
    ]
    keys = ["metric", "chimle", "chimle_std", "cimle", "cimle_std", "diff", "z", "paired_z", "better"]
    by = {x["method"]: x for x in r["rows"]}
    return [
        ("h2", "Table 1 where level 1 works at 64 px (photos)"),
        (
            "p",
            f"8x super-resolution trained on {sz['crop']} px crops ({r['input_px']} -> {sz['crop']} px; the levels "
            f"output {', '.join(map(str, levels))} px, so level 1 works at {levels[0]} px; the table1 part's towers: "
            f"8-16 px) of {r['train_photos']} photos ({r['data']}). The {sz['preset']} tower with "
            f"{sz['blocks']} RRDB per level{' and input_skip' if sz['input_skip'] else ''}, LPIPS-{sz['distance']} "
            f"in the search and the loss, {sz['steps']} steps (pool {sz['pool']}, {sz['steps_per_round']} steps a "
            f"round, batch {sz['batch_size']}, lr {sz['lr']:g}); the same seed gives both methods the same initial "
            f"weights, pools and batches; {sz['seeds']} seeds. CHIMLE's m_l = {schedule} costs "
            f"{r['chimle_cost']:.2f} full-forward equivalents, so cIMLE draws m_flat = {r['m_flat']} whole codes "
            "per crop at equal compute.",
        ),
        (
            "p",
            f"Scores on {r['tiles']} held-out tiles of {r['tile']} px (scikit-image's photos, which the corpus "
            f"leaves out) x {sz['eval_samples']} samples (K), mean +- spread over seeds: KID and FID on Inception "
            "features (FID biased with fewer images than its 2,048 features), LPIPS to the photo of the best of K "
            "samples, LPIPS diversity (between two samples of one input; higher is more diverse) and consistency "
            "(how far a sample, downscaled again, is from its input).",
        ),
        ("table", table(rows, ["method", "search", "seeds", *_NAMES.values(), "training, min"])),
        (
            "p",
            "CHIMLE minus cIMLE (negative: lower for CHIMLE); z over the seeds' spread (standard errors of the "
            "difference of the means), paired_z over the per-seed differences (matched seeds); "
            f"{verdict(r['comparison'])}.",
        ),
        ("table", table(r["comparison"], keys)),
        (
            "p",
            f"Time: the {2 * sz['seeds']} towers trained {r['train_hours']:.2f} h in all "
            f"(CHIMLE {by['chimle']['train_seconds'] / 60:.1f} min a tower, cIMLE "
            f"{by['cimle']['train_seconds'] / 60:.1f} min, on average), the evaluations "
            f"{60 * r['eval_hours']:.1f} min; "
            f"this run of the part {r['seconds']:.0f} s (finished towers and evaluations are reused).",
        ),
        ("img", r["figure"]),
    ]
