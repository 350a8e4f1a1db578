"""The training loss of TIM / CHIMLE and the contract every distance follows.

Intermediate supervision (TIM Sect. 4.1, CHIMLE Sect. 2.3): every level's output is compared with
the target downsampled to that level, and the loss is the unweighted sum over levels,

    L(theta) = sum_l d(y~_l, resize(y, size_l))        (+ an optional pixel L1 per level)

with d the same distance the latent search minimises (LPIPS-VGG in the papers).

    losses = level_losses(outs, x, y, chimle.LPIPS("vgg"), to_rgb=task.rgb)    # (N, L)
    losses.sum(1).mean().backward()

The targets do not change while a pool of codes is trained on, so the training step takes them
prepared once per pool entry (`level_targets`: each level's resized target and, for a distance that
embeds images, its features) instead of resizing and embedding them on every step:

    targets = level_targets(y, model.cfg.output_sizes(*x.shape[-2:]), distance)
    losses = level_losses(outs, x, None, distance, targets=targets)    # the same losses, one VGG pass less
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .resample import resize

__all__ = ["Distance", "FeatureDistance", "ToRGB", "LevelTarget", "level_targets", "level_losses", "l2"]

# (model output at some level, the input at full resolution) -> RGB image in [0, 1] at the output's size.
# Identity for RGB tasks; colourisation composes the predicted ab with the input's L (`Task.rgb`).
ToRGB = Callable[[Tensor, Tensor], Tensor]


class Distance(Protocol):
    """d(a, b) -> (N,) for images a, b (N, 3, H, W) in [0, 1] (b may have batch 1)."""

    def __call__(self, a: Tensor, b: Tensor) -> Tensor: ...


@runtime_checkable
class FeatureDistance(Protocol):
    """A distance that can embed an image once and compare embeddings: the search computes the
    targets' features once per level instead of once per chunk of candidates."""

    def features(self, x: Tensor) -> list[Tensor]: ...

    def distance_from_features(self, fa: list[Tensor], fb: list[Tensor]) -> Tensor: ...


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared pixel error per image, (N,): the distance of the TIM paper's MNIST illustration,
    where it equals the L2 distance in PCA coordinates."""
    return (a - b).pow(2).flatten(1).mean(1)


class LevelTarget(NamedTuple):
    """The target of one level: the observed image resized to the level's output, and its features
    under the distance (`FeatureDistance.features`), or None for a distance without features."""

    image: Tensor  # (N, 3, h_l, w_l) in [0, 1]
    features: list[Tensor] | None


@torch.no_grad()
def level_targets(
    y: Tensor, sizes: Sequence[tuple[int, int]], distance: Distance, mask: Tensor | None = None
) -> list[LevelTarget]:
    """What `level_losses` makes of the target `y` at every level (output `sizes`, coarsest first):
    computed once, it replaces the target's resize and distance pass of every later step.

    `mask` (N, 1, H, W): per-pixel loss weights (cIMLE's loss rebalancing), carried with the target's
    features to a distance that takes them (`distances.vgg`: pooled to every feature map's size)."""
    if mask is not None and not isinstance(distance, FeatureDistance):
        raise ValueError("per-pixel loss weights need a distance with features (vgg_l1, pixel_vgg)")
    out = []
    for size in sizes:
        image = resize(y, tuple(size))
        if isinstance(distance, FeatureDistance):
            feats = distance.features(image) if mask is None else distance.features(image, mask)
        else:
            feats = None
        out.append(LevelTarget(image, feats))
    return out


def level_losses(
    outs: list[Tensor],
    x: Tensor,
    y: Tensor | None,
    distance: Distance,
    to_rgb: ToRGB | None = None,
    pixel_weight: float = 0.0,
    *,
    targets: Sequence[LevelTarget] | None = None,
) -> Tensor:
    """Per-level losses (N, L): d(level output as RGB, target resized to the level) [+ w * L1].

    `targets` (from `level_targets`, one per output) replaces `y`: the same losses without resizing
    and embedding the target again."""
    if targets is not None and len(targets) != len(outs):
        raise ValueError(f"targets has {len(targets)} levels, the outputs {len(outs)}")
    per_level = []
    for l, out in enumerate(outs):
        rgb = (out if to_rgb is None else to_rgb(out, x)).float()
        if targets is None:
            target, feats = resize(y, tuple(out.shape[-2:])), None
        else:
            target, feats = targets[l]
        if feats is not None:  # = distance(rgb, target), the target's half already computed
            d = distance.distance_from_features(distance.features(rgb), feats)
        else:
            d = distance(rgb, target)
        if pixel_weight:
            d = d + pixel_weight * (rgb - target).abs().flatten(1).mean(1)
        per_level.append(d)
    return torch.stack(per_level, 1)
