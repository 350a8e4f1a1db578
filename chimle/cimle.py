"""The cIMLE-specific pieces (Li*, Peng*, Zhang*, Malik, "Multimodal Image Synthesis with Conditional
Implicit Maximum Likelihood Estimation", IJCV 2020) that the Tower model does not cover.

The selection (the conditional IMLE objective of Sect. 3.5, Algorithm 1) is `chimle.search.flat`; this
module adds the paper's distance metrics (Eq. 1, Sect. 3.7, 5.1.1, 5.2.1), the noise encoder
(Sect. 5.2.1, 5.2.5) and the dataset and loss rebalancing of the scene-layout task (Sect. 5.2.4).

    d = PixelVGGDistance()                       # super-resolution metric (Sect. 5.1.1)
    codes, dists = chimle.search.flat(model, x, y, d, num_samples=100)
    loss = d(model(x, codes)[-1], y).mean()

    d = VGGFeatureL1Distance()                   # scene-layout metric (Sect. 5.2.1)
    enc = NoiseEncoder(seg_channels=20)          # z' = enc(x, z~), fed to the generator instead of z
    stats = category_mean_colours(segs, images)  # c_k(p) for every image k and category p in it
    R = rarity_weights(stats, len(images))       # (n, C): R_p(k) = 1 / D_p(c_k(p)), Gaussian KDE
    p = sampling_weights(R, stats)               # dataset rebalancing: P(image k), sums to 1
    pool = sample_pool(R, stats, 400, gen)       # ... or the pool S drawn slot by slot as the authors do
    mask = loss_weight_map(segs[k], R[k])        # loss rebalancing: M^k / max M^k, (1, 1, H, W)
    loss = d(out, images[k:k + 1], mask=mask)

Images are float (N, 3, H, W) in [0, 1] (checked); segmentations are integer label maps (H, W).
Substitution: the paper uses VGG-19; only VGG-16 ImageNet weights are available offline (the backbone
of LPIPS-vgg, chimle.distance), so every VGG-19 layer is replaced by the same-named VGG-16 layer,
and relu5_4 (absent from VGG-16) by relu5_3, the deepest VGG-16 activation.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PixelVGGDistance", "VGGFeatureL1Distance", "NoiseEncoder", "CategoryColours", "vgg_layer_names",
           "category_mean_colours", "rarity_weights", "top_categories", "sampling_weights", "sample_pool",
           "loss_weight_map"]

_MIN_SIDE = 16  # four 2x poolings precede the conv5 layers; smaller images are upsampled to this side


def vgg_layer_names(net: nn.Sequential) -> dict[str, int]:
    """Caffe-style names (conv3_2, relu3_2, ...) -> index in a torchvision-layout VGG `features`."""
    names, block, conv = {}, 1, 0
    for i, m in enumerate(net):
        if isinstance(m, nn.Conv2d):
            conv += 1
            names[f"conv{block}_{conv}"] = i
        elif isinstance(m, nn.ReLU):
            names[f"relu{block}_{conv}"] = i
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            block, conv = block + 1, 0
    return names


class _FeatureDistance(nn.Module):
    """Eq. 1 of the paper: L(y~, y) = sum_i lambda_i ||Phi_i(y~) - Phi_i(y)||_p, where Phi_i is the raw
    pixels ("pixels") or a VGG activation. Each norm is divided by the number of its elements (p = 1,
    or its square root for p = 2): a constant per term, absorbed by lambda_i, that keeps the terms
    comparable across image sizes. Frozen, always in eval mode, differentiable in its inputs.
    `backbone`: a torchvision-layout VGG `features` Sequential, shared (and frozen) if given, so
    several distances can hold one copy; default the VGG-16 of chimle.distance.LPIPS("vgg").

    An optional mask (N or 1, 1, h, w), non-negative, multiplies every difference after being
    area-downsampled to that term's size: the loss rebalancing of Sect. 5.2.4."""

    def __init__(self, layers: Sequence[str], weights: Sequence[float], p: int, squared: bool = False,
                 backbone: nn.Sequential | None = None):
        super().__init__()
        if len(layers) != len(weights) or not layers:
            raise ValueError(f"need one weight per layer, got {list(layers)} and {list(weights)}")
        self.layers, self.weights = tuple(layers), [float(w) for w in weights]
        self.p, self.squared = p, squared
        vgg = [l for l in self.layers if l != "pixels"]
        self.net, self._taps = None, {}
        if vgg:
            if backbone is None:
                from .distance import LPIPS  # the LPIPS-vgg backbone: torchvision VGG-16, ImageNet weights
                backbone = LPIPS("vgg").net
            names = vgg_layer_names(backbone)
            if unknown := [l for l in vgg if l not in names]:
                raise ValueError(f"unknown VGG layers {unknown}; available: {sorted(names)} and 'pixels'")
            self._taps = {names[l]: l for l in vgg}
            self.net = backbone[: max(self._taps) + 1]  # nothing after the deepest tap is ever needed
        # ImageNet statistics, as the VGG weights were trained with (LPIPS' ScalingLayer is the same)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "_FeatureDistance":
        return super().train(False)  # a fixed metric

    def features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """[Phi_i(x) for each layer] (+ the mask last, if given), each indexed by image along dim 0."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        lo, hi = (v.item() for v in torch.aminmax(x.detach()))
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # written this way so NaN fails too
            raise ValueError(f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        out = {"pixels": x}
        if self.net is not None:
            h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
            if min(h.shape[-2:]) < _MIN_SIDE:  # coarse search levels: as chimle.distance.LPIPS does
                h = F.interpolate(h, scale_factor=_MIN_SIDE / min(h.shape[-2:]), mode="bilinear", align_corners=False)
            for i, layer in enumerate(self.net):
                h = layer(h)
                if i in self._taps:
                    out[self._taps[i]] = h
        feats = [out[l] for l in self.layers]
        if mask is not None:
            if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, x.shape[0]) or (mask < 0).any():
                raise ValueError(f"mask must be non-negative (N or 1, 1, h, w), got {tuple(mask.shape)}")
            feats.append(mask.to(x.dtype))
        return feats

    def terms(self, fa: list[Tensor], fb: list[Tensor]) -> Tensor:
        """(N, terms) unweighted ||Phi_i(a) - Phi_i(b)||_p / size; fb (or fa) may have batch 1; a mask
        may trail either list."""
        n, mask = len(self.layers), None
        for f in (fa, fb):
            if len(f) == n + 1:
                mask = f[-1]
            elif len(f) != n:
                raise ValueError(f"expected {n} feature tensors (+ an optional mask), got {len(f)}")
        out = []
        for a, b in zip(fa[:n], fb[:n]):
            diff = a - b
            if mask is not None:  # Sect. 5.2.4: the mask "downsampled to match the size of Phi_i"
                diff = diff * F.adaptive_avg_pool2d(mask, diff.shape[-2:])
            flat = diff.flatten(1).float()
            if self.p == 1:
                out.append(flat.abs().mean(1))
            elif self.squared:
                out.append(flat.pow(2).mean(1))
            else:  # vector_norm has a zero subgradient at 0, unlike sqrt(mean(d^2))
                out.append(torch.linalg.vector_norm(flat, 2, dim=1) / math.sqrt(flat.shape[1]))
        return torch.stack(out, 1)

    def distance_from_features(self, fa: list[Tensor], fb: list[Tensor]) -> Tensor:
        """(N,) distances from features(a) and features(b); the contract of chimle.search."""
        t = self.terms(fa, fb)
        return t @ t.new_tensor(self.weights)

    def forward(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
        """(N,) distances between a[i] and b[i] (or b[0] if b has batch 1), images in [0, 1]."""
        if a.shape[1:] != b.shape[1:] or b.shape[0] not in (1, a.shape[0]):
            raise ValueError(f"inputs must match in C, H, W and batch (or b batch 1): {tuple(a.shape)} vs {tuple(b.shape)}")
        return self.distance_from_features(self.features(a, mask), self.features(b))

    @torch.no_grad()
    def balance_(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> "_FeatureDistance":
        """Sect. 3.7: "the weights are set so that each term in the distance metric is roughly of the
        same magnitude". Sets lambda_i = 1 / (mean of term i over the pairs (a, b)), so each term
        averages 1 on them; use representative pairs (e.g. model outputs and their targets)."""
        t = self.terms(self.features(a, mask), self.features(b)).mean(0)
        if not bool((t > 0).all()):
            raise ValueError(f"a term is 0 on these pairs ({t.tolist()}); balance on pairs that differ")
        self.weights = (1 / t).tolist()
        return self


class PixelVGGDistance(_FeatureDistance):
    """The super-resolution metric, Sect. 5.1.1: "a linear combination of the l2 distance between raw
    pixel values and the l2 distance between the activations in the relu5_4 layer of the VGG-19".
    Here relu5_3 of VGG-16 (see the module docstring). The norms are not squared, as written (Eq. 1);
    squared=True gives the mean-squared form common in implementations (nn.MSELoss).

    The paper leaves lambda_i open beyond Sect. 3.7's "roughly of the same magnitude"; the default
    vgg_weight = 0.1 does that for near misses: on 128 px scikit-image photos against their 8x
    bicubic down/up-sampled copies the pixel term is ~0.10 and the relu5_3 term ~1.2 (~0.31 / 1.4
    between different photos). Call `balance_` on your own pairs to set them from data."""

    def __init__(self, pixel_weight: float = 1.0, vgg_weight: float = 0.1, layer: str = "relu5_3", *,
                 squared: bool = False, backbone: nn.Sequential | None = None):
        super().__init__(("pixels", layer), (pixel_weight, vgg_weight), p=2, squared=squared, backbone=backbone)


class VGGFeatureL1Distance(_FeatureDistance):
    """The scene-layout metric, Sect. 5.2.1: "a linear combination of l1 distances between the
    activations in the following layers of the VGG-19 architecture: conv1_2, conv2_2, conv3_2, conv4_2
    and conv5_2". All five exist in VGG-16 too (same names, shallower blocks 3-5). The paper's names
    follow the CRN/MatConvNet convention used by the authors' code, where "conv1_2" is the rectified
    output relu(conv(.)), hence the default relu*_2 taps ("conv*_2" taps the pre-activation instead).
    Not carried over from the authors' code: its extra L1 term on raw pixels ("pixels" adds it) and
    its average pooling inside VGG (the ImageNet VGG-16 here max-pools).

    Default weights (lambda_i, Sect. 3.7, "roughly the same magnitude"): the reciprocals of the mean
    term of each layer on 128 px scikit-image photos against their 8x bicubic down/up-sampled copies
    (0.49, 1.2, 2.2, 1.6, 0.90); for other layers 1 each. `balance_` sets them from your data."""

    LAYERS = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")
    _DEFAULT_WEIGHTS = (1 / 0.49, 1 / 1.2, 1 / 2.2, 1 / 1.6, 1 / 0.90)

    def __init__(self, layers: Sequence[str] = LAYERS, weights: Sequence[float] | None = None, *,
                 backbone: nn.Sequential | None = None):
        if weights is None:
            weights = self._DEFAULT_WEIGHTS if tuple(layers) == self.LAYERS else [1.0] * len(layers)
        super().__init__(layers, weights, p=1, backbone=backbone)


class NoiseEncoder(nn.Module):
    """Sect. 5.2.1: "a 3-layer convolutional net that takes the segmentation x and a lower-dimensional
    noise vector z~ as input and outputs a noise vector z' of the same size as z"; Sect. 5.2.5: noise
    z~ of 10 channels, output z' of 10 channels, "the number of output channels in the intermediate
    layers is 100". (Sect. 5.2.5 gives the segmentation 30 channels; in the authors' code 30 is the
    encoder's whole input, 20 label channels + 10 noise channels.)

    Kernel sizes, normalisation, activations and initialisation are not in the paper; they follow the
    authors' code (noise_encoder in zth667/Diverse-Image-Synthesis-from-Semantic-Layout, train.py):
    3x3 conv -> layer norm -> LeakyReLU(0.2), twice, then a linear 1x1 conv; weights drawn from a
    normal truncated at 2 std with std 0.15, no bias before a norm. GroupNorm(1, C) is TF-slim's
    layer_norm (statistics over C, H, W per image, per-channel affine)."""

    def __init__(self, seg_channels: int, noise_channels: int = 10, out_channels: int = 10, hidden: int = 100):
        super().__init__()
        self.seg_channels, self.noise_channels = seg_channels, noise_channels
        self.net = nn.Sequential(
            nn.Conv2d(seg_channels + noise_channels, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(1, hidden), nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(1, hidden), nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, out_channels, 1),
        )
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.15, a=-0.3, b=0.3)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, seg: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """seg (N, seg_channels, H, W), e.g. one-hot labels; noise (N, noise_channels, H, W), drawn
        from N(0, I) when omitted. Returns z' (N, out_channels, H, W)."""
        n, _, h, w = seg.shape
        if noise is None:
            noise = torch.randn(n, self.noise_channels, h, w, generator=generator, device=seg.device, dtype=seg.dtype)
        if seg.shape[1] != self.seg_channels or noise.shape != (n, self.noise_channels, h, w):
            raise ValueError(f"expected seg (N, {self.seg_channels}, H, W) and noise (N, {self.noise_channels}, H, W), "
                             f"got {tuple(seg.shape)} and {tuple(noise.shape)}")
        return self.net(torch.cat([seg, noise.to(seg.dtype)], 1))


