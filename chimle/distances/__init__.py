"""Distances between images in [0, 1], by config name: one registry for the search and the loss.

d = make_distance("vgg")          # LPIPS-VGG (CHIMLE / TIM), "alex" (LPIPS-AlexNet),
                                  # "pixel_vgg" / "vgg_l1" (cIMLE's SR / scene-layout metrics),
                                  # "l2" (pixel MSE: the MNIST illustration)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..loss import l2
from .lpips import LPIPS, find_weights
from .vgg import PixelVGGDistance, VGGFeatureL1Distance

__all__ = ["DISTANCES", "make_distance", "LPIPS", "PixelVGGDistance", "VGGFeatureL1Distance", "find_weights", "PixelL2"]


class PixelL2(nn.Module):
    """Mean squared pixel error per image (`chimle.loss.l2`) as a module, like the other distances."""

    def forward(self, a, b):
        return l2(a, b)


DISTANCES: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: LPIPS("vgg"),
    "alex": lambda: LPIPS("alex"),
    "pixel_vgg": PixelVGGDistance,
    "vgg_l1": VGGFeatureL1Distance,
    "l2": PixelL2,
}


def make_distance(name: str) -> nn.Module:
    """A distance by config name (see the module docstring)."""
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}")
    return DISTANCES[name]()
