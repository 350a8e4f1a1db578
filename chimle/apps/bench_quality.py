"""Quality benchmarks: the sample-efficiency curve (CHIMLE Fig. 2) and the ablation ladder (Fig. 7).

    chimle bench efficiency CHECKPOINT --data DIR --out DIR [--seeds 10] [--images 8] [--budgets 1,2,4,8,16,32]
                            [--flat-max N]
    chimle bench ablation --data TRAIN_DIR --held-out DIR --out DIR [--steps 600] [--preset tiny]
                          [--samples 6] [--crops-per-image 8]
    python -m chimle.apps.bench_quality efficiency --help      # every option (the same commands)

`efficiency` measures, on held-out crops and a trained model, how many generated samples flat cIMLE
needs against hierarchical CHIMLE to reach each LPIPS distance, counting CHIMLE's work in samples and at
equal compute (full-forward equivalents) (see `chimle.evaluation.efficiency.sample_efficiency`).
`ablation` trains the same configuration four times (full CHIMLE, no IC, no IC+PE, no IC+PE+CD =
cIMLE with as many samples) on the same data, steps and seed, then reports FID and LPIPS to the
target on held-out crops, side by side, as a JSON, a Markdown table and a bar plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..data.imageio import atomic_write, pyplot, save_figure
from ..data.tasks import make_task
from ..distances.lpips import LPIPS
from ..evaluation import metrics
from ..evaluation.efficiency import BUDGETS, level_diagnostics, plot_efficiency, sample_efficiency
from ..evaluation.evaluate import write_markdown_table
from ..evaluation.inception import features
from ..inference.sample import generate
from ..inference.weights import load_with_task
from ..rng import Stream, seeded
from ..search import ABLATIONS
from ..threads import add_threads_argument, use_threads
from ..training.config import load_config
from ..training.trainer import train_or_reuse

__all__ = ["main", "fresh_metrics", "held_out_crops", "plot_ablation", "run_ablation", "run_efficiency"]


def fresh_metrics(path: Path, checkpoint: Path, **counts) -> dict | None:
    """The metrics saved at `path` if they were written after `checkpoint` (so on those weights) with the
    same `counts` (a count given as None matches any); None otherwise. Minutes of sampling and Inception
    per model on a CPU are not spent again when a report or an ablation is rerun."""
    if not (path.exists() and checkpoint.exists() and path.stat().st_mtime > checkpoint.stat().st_mtime):
        return None
    saved = json.loads(path.read_text())
    return saved if all(v is None or saved.get(k) == v for k, v in counts.items()) else None


def held_out_crops(task, folder: str | Path, crop: int, levels: int, crops_per_image: int, seed: int = 7):
    """Several deterministic random crops of each held-out photo (few photos -> more crops for FID)."""
    ds = ImageDataset(folder, task, crop=crop, levels=levels, train=True, seed=seed)
    items = []
    for e in range(crops_per_image):
        ds.set_epoch(e)
        items += [ds[i] for i in range(len(ds))]
    return torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items])


def run_efficiency(
    checkpoint: str,
    data: str,
    out: str,
    seeds: int = 10,
    images: int = 8,
    crop: int | None = None,
    device: str = "cpu",
    budgets: list[int] | None = None,
    flat_max: int | None = None,
    distance: str = "vgg",
    schedules: list[list[int]] | None = None,
) -> dict:
    model, task_cfg = load_with_task(checkpoint, device)
    task = make_task(**task_cfg)
    crop = crop or model.cfg.input_size * task.scale
    x, y = held_out_crops(task, data, crop, model.cfg.levels, max(1, images // 2))
    x, y = x[:images].to(device), y[:images].to(device)
    to_rgb = task.rgb
    lpips = LPIPS(distance).to(device)
    result = sample_efficiency(
        model,
        x,
        y,
        lpips,
        seeds=seeds,
        to_rgb=to_rgb,
        budgets=budgets or BUDGETS,
        flat_max=flat_max,
        schedules=schedules or [],
    )
    result["level_diagnostics"] = level_diagnostics(model, x, y, lpips, to_rgb=to_rgb)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "efficiency.json").write_text(json.dumps(result, indent=2, default=float))
    plot_efficiency(result, out_dir / "efficiency.png")
    write_markdown_table(result["rows"], out_dir / "efficiency.md")
    write_markdown_table(result["level_diagnostics"], out_dir / "levels.md")
    print((out_dir / "efficiency.md").read_text())
    print("per level (only that level's component redrawn):")
    print((out_dir / "levels.md").read_text())
    return result


def run_ablation(
    data: str,
    held_out: str,
    out: str,
    steps: int = 600,
    preset: str = "tiny",
    task: str = "sr",
    scale: int = 8,
    crop: int = 64,
    samples: int = 6,
    crops_per_image: int = 8,
    overrides: list[str] | None = None,
    device: str = "cpu",
) -> list[dict]:
    out_dir = Path(out)
    rows = []
    held: dict[str, torch.Tensor] = {}  # the held-out crops and their Inception features: the same for every rung
    for rung in ABLATIONS:
        cfg = load_config(
            overrides=overrides or [],
            base={
                "name": rung,
                "out": str(out_dir / rung),
                "preset": preset,
                "data.task": task,
                "data.scale": scale,
                "data.crop": crop,
                "data.data": data,
                "search.ablation": rung,
                "train.steps": steps,
                "train.device": device,
                "train.sample_every": 0,
            },
        )
        trainer = train_or_reuse(cfg)  # a rerun reuses finished rungs, resumes an interrupted one
        # ... and their metrics, when measured on these weights with the same held-out set and counts
        saved = trainer.out / "eval" / "ablation.json"
        counts = {
            "held_out": str(Path(held_out).resolve()),
            "crop": crop,
            "crops_per_image": crops_per_image,
            "samples": samples,
        }
        if (cached := fresh_metrics(saved, trainer.checkpoint_path, **counts)) is not None:
            rows.append(cached["row"])
            continue
        if not held:
            x, y = held_out_crops(trainer.task, held_out, crop, trainer.model_cfg.levels, crops_per_image)
            held |= {"x": x, "y": y, "features": features(y, device=trainer.device)}
        x, y = held["x"], held["y"]
        g = seeded(0, Stream.ABLATION, device=trainer.device)  # on the model's device, as generate draws there
        fake = generate(trainer.model, x.to(trainer.device), samples, g, task=trainer.task).cpu()
        with torch.no_grad():
            d = torch.stack(
                [trainer.distance(fake[k].to(trainer.device), y.to(trainer.device)).cpu() for k in range(samples)]
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
                "samples": samples,
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
    print((out_dir / "ablation.md").read_text())
    return rows


def plot_ablation(rows: list[dict], path: Path, panels: list[tuple[str, str | None, str]]) -> None:
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


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chimle bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    e = sub.add_parser("efficiency", help="samples needed by cIMLE vs CHIMLE to reach each LPIPS distance")
    e.add_argument("checkpoint")
    e.add_argument("--data", required=True, help="folder of held-out photos")
    e.add_argument("--out", required=True)
    e.add_argument("--seeds", type=int, default=10)
    e.add_argument("--images", type=int, default=8)
    e.add_argument("--crop", type=int, default=None)
    e.add_argument("--device", default="cpu")
    add_threads_argument(e)
    e.add_argument(
        "--budgets",
        type=_ints,
        default=None,
        metavar="M1,M2,...",
        help="CHIMLE candidates per level (default 1,2,4,8,16,32)",
    )
    e.add_argument("--flat-max", type=int, default=None, help="cIMLE codes per image (default 16 * L * max budget)")
    e.add_argument("--distance", choices=["vgg", "alex"], default="vgg", help="LPIPS backbone (papers: vgg)")
    e.add_argument(
        "--schedule",
        type=_ints,
        action="append",
        default=[],
        metavar="M1,...,ML",
        help="a non-uniform CHIMLE schedule, one count per level (repeatable), e.g. the paper's shape 64,16,4",
    )
    a = sub.add_parser("ablation", help="train full / no IC / no IC+PE / no IC+PE+CD and compare")
    a.add_argument("--data", required=True, help="folder of training photos ('builtin' allowed)")
    a.add_argument("--held-out", required=True, help="folder of held-out photos")
    a.add_argument("--out", required=True)
    a.add_argument("--steps", type=int, default=600)
    a.add_argument("--preset", default="tiny")
    a.add_argument("--task", default="sr")
    a.add_argument("--scale", type=int, default=8)
    a.add_argument("--crop", type=int, default=64)
    a.add_argument("--device", default="cpu")
    add_threads_argument(a)
    a.add_argument("--samples", type=int, default=6, help="samples per held-out crop")
    a.add_argument("--crops-per-image", type=int, default=8, help="held-out crops per photo")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    with use_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.which == "efficiency":
        run_efficiency(
            args.checkpoint,
            args.data,
            args.out,
            args.seeds,
            args.images,
            args.crop,
            args.device,
            args.budgets,
            args.flat_max,
            args.distance,
            args.schedule,
        )
    else:
        run_ablation(
            args.data,
            args.held_out,
            args.out,
            args.steps,
            args.preset,
            args.task,
            args.scale,
            args.crop,
            samples=args.samples,
            crops_per_image=args.crops_per_image,
            overrides=args.set,
            device=args.device,
        )
    return 0


if __name__ == "__main__":  # `python -m chimle.apps.bench_quality efficiency --help` shows every option
    raise SystemExit(main())
