"""Scene layouts (cIMLE, IJCV 2020, Sect. 5.2.4): dataset and loss rebalancing by the rarity of each
category's mean colour. (The task itself, label maps to photos, is `chimle.data.tasks.SceneLayout`.)

    num_classes = count_classes("labels/", ignore_index=255)   # the largest id found + 1

    stats = category_mean_colours(segs, images)  # c_k(p) for every image k and category p in it
    R = rarity_weights(stats, len(images))       # (n, C): R_p(k) = 1 / D_p(c_k(p)), Gaussian KDE
    p = sampling_weights(R, stats)               # dataset rebalancing: P(image k), sums to 1
    pool = sample_pool(R, stats, 400, gen)       # ... or the pool S drawn slot by slot as the authors do
    mask = loss_weight_map(segs[k], R[k])        # loss rebalancing: M^k / max M^k, (1, 1, H, W)

Segmentations are integer label maps (H, W); images (3, H, W) in [0, 1].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .imageio import list_images, read_label_map, read_palette

__all__ = [
    "count_classes",
    "CategoryColours",
    "category_mean_colours",
    "rarity_weights",
    "top_categories",
    "sampling_weights",
    "sample_pool",
    "loss_weight_map",
]


def count_classes(root: str | os.PathLike, ignore_index: int = 255, palette: str = "") -> int:
    """The number of classes of a folder of label maps: the largest id other than `ignore_index`, + 1."""
    table = read_palette(palette) if palette else None
    top = -1
    files = list_images(root)
    if not files:
        raise ValueError(f"no label maps in '{root}'")
    for path in files:
        ids = read_label_map(path, table)
        ids = ids[ids != ignore_index]
        if ids.numel():
            top = max(top, int(ids.max()))
    if top < 0:
        raise ValueError(f"the label maps in '{root}' hold no class other than the ignore id {ignore_index}")
    return top + 1


class CategoryColours(NamedTuple):
    images: Tensor  # (K,) long: the images k in which the category appears
    colours: Tensor  # (K, 3) float64: c_k(p), the category's mean colour in each of them
    pixels: Tensor  # (K,) long: the category's area (pixel count) in each of them


def category_mean_colours(
    segs: Tensor | Sequence[Tensor], images: Tensor | Sequence[Tensor], ignore_index: int | None = None
) -> dict[int, CategoryColours]:
    """c_k(p) = sum_ij 1[x_k^ij = p] y_k^ij / sum_ij 1[x_k^ij = p] (Sect. 5.2.4) for every image k and
    category p present in it. segs: integer label maps (H, W), one per image (or (N, H, W)); images:
    (3, H, W) in [0, 1] (or (N, 3, H, W)). Pixels labelled ignore_index (e.g. 255, void) are skipped."""
    if len(segs) != len(images):
        raise ValueError(f"{len(segs)} segmentations for {len(images)} images")
    found: dict[int, list[tuple[int, Tensor, int]]] = {}
    for k, (seg, img) in enumerate(zip(segs, images)):
        if seg.shape != img.shape[-2:] or img.shape[0] != 3 or seg.is_floating_point():
            raise ValueError(
                f"image {k}: need an integer (H, W) map and a (3, H, W) image, "
                f"got {tuple(seg.shape)}, {tuple(img.shape)}"
            )
        if img.min() < 0 or img.max() > 1:
            raise ValueError(f"image {k}: expected values in [0, 1]")
        labels, pix = seg.reshape(-1).long(), img.reshape(3, -1).T.double()
        if ignore_index is not None:
            labels, pix = labels[labels != ignore_index], pix[labels != ignore_index]
        cats, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        sums = torch.zeros(len(cats), 3, dtype=torch.float64).index_add_(0, inverse, pix)
        for p, colour, count in zip(cats.tolist(), sums / counts[:, None], counts.tolist()):
            found.setdefault(p, []).append((k, colour, count))
    return {
        p: CategoryColours(
            torch.tensor([e[0] for e in v]), torch.stack([e[1] for e in v]), torch.tensor([e[2] for e in v])
        )
        for p, v in sorted(found.items())
    }


def _kde_log_density(points: Tensor, bandwidth: str | float, ridge: float, chunk: int = 1024) -> Tensor:
    """log D(points[i]) of the Gaussian KDE fit to `points` (K, d), as scipy.stats.gaussian_kde:
    kernel covariance = factor^2 * (sample covariance), factor = Scott's K^(-1/(d+4)) by default.
    `ridge` * I is added to the kernel covariance so that a rank-deficient set (e.g. a category whose
    mean colour only varies in brightness) still has a density; 0 reproduces scipy exactly."""
    k, d = points.shape
    factor = {"scott": k ** (-1 / (d + 4)), "silverman": (k * (d + 2) / 4) ** (-1 / (d + 4))}.get(bandwidth, bandwidth)
    if isinstance(factor, str):
        raise ValueError(f"bandwidth must be 'scott', 'silverman' or a number, got {bandwidth!r}")
    cov = torch.cov(points.T).reshape(d, d) if k > 1 else points.new_zeros(d, d)
    chol = torch.linalg.cholesky(cov * factor**2 + ridge * torch.eye(d, dtype=points.dtype))
    white = torch.linalg.solve_triangular(chol, points.T, upper=False).T  # Mahalanobis -> Euclidean
    log_norm = math.log(k) + 0.5 * d * math.log(2 * math.pi) + chol.diagonal().log().sum()
    return torch.cat([torch.logsumexp(-0.5 * torch.cdist(q, white).pow(2), 1) for q in white.split(chunk)]) - log_norm


def rarity_weights(
    stats: dict[int, CategoryColours],
    num_images: int,
    num_categories: int | None = None,
    *,
    bandwidth: str | float = "scott",
    ridge: float = 1e-6,
    min_images: int = 5,
) -> Tensor:
    """R (num_images, num_categories) float64 with R[k, p] = R_p(k) = 1 / D_p(c_k(p)) if category p
    appears in image k, else 0 (Sect. 5.2.4); D_p is a Gaussian KDE of {c_k(p)} over the images
    containing p. Gaps in the paper, filled here: the bandwidth (scipy's default, Scott's rule, as the
    authors' gen_dataset_weight.py); and categories in fewer than `min_images` images, whose sample
    covariance is singular or meaningless: like the authors' code (which skips categories seen in
    <= 67 images) they get no KDE, and R_p(k) = the largest R of the other categories of image k
    (1 if there are none), i.e. they count as rare as anything else in their image."""
    n_cat = num_categories if num_categories is not None else max(stats, default=-1) + 1
    if any(p < 0 or p >= n_cat for p in stats):
        raise ValueError(f"categories {sorted(stats)} do not fit in num_categories={n_cat}")
    rarity = torch.zeros(num_images, n_cat, dtype=torch.float64)
    few = [p for p, s in stats.items() if len(s.images) < min_images]
    for p, s in stats.items():
        if p not in few:
            rarity[s.images, p] = torch.exp(-_kde_log_density(s.colours, bandwidth, ridge))
    peak = rarity.amax(1)  # before the fallbacks are filled in
    for p in few:
        idx = stats[p].images
        rarity[idx, p] = torch.where(peak[idx] > 0, peak[idx], torch.ones_like(peak[idx]))
    return rarity


def top_categories(stats: dict[int, CategoryColours], k: int = 5) -> list[int]:
    """The k categories with the largest overall area across the dataset (Sect. 5.2.4)."""
    if not stats or k < 1:
        raise ValueError(f"need at least one category and k >= 1, got {len(stats)} categories and k={k}")
    return sorted(stats, key=lambda p: (-int(stats[p].pixels.sum()), p))[:k]


def sampling_weights(
    rarity: Tensor, stats: dict[int, CategoryColours], top_k: int = 5, portions: Sequence[float] | None = None
) -> Tensor:
    """Dataset rebalancing (Sect. 5.2.4): "we allocate a portion of the batch to each of the top five
    categories that have the largest overall area across the dataset. For each category, we sample
    training images with a probability in proportion of their rarity scores." Returns the resulting
    probability of each image per draw, (n,), summing to 1: sum_p portion_p R_p(k) / sum_k' R_p(k').
    The portions are not given in the paper; default equal, as in the authors' code (pool slots go
    round-robin over the categories). Images without any top category get 0."""
    top = top_categories(stats, top_k)
    share = (
        torch.full((len(top),), 1 / len(top), dtype=torch.float64)
        if portions is None
        else torch.as_tensor(portions, dtype=torch.float64)
    )
    if share.shape != (len(top),) or (share < 0).any() or share.sum() <= 0:
        raise ValueError(f"need {len(top)} non-negative portions, got {portions}")
    per_category = rarity[:, top] / rarity[:, top].sum(0)
    return per_category @ (share / share.sum())


def sample_pool(
    rarity: Tensor,
    stats: dict[int, CategoryColours],
    size: int,
    top_k: int = 5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Image indices (size,) for the pool S, drawn as in the authors' code: slot i belongs to the
    (i mod top_k)-th top category and draws an image with probability proportional to its rarity
    for that category, with replacement (so S may repeat an image; the paper does not say)."""
    top = top_categories(stats, top_k)
    slot_category = torch.arange(size) % len(top)
    pool = torch.empty(size, dtype=torch.long)
    for j, p in enumerate(top):
        slots = slot_category == j
        if slots.any():
            pool[slots] = torch.multinomial(rarity[:, p], int(slots.sum()), replacement=True, generator=generator)
    return pool


