"""Is a super-resolution model's sample diversity texture or content? Diversity measured at two scales.

    python benchmarks/diversity_scales.py sr8-small CHECKPOINT... [--samples 10] [--side 128]

LPIPS diversity (`chimle.evaluation.metrics.lpips_diversity`, what `chimle eval` reports) counts a fine
texture that changes from sample to sample as much as a different shape or edge. Downsampling averages a
fine texture away and keeps what is larger than a few pixels, so this prints, for each model, the
diversity of its samples as they are and area-downsampled 2x, and the across-sample pixel standard
deviation at 1x, 2x and 4x down. Tiles: scikit-image's photos (held out from the shipped models) cut into
non-overlapping `--side` px tiles, as the model cards' tiles; one seed, so the models see the same codes'
draws where their latent layouts agree.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from chimle.data.imageio import builtin_photos, cut_tiles
from chimle.data.tasks import make_task
from chimle.evaluation.metrics import lpips_diversity
from chimle.inference.sample import generate
from chimle.inference.weights import load_with_task


def tiles(side: int) -> torch.Tensor:
    """Every held-out photo cut into the model cards' tiles."""
    return torch.stack([tile for photo in builtin_photos() for _, _, tile in cut_tiles(photo, side)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--side", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    y = tiles(a.side)
    print(f"{len(y)} tiles of {a.side} px, {a.samples} samples each")
    print("model | LPIPS diversity 1x / 2x down | pixel std 1x / 2x / 4x down (x 1e3)")
    for name in a.models:
        model, task_cfg = load_with_task(name)
        task = make_task(**task_cfg)
        s = generate(model, task.degrade(y), a.samples, torch.Generator().manual_seed(0), task=task)  # (K, N, 3, H, W)
        down = {f: F.avg_pool2d(s.flatten(0, 1), f).unflatten(0, s.shape[:2]) for f in (1, 2, 4)}
        std = " / ".join(f"{1e3 * float(d.std(0).mean()):.1f}" for d in down.values())
        print(f"{name} | {lpips_diversity(s):.3f} / {lpips_diversity(down[2]):.3f} | {std}", flush=True)


if __name__ == "__main__":
    main()