# ------------------------------------------------------------------------------------------------
# Rebalancing, Sect. 5.2.4


class CategoryColours(NamedTuple):
    images: Tensor   # (K,) long: the images k in which the category appears
    colours: Tensor  # (K, 3) float64: c_k(p), the category's mean colour in each of them
    pixels: Tensor   # (K,) long: the category's area (pixel count) in each of them


def category_mean_colours(segs: Tensor | Sequence[Tensor], images: Tensor | Sequence[Tensor],
                          ignore_index: int | None = None) -> dict[int, CategoryColours]:
    """c_k(p) = sum_ij 1[x_k^ij = p] y_k^ij / sum_ij 1[x_k^ij = p] (Sect. 5.2.4) for every image k and
    category p present in it. segs: integer label maps (H, W), one per image (or (N, H, W)); images:
    (3, H, W) in [0, 1] (or (N, 3, H, W)). Pixels labelled ignore_index (e.g. 255, void) are skipped."""
    if len(segs) != len(images):
        raise ValueError(f"{len(segs)} segmentations for {len(images)} images")
    found: dict[int, list[tuple[int, Tensor, int]]] = {}
    for k, (seg, img) in enumerate(zip(segs, images)):
        if seg.shape != img.shape[-2:] or img.shape[0] != 3 or seg.is_floating_point():
            raise ValueError(f"image {k}: need an integer (H, W) map and a (3, H, W) image, got {tuple(seg.shape)}, {tuple(img.shape)}")
        if img.min() < 0 or img.max() > 1:
            raise ValueError(f"image {k}: expected values in [0, 1]")
        labels, pix = seg.reshape(-1).long(), img.reshape(3, -1).T.double()
        if ignore_index is not None:
            labels, pix = labels[labels != ignore_index], pix[labels != ignore_index]
        cats, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        sums = torch.zeros(len(cats), 3, dtype=torch.float64).index_add_(0, inverse, pix)
        for p, colour, count in zip(cats.tolist(), sums / counts[:, None], counts.tolist()):
            found.setdefault(p, []).append((k, colour, count))
    return {p: CategoryColours(torch.tensor([e[0] for e in v]), torch.stack([e[1] for e in v]),
                               torch.tensor([e[2] for e in v])) for p, v in sorted(found.items())}


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
    chol = torch.linalg.cholesky(cov * factor ** 2 + ridge * torch.eye(d, dtype=points.dtype))
    white = torch.linalg.solve_triangular(chol, points.T, upper=False).T  # Mahalanobis -> Euclidean
    log_norm = math.log(k) + 0.5 * d * math.log(2 * math.pi) + chol.diagonal().log().sum()
    return torch.cat([torch.logsumexp(-0.5 * torch.cdist(q, white).pow(2), 1) for q in white.split(chunk)]) - log_norm


