"""The evaluation metrics of the cIMLE, TIM and CHIMLE papers.

Fidelity        fid, kid                FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on
                                        InceptionV3 features (`chimle.evaluation.inception`).
Diversity       fwv, lpips_diversity    faithfulness-weighted variance (cIMLE Sect. 5.1.5, CHIMLE
                                        Eq. 2) and the LPIPS diversity score (Zhu et al. 2017).
Consistency     consistency             does a sample observe back to its input? (mean absolute error
                                        and mean shift per channel after the task's degradation)
Modes           prd, prd_curve, plot_prd  precision and recall for distributions (Sajjadi et al. 2018):
                                        F_8 (recall, mode coverage) and F_1/8 (precision).
                ivo                     inference via optimisation (CHIMLE Sect. 3): the MSE left after
                                        optimising the latent code towards the observed image.

    from chimle.evaluation import metrics
    metrics.fid(real, fake)                     # folders, (N, 3, H, W) tensors in [0, 1], or (N, D) features
    mean, std = metrics.kid(real, fake)
    metrics.fwv(samples, targets, sigma=0.2)    # samples (K, N, 3, H, W), targets (N, 3, H, W)
    f8, f1_8 = metrics.prd(real_features, fake_features)
    mean, std = metrics.ivo(model, x, y)        # the papers report it x 1e-3

`chimle.evaluate` runs them all on held-out images; the tests replay torchmetrics' doctests.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor
from torch.nn.utils import parametrize

from .. import latent
from ..data.imageio import check_range01, pyplot, save_figure
from ..data.tasks import rgb_to_lab
from ..distances.lpips import LPIPS
from ..loss import Distance, FeatureDistance, ToRGB
from .inception import features

__all__ = [
    "fid",
    "frechet_distance",
    "kid",
    "polynomial_mmd",
    "fwv",
    "faithfulness_distances",
    "fwv_from_distances",
    "lpips_diversity",
    "consistency",
    "chroma_spread",
    "prd",
    "prd_curve",
    "prd_f_beta",
    "plot_prd",
    "kmeans",
    "ivo",
    "as_features",
]

Images = Tensor | np.ndarray | str | os.PathLike


# -----------------------------------------------------------------------------
# FID and KID


def as_features(x: Images, dims: int = 2048, **kw) -> np.ndarray:
    """(N, D) float64 features: a 2-d array/tensor is taken as precomputed features; images
    ((N, 3, H, W) in [0, 1] or uint8) and folders go through the InceptionV3 (`chimle.evaluation.inception`)."""
    if isinstance(x, (str, os.PathLike)) or (isinstance(x, Tensor) and x.ndim == 4):
        x = features(x, dims=dims, **kw)
    f = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if f.ndim != 2:
        raise ValueError(f"expected images (N, 3, H, W), a folder, or features (N, D); got shape {f.shape}")
    return f.astype(np.float64)


def _pair(real: Images, fake: Images, dims: int) -> tuple[np.ndarray, np.ndarray]:
    fr, ff = as_features(real, dims), as_features(fake, dims)
    if fr.shape[1] != ff.shape[1]:
        raise ValueError(f"real and fake features differ in size: {fr.shape[1]} vs {ff.shape[1]}")
    return fr, ff


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    As pytorch-fid: when the product is singular enough that sqrtm fails, eps is added to both
    diagonals; the (numerically tiny) imaginary part of the root is dropped.
    """
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def fid(real: Images, fake: Images, dims: int = 2048, eps: float = 1e-6) -> float:
    """Frechet Inception Distance between two sets (folders, image tensors, or (N, D) features).

    Warns when a set has fewer images than feature dimensions: its covariance is then rank
    deficient and the value is biased (use thousands of images for comparable numbers). In that
    case the trace of the root is computed exactly from the features (see `_trace_sqrt_low_rank`)
    instead of by a d x d sqrtm, which is slow (seconds at d = 2048) and inaccurate on singular matrices.
    """
    fr, ff = _pair(real, fake, dims)
    n, m, d = fr.shape[0], ff.shape[0], fr.shape[1]
    if min(n, m) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n} real and {m} fake")
    if min(n, m) < d:
        warnings.warn(
            f"FID from {n} real and {m} fake images with {d}-d features is unreliable "
            f"(fewer images than dimensions); use at least {d} images per set",
            stacklevel=2,
        )
    if min(n, m) <= d:
        a, b = fr - fr.mean(0), ff - ff.mean(0)
        diff = fr.mean(0) - ff.mean(0)
        traces = (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1)
        return float(diff @ diff + traces - 2 * _trace_sqrt_low_rank(a, b))
    return frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False), eps)


