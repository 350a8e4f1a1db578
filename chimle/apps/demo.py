"""`chimle demo`: train a small tower on photos that ship with scikit-image, then sample.

8x super-resolution (8 px -> 64 px crops), CHIMLE search with LPIPS, on the CPU in a few
minutes. Training uses five of the bundled photos; the grid shows crops of the sixth, which the
model never saw: input | 6 samples | the real image. Every sample is a different plausible
high-resolution image for the same input, and each keeps the input's colours: the tower's levels
correct their upsampled input (`model.input_skip`, README "Shipped models"); the demo prints the
consistency of the grid's samples (`chimle.evaluation.metrics.consistency`) and writes it to
demo_consistency.json.

    chimle demo --out runs/demo          # prints the path of the grid
    chimle demo --task layout            # scene layouts: stand-in label maps -> photos (cIMLE Sect. 4.2)
    chimle demo --resume                 # after Ctrl-C: go on from runs/demo/checkpoints/last.pt

`chimle demo --task layout` makes STAND-IN layouts, not real segmentations: one k-means of the pixel
colours of all the photos (so class k is the same colour cluster in every image), assigned on blocks of
4 x 4 px so that the maps look like coarse layouts. It trains a small tower with cIMLE's noise encoder,
dataset and loss rebalancing and the VGG feature L1 distance on them, and grids a held-out photo's
layouts: layout | 6 samples | the real photo.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.dataset import ImageDataset
from ..data.imageio import builtin_photo_dir, load_image, save_image
from ..evaluation.metrics import consistency, kmeans
from ..inference.figures import save_grid
from ..inference.sample import generate
from ..resample import resize
from ..rng import Stream, seeded
from ..training.config import load_config
from ..training.trainer import Trainer

__all__ = ["run_demo", "run_layout_demo", "make_stand_in_layouts", "cmd_demo"]

HELD_OUT = "chelsea"  # the cat: never trained on, shown in the grid


def demo_config(out: str | Path, steps: int | None = None, device: str = "auto"):
    return load_config(
        base={
            "name": "demo",
            "out": str(out),
            "preset": "small",
            "model": {"blocks": 1, "input_skip": True},
            "data.task": "sr",
            "data.scale": 8,
            "data.crop": 64,
            "data.data": str(Path(out) / "photos" / "train"),
            "data.val_data": str(Path(out) / "photos" / "held_out"),
            "search.method": "chimle",
            "search.samples_per_level": [16, 8, 4],
            "search.distance": "alex",
            "search.batch": 32,
            "train.steps": steps or 2500,
            "train.pool_size": 96,
            "train.steps_per_round": 200,
            "train.batch_size": 4,
            "train.lr": 2e-4,
            "train.checkpoint_every": 500,
            "train.sample_every": 0,
            "train.grid_inputs": 4,
            "train.grid_samples": 6,
            "train.device": device,
            "train.log_every": 10,
        }
    )


LAYOUT_CLASSES = 8  # colour clusters of the stand-in layouts
LAYOUT_SIDE = 192  # photos are downscaled to this short side before the layouts are made


def make_stand_in_layouts(out: Path, k: int = LAYOUT_CLASSES, block: int = 4, seed: int = 0) -> None:
    """out/{labels,photos}/{train,held_out}/NAME.png from the bundled photos: each photo downscaled to a
    LAYOUT_SIDE short side, and its label map: the nearest of k colour centres (one k-means over all
    photos' pixels) of every block x block mean colour, so class k means the same colours everywhere;
    out/palette.txt gives each class its centre's colour for display."""
    photos = {}
    for p in sorted(builtin_photo_dir().iterdir()):
        y = load_image(p)
        h, w = y.shape[-2:]
        f = LAYOUT_SIDE / min(h, w)
        size = (round(h * f) // block * block, round(w * f) // block * block)
        photos[p.stem] = resize(y, size)
    means = {n: torch.nn.functional.avg_pool2d(y[None], block)[0] for n, y in photos.items()}
    pixels = torch.cat([m.flatten(1).T for m in means.values()]).double().numpy()
    rng = np.random.default_rng(seed)
    fit = pixels[rng.choice(len(pixels), min(len(pixels), 20000), replace=False)]
    labels = kmeans(fit, k, rng)
    centres = torch.from_numpy(np.stack([fit[labels == c].mean(0) for c in range(k)]))
    # The palette file shows class k in its cluster's colour in the grids (the maps themselves hold ids).
    (out / "palette.txt").parent.mkdir(parents=True, exist_ok=True)
    rgb = (centres * 255).round().long().tolist()
    (out / "palette.txt").write_text("".join(f"{k} {r} {g} {b}\n" for k, (r, g, b) in enumerate(rgb)))
    for name, y in photos.items():
        sub = "held_out" if name == HELD_OUT else "train"
        m = means[name].double()
        ids = torch.cdist(m.flatten(1).T, centres).argmin(1).view(m.shape[-2:])
        ids = ids.repeat_interleave(block, 0).repeat_interleave(block, 1)
        for kind in ("labels", "photos"):
            (out / kind / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids.numpy().astype(np.uint8), mode="L").save(out / "labels" / sub / f"{name}.png")
        save_image(y, out / "photos" / sub / f"{name}.png")


def layout_demo_config(out: str | Path, steps: int | None = None, device: str = "auto"):
    out = Path(out)
    return load_config(
        base={
            "name": "demo_layout",
            "out": str(out),
            "preset": "small",
            "model": {"blocks": 1, "noise_encoder": True},
            "data.task": "layout",
            "data.num_classes": LAYOUT_CLASSES,
            "data.palette": str(out / "palette.txt"),
            "data.data": str(out / "labels" / "train"),
            "data.target": str(out / "photos" / "train"),
            "data.crop": 64,
            "data.rebalance": True,
            "search.method": "chimle",
            "search.samples_per_level": [16, 8, 4],
            "search.distance": "vgg_l1",
            "search.batch": 32,
            "train.loss_rebalance": True,
            "train.steps": steps or 1000,
            "train.pool_size": 64,
            "train.steps_per_round": 250,
            "train.batch_size": 4,
            "train.lr": 2e-4,
            "train.checkpoint_every": 500,
            "train.sample_every": 0,
            "train.device": device,
            "train.log_every": 10,
        }
    )


def run_layout_demo(
    out: str | Path = "runs/demo_layout", steps: int | None = None, device: str = "auto", resume: bool = False
) -> Path:
    """Train the scene-layout tower on stand-in layouts and grid the held-out photo's; returns the grid.
    resume: go on from out/checkpoints/last.pt (a run stopped with Ctrl-C), as `chimle train --resume`."""
    out = Path(out)
    make_stand_in_layouts(out)  # deterministic (k-means seeded): a resumed run trains on the same layouts
    trainer = Trainer(layout_demo_config(out, steps, device), resume=resume)
    trainer.run()
    held = ImageDataset(
        out / "photos" / "held_out",
        trainer.task,
        crop=64,
        levels=trainer.model_cfg.levels,
        train=True,
        seed=123,
        input_root=out / "labels" / "held_out",
    )
    grid = out / "demo_layout_grid.png"
    _held_out_grid(trainer, held, grid)
    return grid


def _held_out_grid(trainer: Trainer, held: ImageDataset, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Four random crops of the held-out photo (its centre crop alone would show one patch), six samples
    of each: input | samples | the real crop, written to `path`. Returns (inputs, samples) on the CPU."""
    items = []
    for e in range(4):
        held.set_epoch(e)
        items.append(held[0])
    x = torch.stack([it["input"] for it in items]).to(trainer.device)
    y = torch.stack([it["target"] for it in items])
    samples = generate(trainer.model, x, 6, seeded(0, Stream.DEMO, device=trainer.device), task=trainer.task).cpu()
    save_grid(path, x.cpu(), samples, y, task=trainer.task)
    return x.cpu(), samples


def _split_photos(out: Path) -> None:
    src = builtin_photo_dir()
    for sub in ("train", "held_out"):
        (out / "photos" / sub).mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        dst = out / "photos" / ("held_out" if p.stem == HELD_OUT else "train") / p.name
        if not dst.exists():
            shutil.copy(p, dst)


def run_demo(
    out: str | Path = "runs/demo", steps: int | None = None, device: str = "auto", resume: bool = False
) -> tuple[Path, dict]:
    """Train the demo tower and write the held-out sample grid; returns the grid's path and the
    consistency of its samples with their inputs. resume: go on from out/checkpoints/last.pt (a run
    stopped with Ctrl-C), as `chimle train --resume`."""
    out = Path(out)
    _split_photos(out)
    cfg = demo_config(out, steps, device)
    trainer = Trainer(cfg, resume=resume)
    trainer.run()
    held = ImageDataset(
        out / "photos" / "held_out", trainer.task, crop=cfg.data.crop, levels=trainer.model_cfg.levels, seed=123
    )
    grid = out / "demo_grid.png"
    x, samples = _held_out_grid(trainer, held, grid)
    c = consistency(samples, x, trainer.task.observe)
    (out / "demo_consistency.json").write_text(json.dumps(c, indent=2))
    return grid, c


def cmd_demo(a: argparse.Namespace) -> int:
    """`chimle demo`: train, print the grid's path (and, for sr, the samples' consistency with their inputs)."""
    try:
        if a.task == "layout":
            grid = run_layout_demo(a.out or "runs/demo_layout", steps=a.steps, device=a.device, resume=a.resume)
            print(f"demo grid: {grid}")
            return 0
        grid, c = run_demo(a.out or "runs/demo", steps=a.steps, device=a.device, resume=a.resume)
    except KeyboardInterrupt as e:  # the trainer saved its steps and says "go on with --resume": say the command
        raise KeyboardInterrupt(_demo_resume_note(str(e), a)) from None
    print(f"demo grid: {grid}")
    shift = ", ".join(f"{v:+.3f}" for v in c["shift"])
    print(f"consistency with the inputs: mean abs error {c['mae']:.3f}, mean shift per channel (R, G, B) {shift}")
    return 0


def _demo_resume_note(msg: str, a: argparse.Namespace) -> str:
    """The trainer's Ctrl-C message with the `chimle demo` command that goes on from its checkpoint (the
    same --task, --out, --steps and --device: the run's folder and config must match)."""
    if not msg or "no checkpoint was written yet" in msg:
        return msg
    again = ["chimle demo", *(["--task", a.task] if a.task != "sr" else [])]
    again += [*(["--out", a.out] if a.out else []), *(["--steps", str(a.steps)] if a.steps else [])]
    again += [*(["--device", a.device] if a.device != "auto" else []), "--resume"]
    return msg.replace("go on with --resume (any number of processes)", "go on with: " + " ".join(again))