def rarity_weights(stats: dict[int, CategoryColours], num_images: int, num_categories: int | None = None, *,
                   bandwidth: str | float = "scott", ridge: float = 1e-6, min_images: int = 5) -> Tensor:
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


def sampling_weights(rarity: Tensor, stats: dict[int, CategoryColours], top_k: int = 5,
                     portions: Sequence[float] | None = None) -> Tensor:
    """Dataset rebalancing (Sect. 5.2.4): "we allocate a portion of the batch to each of the top five
    categories that have the largest overall area across the dataset. For each category, we sample
    training images with a probability in proportion of their rarity scores." Returns the resulting
    probability of each image per draw, (n,), summing to 1: sum_p portion_p R_p(k) / sum_k' R_p(k').
    The portions are not given in the paper; default equal, as in the authors' code (pool slots go
    round-robin over the categories). Images without any top category get 0."""
    top = top_categories(stats, top_k)
    share = torch.full((len(top),), 1 / len(top), dtype=torch.float64) if portions is None else \
        torch.as_tensor(portions, dtype=torch.float64)
    if share.shape != (len(top),) or (share < 0).any() or share.sum() <= 0:
        raise ValueError(f"need {len(top)} non-negative portions, got {portions}")
    per_category = rarity[:, top] / rarity[:, top].sum(0)
    return per_category @ (share / share.sum())


def sample_pool(rarity: Tensor, stats: dict[int, CategoryColours], size: int, top_k: int = 5,
                generator: torch.Generator | None = None) -> Tensor:
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