def _trace_sqrt_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """Tr (S1 S2)^(1/2) for S1 = a^T a / (n-1), S2 = b^T b / (m-1), a and b centred (n, d) and (m, d).

    The nonzero eigenvalues of S1 S2 = a^T (a b^T b) / c equal those of (a b^T)(a b^T)^T / c,
    c = (n-1)(m-1), i.e. the squared singular values of a b^T / sqrt(c); so the trace of the root
    is the sum of those singular values: an n x m SVD instead of a d x d matrix square root.
    """
    return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt((a.shape[0] - 1) * (b.shape[0] - 1)))


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    return (a @ b.T / a.shape[1] + coef) ** degree


def _mmd_from_kernels(k11: np.ndarray, k22: np.ndarray, k12: np.ndarray) -> float:
    m, n = k11.shape[0], k22.shape[0]
    # unbiased: the within-set means leave out the diagonal k(x_i, x_i)
    return float(
        (k11.sum() - np.trace(k11)) / (m * (m - 1)) + (k22.sum() - np.trace(k22)) / (n * (n - 1)) - 2 * k12.mean()
    )


def polynomial_mmd(f1: np.ndarray, f2: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the kernel k(x, y) = (x.y / d + coef)^degree (the KID kernel)."""
    return _mmd_from_kernels(*(_poly_kernel(a, b, degree, coef) for a, b in ((f1, f1), (f2, f2), (f1, f2))))


def kid(
    real: Images,
    fake: Images,
    subset_size: int = 50,
    subsets: int = 100,
    dims: int = 2048,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and (population) std of the unbiased polynomial MMD^2 over
    `subsets` random subsets of `subset_size` images from each set (as torchmetrics).

    Subsets are drawn with torch.randperm(n_real) then torch.randperm(n_fake) per subset, from
    `generator` (default: a fresh generator seeded 0, so the value is reproducible). When a set is
    smaller than subset_size the subset size shrinks to it, with a warning.
    """
    fr, ff = _pair(real, fake, dims)
    size = min(subset_size, fr.shape[0], ff.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {fr.shape[0]} real and {ff.shape[0]} fake")
    if size < subset_size:
        warnings.warn(
            f"KID: only {min(fr.shape[0], ff.shape[0])} images in the smaller set; "
            f"subset size reduced from {subset_size} to {size}",
            stacklevel=2,
        )
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    # Sets of up to a few thousand images: each kernel matrix once, the subsets index into them
    # (3 matrix products instead of 3 per subset); larger sets: the kernels of each subset.
    full = max(fr.shape[0], ff.shape[0]) <= 4096
    if full:
        k_rr, k_ff, k_rf = _poly_kernel(fr, fr), _poly_kernel(ff, ff), _poly_kernel(fr, ff)
    scores = []
    for _ in range(subsets):
        i = torch.randperm(fr.shape[0], generator=g)[:size].numpy()
        j = torch.randperm(ff.shape[0], generator=g)[:size].numpy()
        if full:
            scores.append(_mmd_from_kernels(k_rr[np.ix_(i, i)], k_ff[np.ix_(j, j)], k_rf[np.ix_(i, j)]))
        else:
            scores.append(polynomial_mmd(fr[i], ff[j]))
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# diversity: faithfulness-weighted variance and LPIPS diversity


@functools.lru_cache(maxsize=2)
def _lpips(device: str):
    return LPIPS("alex").to(device)


def _check_samples(samples: Tensor, targets: Tensor | None = None) -> None:
    if samples.ndim != 5:
        raise ValueError(f"samples must be (K, N, 3, H, W), got {tuple(samples.shape)}")
    check_range01(samples, "samples")
    if targets is not None:
        if targets.shape != samples.shape[1:]:
            raise ValueError(f"targets {tuple(targets.shape)} must be (N, 3, H, W) = {tuple(samples.shape[1:])}")
        check_range01(targets, "targets")


@torch.no_grad()
def faithfulness_distances(
    samples: Tensor, targets: Tensor, distance: Distance | None = None, chunk: int = 16
) -> tuple[Tensor, Tensor]:
    """The two distances of FwV, each (K, N): d(y~_ij, ybar_j) to the per-input mean sample (the
    pixel average of the K samples) and d(y~_ij, y_j) to the observed image. Default d: LPIPS-alex."""
    _check_samples(samples, targets)
    distance = distance or _lpips(str(samples.device))
    mean = samples.mean(0)
    to_mean, to_target = torch.empty(samples.shape[:2]), torch.empty(samples.shape[:2])
    for lo in range(0, samples.shape[1], chunk):  # chunks of inputs bound the memory
        sl = slice(lo, lo + chunk)
        if isinstance(distance, FeatureDistance):  # LPIPS: features of the mean and target once, not K times
            fm, ft = distance.features(mean[sl]), distance.features(targets[sl])
            for i in range(samples.shape[0]):
                fs = distance.features(samples[i, sl])
                to_mean[i, sl] = distance.distance_from_features(fs, fm).float().cpu()
                to_target[i, sl] = distance.distance_from_features(fs, ft).float().cpu()
        else:
            for i in range(samples.shape[0]):
                to_mean[i, sl] = distance(samples[i, sl], mean[sl]).float().cpu()
                to_target[i, sl] = distance(samples[i, sl], targets[sl]).float().cpu()
    return to_mean, to_target


def fwv_from_distances(to_mean: Tensor, to_target: Tensor, sigma: float) -> float:
    """(1 / KN) sum_i sum_j w_ij d(y~_ij, ybar_j), w_ij = exp(-d(y~_ij, y_j) / (2 sigma^2))."""
    w = torch.exp(-to_target.double() / (2 * sigma**2))
    return float((w * to_mean.double()).mean())


def fwv(samples: Tensor, targets: Tensor, sigma: float = 0.2, distance: Distance | None = None) -> float:
    """Faithfulness-weighted variance (cIMLE Sect. 5.1.5; CHIMLE Eq. 2), higher is better.

    M = (1 / KN) sum_{i=1..K} sum_{j=1..N} w_ij d(y~_ij, ybar_j),  w_ij = exp(-d(y~_ij, y_j) / (2 sigma^2))

    y~_ij is sample i of input j, ybar_j the pixel mean of input j's samples, y_j its observed image,
    d LPIPS-alex unless `distance` is given (any callable (a, b) -> (N,) on images in [0, 1]).
    Normalisation: Eq. 2 is printed as a double sum, but both papers describe it as "the average"
    distance and report values of the size of a mean (cIMLE Table 1: 4.31e-2 at sigma = 0.3 for
    LPIPS distances around 0.2-0.3), and a sum would grow with K and N; so the sum is divided by
    K * N. Multiply by K * N for the literal sum. The weight (w_i in the papers) depends on i and j.
    """
    return fwv_from_distances(*faithfulness_distances(samples, targets, distance), sigma)


@torch.no_grad()
def lpips_diversity(samples: Tensor, distance: Distance | None = None) -> float:
    """LPIPS diversity score (Zhu et al. 2017): for each input, the mean distance over the
    K (K - 1) / 2 unordered pairs of its samples; averaged over inputs. samples: (K, N, 3, H, W)."""
    _check_samples(samples)
    k = samples.shape[0]
    if k < 2:
        raise ValueError("LPIPS diversity needs at least 2 samples per input")
    distance = distance or _lpips(str(samples.device))
    a, b = torch.triu_indices(k, k, offset=1, device=samples.device)
    per_input = []
    for j in range(samples.shape[1]):
        s = samples[:, j]
        if isinstance(distance, FeatureDistance):  # K feature passes instead of K (K - 1)
            f = distance.features(s)
            d = distance.distance_from_features([t[a] for t in f], [t[b] for t in f])
        else:
            d = distance(s[a], s[b])
        per_input.append(d.double().mean())
    return float(torch.stack(per_input).mean())


@torch.no_grad()
def consistency(samples: Tensor, x: Tensor, observe: Callable[[Tensor], Tensor | None]) -> dict[str, Any]:
    """How far samples are from explaining their input: observe(sample) vs the input x.

    `observe` is the task's deterministic degradation (`Task.observe`): for super-resolution the
    bicubic downsample to the input's size, for colourisation the sample's lightness L/100, for JPEG
    the re-encoding at the task's quality. samples (K, N, 3, H, W) or (N, 3, H, W) in [0, 1], x
    (N, C, h, w). Returns {"mae": mean |observe(s) - x|, "shift": [mean (observe(s) - x) per channel],
    "max_abs_shift"}: a colour drift shows as a shift, noise around the input as MAE alone.
    """
    samples = samples[None] if samples.ndim == 4 else samples
    _check_samples(samples)
    check_range01(x, "consistency input")
    k, n = samples.shape[:2]
    obs = observe(samples.flatten(0, 1))
    if obs is None:
        raise ValueError("consistency: this task has no deterministic observation of a sample (paired / night)")
    if obs.shape[1:] != x.shape[1:]:
        raise ValueError(f"consistency: observed samples are {tuple(obs.shape[1:])}, inputs {tuple(x.shape[1:])}")
    diff = (obs.double().view(k, n, *x.shape[1:]) - x.double().to(obs.device)).transpose(0, 2).flatten(1)
    shift = diff.mean(1)
    return {
        "mae": float(diff.abs().mean()),
        "shift": [float(v) for v in shift],
        "max_abs_shift": float(shift.abs().max()),
    }


@torch.no_grad()
def chroma_spread(samples: Tensor) -> dict[str, float]:
    """How samples of one input differ in colour: by a tint of the whole image, or region by region.

    For sample k of input i, its chroma (Lab a, b) splits into the image's mean chroma m_ik and what is
    left at each pixel, r_ik(p) = ab_ik(p) - m_ik. Returns, in Lab units and averaged over inputs:
      "tint":     the spread over samples of the mean chroma, sqrt(var_k(m_ik) summed over a, b): samples
                  that are the same picture in another tint score here;
      "regional": the spread over samples of the residual chroma at each pixel, averaged over pixels:
                  samples that colour one region differently from another score here (an orange orange
                  and a lime-green one in the same photo), a pure tint scores 0.
    samples (K, N, 3, H, W) in [0, 1], K >= 2.
    """
    _check_samples(samples)
    if samples.shape[0] < 2:
        raise ValueError(f"chroma_spread needs at least 2 samples per input, got {samples.shape[0]}")
    ab = rgb_to_lab(samples.double())[:, :, 1:]  # (K, N, 2, H, W)
    mean = ab.mean((-2, -1), keepdim=True)
    tint = mean.var(0, unbiased=False).sum(1).sqrt()  # (N, 1, 1)
    regional = (ab - mean).var(0, unbiased=False).sum(1).sqrt()  # (N, H, W)
    return {"tint": float(tint.mean()), "regional": float(regional.mean())}


def chroma_error(samples: Tensor, targets: Tensor) -> dict[str, float]:
    """How far each sample's colours are from the photo's: the mean over pixels of the Lab chroma distance
    |ab_sample(p) - ab_photo(p)| (Euclidean in a, b; Lab units), per sample. Returns "best_of_k" (the
    closest of the K samples of each input, averaged over inputs: does some sample colour it as the photo
    is?) and "mean" (over all samples). A grey image scores the photo's mean chroma magnitude.
    samples (K, N, 3, H, W), targets (N, 3, H, W), both in [0, 1]."""
    _check_samples(samples, targets)
    ab = rgb_to_lab(samples.double())[:, :, 1:]  # (K, N, 2, H, W)
    ab_t = rgb_to_lab(targets.double())[:, 1:]
    err = (ab - ab_t).pow(2).sum(2).sqrt().mean((-2, -1))  # (K, N)
    return {"best_of_k": float(err.min(0).values.mean()), "mean": float(err.mean())}


# -----------------------------------------------------------------------------
# PRD: precision and recall for distributions (Sajjadi et al. 2018)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 10, max_iter: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding: the labels (len(x),) of the best of n_init runs."""
    sq = (x * x).sum(1)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(len(x))]]
        d2 = ((x - centers[0]) ** 2).sum(1)
        for _ in range(1, k):  # k-means++: the next centre with probability proportional to D(x)^2
            total = d2.sum()
            c = x[rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))]
            centers.append(c)
            d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
        centers, labels = np.array(centers), None
        for _ in range(max_iter):
            new = (sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None]).argmin(1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = x[labels == c]
                if len(members):  # an emptied cluster keeps its centre
                    centers[c] = members.mean(0)
        inertia = ((x - centers[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def prd_curve(
    real_features: Images,
    fake_features: Images,
    num_clusters: int = 20,
    num_angles: int = 1001,
    num_runs: int = 10,
    seed: int = 0,
    dims: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """The PRD curve (precision, recall), each (num_angles,), averaged over num_runs clusterings.

    Per run: k-means (num_clusters, k-means++, 10 inits) on the union of both sets; P, Q = histograms
    of the real and fake cluster labels; for lambda = tan(angle), angle in (0, pi/2):
        precision alpha(lambda) = sum_w min(lambda P(w), Q(w)),  recall beta(lambda) = alpha(lambda) / lambda.
    Sajjadi et al. require equal set sizes; here the larger set is subsampled (afresh each run) to
    the size of the smaller one. With fewer than 10 points per cluster the number of clusters is
    reduced (to keep about 10, at least 2), with a warning.
    Inputs: (N, D) features, or images / folders (InceptionV3 `dims`).
    """
    fr, ff = _pair(real_features, fake_features, dims)
    rng = np.random.default_rng(seed)
    n = min(len(fr), len(ff))
    k = num_clusters
    if 2 * n < 10 * k:
        # With about as many clusters as points every point gets its own cluster and any two sets
        # look disjoint (F = 0); keep about 10 points per cluster (at least 2 clusters) instead.
        k = min(max(2, 2 * n // 10), num_clusters, 2 * n)
        warnings.warn(
            f"PRD with {n} samples per set is unreliable (Sajjadi et al. use at least 10x as many "
            f"samples as clusters); using {k} clusters instead of {num_clusters}",
            stacklevel=2,
        )
    slopes = np.tan(np.linspace(1e-10, math.pi / 2 - 1e-10, num_angles))
    precisions, recalls = [], []
    for _ in range(num_runs):
        r = fr[rng.choice(len(fr), n, replace=False)] if len(fr) > n else fr
        f = ff[rng.choice(len(ff), n, replace=False)] if len(ff) > n else ff
        labels = kmeans(np.vstack([r, f]), k, rng)
        p = np.bincount(labels[:n], minlength=k) / n
        q = np.bincount(labels[n:], minlength=k) / n
        precision = np.minimum(p[None] * slopes[:, None], q[None]).sum(1)
        precisions.append(np.clip(precision, 0, 1))
        recalls.append(np.clip(precision / slopes, 0, 1))
    return np.mean(precisions, 0), np.mean(recalls, 0)


def prd_f_beta(precision: np.ndarray, recall: np.ndarray, beta: float = 8.0) -> tuple[float, float]:
    """(F_beta, F_1/beta), each the maximum over the curve of (1 + b^2) p r / (b^2 p + r).
    With beta = 8, F_8 weighs recall (mode coverage) and F_1/8 precision (mode accuracy)."""

    def f(b: float) -> float:
        return float(np.max((1 + b**2) * precision * recall / (b**2 * precision + recall + 1e-10)))

    return f(beta), f(1 / beta)


def prd(
    real_features: Images,
    fake_features: Images,
    num_clusters: int = 20,
    num_angles: int = 1001,
    num_runs: int = 10,
    seed: int = 0,
    dims: int = 2048,
) -> tuple[float, float]:
    """(F_8, F_1/8) of the PRD curve (Sajjadi et al. 2018): recall-weighted, precision-weighted."""
    return prd_f_beta(*prd_curve(real_features, fake_features, num_clusters, num_angles, num_runs, seed, dims))


def plot_prd(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike) -> None:
    """PNG of PRD curves {label: (precision, recall)}: recall on x, precision on y (as Sajjadi et al.)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, (precision, recall) in curves.items():
        f8, f1_8 = prd_f_beta(precision, recall)
        ax.plot(recall, precision, lw=1.5, label=f"{label} (F8 {f8:.3f}, F1/8 {f1_8:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="PRD")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# IvO: inference via optimisation


def ivo(
    model,
    inputs: Tensor,
    targets: Tensor,
    runs: int = 5,
    steps: int = 200,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    to_rgb: ToRGB | None = None,
    batch_size: int = 8,
) -> tuple[float, float]:
    """Inference via optimisation (CHIMLE Sect. 3): mean and (population) std over `runs` of the MSE
    between the observed image and the output of an optimised latent code, weights fixed.

    Per run: z ~ N(0, I) (the flat code of `chimle.latent.flatten`, one per input), Adam(lr) on z
    alone for `steps` steps on the per-image MSE of the last level's output (through `to_rgb(output,
    input)` when given: `Task.rgb`, e.g. colourisation's Lab -> RGB);
    the run's value is the final MSE averaged over inputs. The papers report it x 1e-3.
    Inputs are processed in batches of `batch_size`; each image's code is optimised independently.
    """
    check_range01(inputs, "inputs")
    check_range01(targets, "targets")
    device = model.device
    g = generator if generator is not None else torch.Generator(device).manual_seed(0)
    layout = model.latent_layout(tuple(inputs.shape[-2:]))
    dim = sum(layout.dims())
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    results = []
    try:
        with parametrize.cached():  # the weights are fixed: compute the weight-normed convs once
            for _ in range(runs):
                errors = []
                for lo in range(0, inputs.shape[0], batch_size):
                    x, y = inputs[lo : lo + batch_size].to(device), targets[lo : lo + batch_size].to(device)
                    z = torch.randn(x.shape[0], dim, generator=g, device=device).requires_grad_(True)
                    opt = torch.optim.Adam([z], lr=lr)

                    def mse(x: Tensor = x, y: Tensor = y, z: Tensor = z) -> Tensor:  # this batch's
                        out = model(x, latent.unflatten(z, layout))[-1]
                        if to_rgb is not None:
                            out = to_rgb(out, x)
                        return (out - y).pow(2).flatten(1).mean(1)  # (B,)

                    for _ in range(steps):
                        opt.zero_grad(set_to_none=True)
                        mse().sum().backward()  # a sum keeps each image's gradient its own
                        opt.step()
                    with torch.no_grad():
                        errors.append(mse().double().cpu())
                results.append(float(torch.cat(errors).mean()))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return float(np.mean(results)), float(np.std(results))