def loss_weight_map(seg: Tensor, weights: Tensor) -> Tensor:
    """Loss rebalancing (Sect. 5.2.4): M^k_ij = R_p(k) for pixel (i, j) of class p, normalised by its
    maximum so every entry lies in (0, 1]. seg: integer labels (H, W) or (N, H, W); weights: that
    image's rarity row R[k] (C,), or rows (N, C). Returns (N, 1, H, W) float32, to be passed as
    `mask=` to the distances. Labels outside [0, C) (void) get 0."""
    if seg.is_floating_point() or seg.dim() not in (2, 3):
        raise ValueError(f"seg must be an integer (H, W) or (N, H, W) label map, got {seg.dtype} {tuple(seg.shape)}")
    seg = (seg[None] if seg.dim() == 2 else seg).long()
    w = weights.double()
    w = w[None].expand(seg.shape[0], -1) if w.dim() == 1 else w
    if w.dim() != 2 or w.shape[0] != seg.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match {seg.shape[0]} label maps")
    valid = (seg >= 0) & (seg < w.shape[1])
    m = torch.gather(w, 1, seg.clamp(0, w.shape[1] - 1).flatten(1)).view_as(seg) * valid
    peak = m.flatten(1).amax(1).clamp_min(torch.finfo(torch.float64).tiny)  # an all-void map stays 0
    return (m / peak.view(-1, 1, 1)).unsqueeze(1).float()
