"""Metrics for 28 px digits, where Inception and LPIPS see nothing they know: a small classifier of our own.

    clf = classifier(load_digits("mnist"))       # trained once on the train split (seed 0), cached
    clf.accuracy                                 # on the test split
    f = clf.features(images)                     # (N, 128) penultimate features: FID and KID on digits
    fid, (kid, kid_std) = metrics.fid(fr, ff), metrics.kid(fr, ff)
    best_of_k(samples, targets)                  # pixel MSE of the nearest of K samples, mean over inputs
    pixel_diversity(samples)                     # mean pairwise pixel L2 between the K samples of an input
    pairs = ambiguous(clf.probabilities(inputs)) # inputs the classifier finds two-sided (p >= 0.2 twice)
    mode_coverage(sample_classes, pairs)         # fraction of each such pair that appears among its samples

Samples are (K, N, 28, 28) grey in [0, 1]; targets (N, 28, 28). The classifier (two conv layers and two
linear ones, LeNet-like) trains on the clean training digits; its weights are cached under the chimle
cache dir (`$CHIMLE_CACHE/digit-classifiers`), keyed by a hash of the training and test digits and of
the recipe, so every tower of a report, and every rerun, is scored by the same network.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.digits import DigitData
from ..data.imageio import atomic_write, default_cache_dir

__all__ = [
    "DigitClassifier",
    "Classifier",
    "classifier",
    "train_classifier",
    "best_of_k",
    "pixel_diversity",
    "ambiguous",
    "mode_coverage",
    "AMBIGUOUS_P",
]

AMBIGUOUS_P = 0.2  # an input is ambiguous when two classes each get at least this probability
FEATURES = 128
_RECIPE = {"version": 2, "channels": (16, 32), "features": FEATURES, "epochs": 3, "batch": 64, "lr": 2e-3, "seed": 0}


class DigitClassifier(nn.Module):
    """conv 3x3 (16) -> pool -> conv 3x3 (32) -> pool -> linear 128 (the features) -> linear 10."""

    def __init__(self, channels: tuple[int, int] = (16, 32), features: int = FEATURES):
        super().__init__()
        a, b = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(b * 49, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _grey(images: Tensor | np.ndarray) -> Tensor:
    """(N, 28, 28), (N, 1, 28, 28) or grey-replicated (N, 3, 28, 28) -> (N, 1, 28, 28) float32."""
    x = torch.from_numpy(np.array(images, np.float32)) if isinstance(images, np.ndarray) else images.float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[-2:] != (28, 28):
        raise ValueError(f"expected digits (N, 28, 28) or (N, C, 28, 28), got {tuple(x.shape)}")
    return x.mean(1, keepdim=True)


@dataclass
class Classifier:
    """A trained `DigitClassifier` with its test accuracy; every method takes digits in [0, 1] of any batch."""

    net: DigitClassifier
    accuracy: float  # on the test split
    train_digits: int
    test_digits: int
    path: Path | None = None  # where its weights are cached
    # The root mean square of the test digits' raw features: dividing by it puts them near unit size, where
    # KID's kernel (x.y / d + 1)^3 is of the size it has on Inception features (raw: values in the hundreds).
    feature_scale: float = 1.0

    @torch.no_grad()
    def _run(self, images, part, chunk: int = 1000) -> Tensor:
        self.net.eval()
        x = _grey(images)
        return torch.cat([part(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else torch.empty(0)

    def features(self, images: Tensor | np.ndarray) -> np.ndarray:
        """(N, 128) penultimate features, float64, divided by `feature_scale`: what FID and KID compare on digits."""
        return self._run(images, self.net.body).double().numpy() / self.feature_scale

    def probabilities(self, images: Tensor | np.ndarray) -> np.ndarray:
        """(N, 10) class probabilities."""
        return self._run(images, lambda x: self.net(x).softmax(1)).double().numpy()

    def classes(self, images: Tensor | np.ndarray) -> np.ndarray:
        """(N,) argmax classes."""
        return self.probabilities(images).argmax(1)


def train_classifier(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, recipe: dict | None = None
) -> Classifier:
    """Train a `DigitClassifier` on the training digits (Adam, the recipe's epochs, batches and seed: the same
    network every time on one machine) and measure its accuracy on the test digits."""
    r = {**_RECIPE, **(recipe or {})}
    g = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])  # the initial weights
    net = DigitClassifier(tuple(r["channels"]), r["features"])
    opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
    x, y = _grey(train_x), torch.from_numpy(np.array(train_y, np.int64))
    net.train()
    for _ in range(r["epochs"]):
        for idx in torch.randperm(len(x), generator=g).split(r["batch"]):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    clf = Classifier(net, 0.0, len(train_x), len(test_x))
    clf.accuracy = float((clf.classes(test_x) == np.asarray(test_y)).mean())
    clf.feature_scale = float(np.sqrt((clf.features(test_x) ** 2).mean()))
    return clf


def _key(data: DigitData, recipe: dict) -> str:
    h = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode())
    for a in (data.train_x, data.train_y, data.test_x, data.test_y):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def classifier(data: DigitData, cache_dir: str | Path | None = None, recipe: dict | None = None) -> Classifier:
    """The classifier of `data`: loaded from the cache when trained before on the same digits with the same
    recipe, else trained (seconds to a minute on one core) and cached."""
    r = {**_RECIPE, **(recipe or {})}
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "digit-classifiers"
    path = folder / f"{_key(data, r)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = DigitClassifier(tuple(r["channels"]), r["features"])
        net.load_state_dict(saved["state"])
        counts = int(saved["train_digits"]), int(saved["test_digits"])
        return Classifier(net, float(saved["accuracy"]), *counts, path, float(saved["feature_scale"]))
    clf = train_classifier(data.train_x, data.train_y, data.test_x, data.test_y, r)
    buf = io.BytesIO()
    state = {"accuracy": clf.accuracy, "train_digits": clf.train_digits, "test_digits": clf.test_digits}
    state["feature_scale"] = clf.feature_scale
    torch.save({"state": clf.net.state_dict(), **state, "data": data.name, "recipe": json.dumps(r)}, buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    clf.path = path
    return clf


# ----------------------------------------------------------------------------------------------
# Sample metrics


def _samples(samples: Tensor | np.ndarray) -> np.ndarray:
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 4:
        raise ValueError(f"samples must be (K, N, H, W) grey, got shape {s.shape}")
    return s


def best_of_k(samples: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> float:
    """Mean over inputs of the smallest pixel MSE between one of its K samples (K, N, H, W) and its target (N, H, W)."""
    s, t = _samples(samples), np.asarray(targets, dtype=np.float64)
    if t.shape != s.shape[1:]:
        raise ValueError(f"targets {t.shape} must be (N, H, W) = {s.shape[1:]}")
    return float(((s - t[None]) ** 2).mean((2, 3)).min(0).mean())


def pixel_diversity(samples: Tensor | np.ndarray) -> float:
    """Mean over inputs of the mean pixel L2 distance (the Euclidean norm over all pixels, images in [0, 1])
    between the K (K - 1) / 2 unordered pairs of its samples (K, N, H, W): LPIPS diversity without LPIPS."""
    s = _samples(samples)
    k = s.shape[0]
    if k < 2:
        raise ValueError("diversity needs at least 2 samples per input")
    a, b = np.triu_indices(k, 1)
    flat = s.reshape(k, s.shape[1], -1)
    return float(np.linalg.norm(flat[a] - flat[b], axis=-1).mean())


def ambiguous(probabilities: np.ndarray, p: float = AMBIGUOUS_P) -> tuple[np.ndarray, np.ndarray]:
    """The inputs (indices, (M,)) whose two most probable classes both have probability >= p, and those two
    classes ((M, 2), the more probable first), from (N, 10) probabilities."""
    probs = np.asarray(probabilities)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    both = np.take_along_axis(probs, top, 1).min(1) >= p
    return np.flatnonzero(both), top[both]


def mode_coverage(sample_classes: np.ndarray, pairs: np.ndarray) -> float:
    """Mean over inputs of the fraction of its two plausible classes (pairs (M, 2)) that are the argmax class
    of at least one of its K samples (sample_classes (M, K)): 1 when both appear, 0.5 one, 0 neither."""
    c, pr = np.asarray(sample_classes), np.asarray(pairs)
    if c.ndim != 2 or pr.shape != (len(c), 2):
        raise ValueError(f"need sample classes (M, K) and pairs (M, 2), got {c.shape} and {pr.shape}")
    if not len(c):
        raise ValueError("no ambiguous inputs to measure mode coverage on")
    return float((c[:, :, None] == pr[:, None, :]).any(1).mean())
