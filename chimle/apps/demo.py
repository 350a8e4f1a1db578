"""`chimle demo`: train a small tower on photos that ship with scikit-image, then sample.

8x super-resolution (8 px -> 64 px crops), CHIMLE search with LPIPS, on the CPU in a few
minutes. Training uses five of the bundled photos; the grid shows crops of the sixth, which the
model never saw: input | 6 samples | the real image. Every sample is a different plausible
high-resolution image for the same input.

    chimle demo --out runs/demo          # prints the path of the grid
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..data.imageio import builtin_photo_dir
from ..inference.figures import save_grid
from ..inference.sample import generate
from ..rng import Stream, seeded
from ..training.config import load_config
from ..training.trainer import Trainer

__all__ = ["run_demo"]

HELD_OUT = "chelsea"  # the cat: never trained on, shown in the grid


def demo_config(out: str | Path, steps: int | None = None, device: str = "auto"):
    return load_config(
        base={
            "name": "demo",
            "out": str(out),
            "preset": "small",
            "model": {"blocks": 1},
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


def _split_photos(out: Path) -> None:
    src = builtin_photo_dir()
    for sub in ("train", "held_out"):
        (out / "photos" / sub).mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        dst = out / "photos" / ("held_out" if p.stem == HELD_OUT else "train") / p.name
        if not dst.exists():
            shutil.copy(p, dst)


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, device: str = "auto") -> Path:
    """Train the demo tower and write the held-out sample grid; returns the grid's path."""
    out = Path(out)
    _split_photos(out)
    cfg = demo_config(out, steps, device)
    trainer = Trainer(cfg)
    trainer.run()
    # A grid over several crops of the held-out photo (the centre crop alone would show one patch).
    held = ImageDataset(
        out / "photos" / "held_out",
        trainer.task,
        crop=cfg.data.crop,
        levels=trainer.model_cfg.levels,
        train=True,
        seed=123,
    )
    items = []
    for e in range(4):
        held.set_epoch(e)
        items.append(held[0])
    x = torch.stack([it["input"] for it in items]).to(trainer.device)
    y = torch.stack([it["target"] for it in items])
    samples = generate(trainer.model, x, 6, seeded(0, Stream.DEMO, device=trainer.device), task=trainer.task)
    grid = out / "demo_grid.png"
    save_grid(grid, x.cpu(), samples.cpu(), y)
    return grid
