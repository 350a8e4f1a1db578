"""Which part of the latent code drives a colourisation model's modes: the style vector or the noise maps.

    python benchmarks/colour_modes.py [MODEL] [--samples 8] [--crop 128]

Draws K samples for centre crops of scikit-image's photos (held out from the shipped models) three ways:
whole random codes; the style vectors redrawn with every level's noise fixed; the noise redrawn with the
style fixed. Prints `chimle.evaluation.metrics.chroma_spread` of each: the spread of the samples' mean
chroma ("tint") and of their chroma after removing it ("regional"), in Lab units. A model whose modes
are whole-image tints driven by the global style (AdaIN's modulation is the same at every pixel) shows
most of its spread in the first and second rows' tint and little in the third.
"""

from __future__ import annotations

import argparse

import torch

from chimle import latent
from chimle.data.imageio import builtin_photos
from chimle.data.tasks import make_task
from chimle.evaluation.metrics import chroma_spread
from chimle.inference.weights import load_with_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="colorize-small")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, task_cfg = load_with_task(a.model)
    task = make_task(**task_cfg)
    s = a.crop
    crops = [ph[:, (ph.shape[1] - s) // 2 :, (ph.shape[2] - s) // 2 :][:, :s, :s] for ph in builtin_photos()]
    y = torch.stack(crops)
    x = task.degrade(y)
    layout = model.latent_layout(x.shape[-2:])
    fixed = layout.sample(len(y), torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(0)
    ways = {
        "whole codes": lambda: layout.sample(len(y), g),
        "style redrawn": lambda: [latent.Component(c.style, f.noise) for c, f in zip(layout.sample(len(y), g), fixed)],
        "noise redrawn": lambda: [latent.Component(f.style, c.noise) for c, f in zip(layout.sample(len(y), g), fixed)],
    }
    print(f"{a.model}: {len(y)} crops of {s} px, {a.samples} samples each; chroma spread in Lab units")
    for name, draw in ways.items():
        with torch.no_grad():
            samples = torch.stack([task.rgb(model(x, draw())[-1], x) for _ in range(a.samples)])
        r = chroma_spread(samples)
        print(f"  {name:14s} tint {r['tint']:6.2f}   regional {r['regional']:6.2f}")


if __name__ == "__main__":
    main()
