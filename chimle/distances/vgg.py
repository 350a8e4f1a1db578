"""cIMLE's distance metrics (Li*, Peng*, Zhang*, Malik, "Multimodal Image Synthesis with Conditional
Implicit Maximum Likelihood Estimation", IJCV 2020; Eq. 1, Sect. 3.7, 5.1.1, 5.2.1) on VGG features.

The selection (the conditional IMLE objective of Sect. 3.5, Algorithm 1) is `chimle.search.flat`; the
noise encoder is `chimle.model.NoiseEncoder`, the dataset and loss rebalancing of the scene-layout task
`chimle.data.layouts`.

    d = PixelVGGDistance()                       # super-resolution metric (Sect. 5.1.1)
    codes, dists = chimle.search.flat(model, x, y, d, num_samples=100)
    loss = d(model(x, codes)[-1], y).mean()

    d = VGGFeatureL1Distance()                   # scene-layout metric (Sect. 5.2.1)
    loss = d(out, images[k:k + 1], mask=mask)    # mask: chimle.data.layouts.loss_weight_map

Images are float (N, 3, H, W) in [0, 1] (checked).
Substitution: the paper uses VGG-19; only VGG-16 ImageNet weights are available offline (the backbone
of LPIPS-vgg, chimle.distances.lpips), so every VGG-19 layer is replaced by the same-named VGG-16 layer,
and relu5_4 (absent from VGG-16) by relu5_3, the deepest VGG-16 activation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .lpips import LPIPS

__all__ = ["PixelVGGDistance", "VGGFeatureL1Distance", "vgg_layer_names"]

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

    def __init__(
        self,
        layers: Sequence[str],
        weights: Sequence[float],
        p: int,
        squared: bool = False,
        backbone: nn.Sequential | None = None,
    ):
        super().__init__()
        if len(layers) != len(weights) or not layers:
            raise ValueError(f"need one weight per layer, got {list(layers)} and {list(weights)}")
        self.layers, self.weights = tuple(layers), [float(w) for w in weights]
        self.p, self.squared = p, squared
        vgg = [l for l in self.layers if l != "pixels"]
        self.net, self._taps = None, {}
        if vgg:
            if backbone is None:  # the LPIPS-vgg backbone: torchvision VGG-16, ImageNet weights
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

    def train(self, mode: bool = True) -> _FeatureDistance:
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
            if min(h.shape[-2:]) < _MIN_SIDE:  # coarse search levels: as LPIPS does
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
        # float32 under bf16 autocast too: a bf16 matmul would round every distance to 8 bits (see LPIPS)
        with torch.autocast(t.device.type, enabled=False):
            return t @ t.new_tensor(self.weights)

    def forward(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
        """(N,) distances between a[i] and b[i] (or b[0] if b has batch 1), images in [0, 1]."""
        if a.shape[1:] != b.shape[1:] or b.shape[0] not in (1, a.shape[0]):
            raise ValueError(
                f"inputs must match in C, H, W and batch (or b batch 1): {tuple(a.shape)} vs {tuple(b.shape)}"
            )
        return self.distance_from_features(self.features(a, mask), self.features(b))

    @torch.no_grad()
    def balance_(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> _FeatureDistance:
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

    def __init__(
        self,
        pixel_weight: float = 1.0,
        vgg_weight: float = 0.1,
        layer: str = "relu5_3",
        *,
        squared: bool = False,
        backbone: nn.Sequential | None = None,
    ):
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

    def __init__(
        self,
        layers: Sequence[str] = LAYERS,
        weights: Sequence[float] | None = None,
        *,
        backbone: nn.Sequential | None = None,
    ):
        if weights is None:
            weights = self._DEFAULT_WEIGHTS if tuple(layers) == self.LAYERS else [1.0] * len(layers)
        super().__init__(layers, weights, p=1, backbone=backbone)
