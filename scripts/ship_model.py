"""Release a trained run as a shipped model: evaluate it on held-out photos, write its card, export it.

    python scripts/ship_model.py runs/sr8_small sr8-small --wall-minutes 64
    python scripts/ship_model.py runs/colorize_small colorize-small --wall-minutes 66

Held out: scikit-image's six photos (the shipped models train on Debian's wallpapers). They are cut
into non-overlapping tiles of `--tile` px (the KID needs more than six images) and every tile gets
`--num` samples; the card records KID (with its spread over subsets; FID beside it, biased at this
size), LPIPS to the target (best of K and mean), LPIPS diversity and the consistency with the input
(`chimle.evaluation.metrics.consistency`) on the tiles and on the whole photos, and the same figures for
the baseline that needs no model on the same tiles: bicubic upsampling for super-resolution, the grey
image (no chroma) for colourisation. Writes
chimle/weights/NAME.safetensors (the card in its metadata: `chimle models`), docs/models/NAME.json
and docs/models/NAME.png (input | samples | real crop, four held-out photos).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from chimle.data.dataset import ImageDataset
from chimle.data.imageio import builtin_photos, save_tiles
from chimle.data.tasks import Task, make_task
from chimle.evaluation import metrics
from chimle.evaluation.evaluate import EvalOptions, evaluate
from chimle.evaluation.inception import features
from chimle.evaluation.metrics import consistency
from chimle.inference.figures import save_grid
from chimle.inference.sample import generate
from chimle.inference.tiling import pad_to_tower
from chimle.inference.weights import export, load_with_task, model_card, shipped_dir
from chimle.rng import Stream, seeded

ROOT = Path(__file__).resolve().parent.parent
DATA = (
    "28 photos of Debian's mate-backgrounds and lomiri-wallpapers-16.04 (scripts/fetch_training_photos.sh), "
    "640 px on the long side, random 64 px crops"
)


def heldout_tiles(folder: Path, side: int) -> int:
    """Cut every held-out photo into non-overlapping side x side tiles; returns how many."""
    return sum(save_tiles(photo, folder, side, f"p{i}") for i, photo in enumerate(builtin_photos()))


def baseline(task: Task, tiles: Path, side: int) -> dict:
    """What needs no model, on the same held-out tiles: bicubic upsampling of the input (super-resolution)
    or the grey image, the input's lightness with no chroma (colourisation). One output per tile, so its
    best of K is its mean and its diversity 0."""
    ds = ImageDataset(tiles, task, crop=side, train=False)
    x, y = (torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("input", "target"))
    if task.name == "sr":
        out = torch.nn.functional.interpolate(x, size=y.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        name = "bicubic"
    elif task.name == "colorize":
        out, name = task.rgb(torch.full((len(x), 2, *x.shape[-2:]), 128 / 255), x), "grey (no chroma)"
    else:
        raise ValueError(f"no baseline for the {task.name!r} task")
    _, to_target = metrics.faithfulness_distances(out[None], y)
    kid, kid_std = metrics.kid(features(y), features(out), generator=seeded(0, Stream.KID))
    r = {"name": name, "kid": kid, "kid_std": kid_std, "lpips_to_target": float(to_target.mean())}
    r["consistency_mae"] = consistency(out[None], x, task.observe)["mae"]
    if task.name == "colorize":
        r["chroma_error"] = metrics.chroma_error(out[None], y)["mean"]
    return r


def whole_photos(model, task, num: int, max_side: int) -> dict:
    """Consistency of `num` samples of each whole held-out photo (downscaled to at most `max_side`)."""
    maes, shifts = [], []
    g = seeded(0, Stream.EVAL_SAMPLES)
    for photo in builtin_photos():
        h, w = photo.shape[-2:]
        f = min(1.0, max_side / max(h, w))
        s = task.scale * 2 ** (model.cfg.levels - 1)  # sizes every layout accepts
        size = (int(h * f) // s * s, int(w * f) // s * s)
        y = torch.nn.functional.interpolate(photo[None], size=size, mode="area")[0]
        x = task.degrade(y)[None]
        xp, _ = pad_to_tower(x, model)
        samples = generate(model, xp, num, g, task=task)[..., : size[0], : size[1]]
        c = consistency(samples, x, task.observe)
        maes.append(c["mae"])
        shifts.append(c["shift"])
    shift = [sum(v) / len(v) for v in zip(*shifts)]
    return {"mae": sum(maes) / len(maes), "shift": shift, "per_photo_mae": maes}


def card_grid(model, task, path: Path, side: int = 256, num: int = 5) -> None:
    """The card's picture: centre crops of four held-out photos, input | `num` samples | real crop."""
    ys = []
    for photo in builtin_photos()[:4]:
        h, w = photo.shape[-2:]
        ys.append(photo[:, (h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2])
    y = torch.stack(ys)
    x = task.degrade(y)
    samples = generate(model, x, num, seeded(1, Stream.EVAL_SAMPLES), task=task)
    save_grid(path, x, samples, y, task=task)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the run folder (holds checkpoints/last.pt and config.yaml)")
    ap.add_argument("name", help="the shipped name, e.g. sr8-small")
    ap.add_argument("--wall-minutes", type=float, required=True, help="the training's wall time (/usr/bin/time)")
    ap.add_argument("--hardware", default="CPU, one thread (OMP_NUM_THREADS=1) of a 2-core machine")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--num", type=int, default=10, help="samples per held-out tile")
    ap.add_argument("--config", help="the config file the card names (default configs/RUN.yaml)")
    ap.add_argument("--data", default=DATA, help="the card's description of the training photos")
    args = ap.parse_args()

    run = Path(args.run)
    ckpt = run / "checkpoints" / "last.pt"
    model, task_cfg = load_with_task(ckpt)
    task = make_task(**task_cfg)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tiles = heldout_tiles(Path(tmp), args.tile)
        r = evaluate(
            model,
            task,
            tmp,
            num_samples=args.num,
            out_dir=run / "heldout_eval",
            crop=args.tile,
            options=EvalOptions(ivo_runs=0),
        )
        base = baseline(task, Path(tmp), args.tile)
    whole = whole_photos(model, task, num=4, max_side=512)
    keys = ("kid", "kid_std", "fid", "lpips_to_target_best_of_k", "lpips_to_target_mean", "lpips_diversity")
    keys += tuple(k for k in r if k.startswith("chroma_"))
    options = ", ".join(f"{k}={v}" for k, v in task_cfg.items() if k != "name")
    card = {
        "summary": f"{task.name}{f' ({options})' if options else ''}, trained {args.wall_minutes:.0f} min on the CPU; "
        "held-out "
        f"consistency MAE {r['consistency_mae']:.4f} (tiles), {whole['mae']:.4f} (whole photos)",
        "data": args.data,
        "held_out": f"scikit-image's 6 photos: {tiles} tiles of {args.tile} px x {args.num} samples; whole photos "
        "(<= 512 px) x 4 samples",
        "config": args.config or f"configs/{run.name}.yaml",
        "wall_minutes": round(args.wall_minutes, 1),
        "hardware": args.hardware,
        "metrics": {k: r[k] for k in keys}
        | {"consistency_mae": r["consistency_mae"], "consistency_shift": r["consistency_shift"]},
        "whole_photo_consistency": whole,
        "baseline": base,
    }
    out = export(ckpt, shipped_dir() / f"{args.name}.safetensors", card=card)
    docs = ROOT / "docs" / "models"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{args.name}.json").write_text(json.dumps(card | {"step": model_card(out)["step"]}, indent=2) + "\n")
    card_grid(model, task, docs / f"{args.name}.png")
    print(json.dumps(card, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB)")


if __name__ == "__main__":
    main()
