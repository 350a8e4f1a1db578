"""Pictures: sample grids (input | samples | target) and line plots of training curves, as PNG files.

save_grid("grid.png", x, samples, targets, task=task)      # samples: (K, N, 3, H, W)
plot_curve(steps, {"loss": losses}, "loss.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.imageio import pyplot, save_figure, save_image
from ..data.tasks import Task

__all__ = ["make_grid", "save_grid", "plot_curve"]


def make_grid(rows: Sequence[Sequence[Tensor]], pad: int = 2) -> Tensor:
    """Rows of (3, h, w) images (any sizes, resized to the largest) -> one (3, H, W) image in [0, 1]."""
    h = max(im.shape[-2] for r in rows for im in r)
    w = max(im.shape[-1] for r in rows for im in r)
    cols = max(len(r) for r in rows)
    grid = torch.ones(3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            im = im.float().clamp(0, 1)
            if im.shape[0] == 1:
                im = im.expand(3, -1, -1)
            if tuple(im.shape[-2:]) != (h, w):  # show small inputs blown up, pixels visible
                im = F.interpolate(im[None], size=(h, w), mode="nearest")[0]
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = im
    return grid


def save_grid(
    path: str | Path, x: Tensor, samples: Tensor, targets: Tensor | None = None, task: Task | None = None
) -> Tensor:
    """One row per input: input | sample 1..K | target (when known). Returns the grid tensor."""
    show = task.show_input if task is not None else (lambda t: t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3])
    rows = []
    for i in range(x.shape[0]):
        row = [show(x[i])] + [samples[k, i] for k in range(samples.shape[0])]
        if targets is not None:
            row.append(targets[i])
        rows.append(row)
    grid = make_grid(rows)
    save_image(grid, path)
    return grid


def plot_curve(
    steps: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, ylabel: str = "loss"
) -> Path:
    """A line plot PNG (training curves)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(steps, ys, label=name, lw=1.2 if name == "loss" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
