"""Resampling of images in [0, 1]: the one bicubic resize behind every level pyramid.

The tower's input pyramid ("same" layout), each level's target (intermediate supervision, the
search's partial evaluation) and the tasks' degradations (super-resolution inputs) all shrink images
with the same antialiased bicubic filter, so what a level is judged against is exactly what it is fed.

    y_l = resize(y, (h_l, w_l))                    # a level's target
    x = downsample(y, 8, quantize=True)            # an 8x super-resolution input, as if read from a PNG
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize", "quantize8", "downsample"]

Size = tuple[int, int]


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Antialiased bicubic resize of (C, H, W) or (N, C, H, W) to ``size`` = (h, w).

    Clamped to [0, 1] because bicubic overshoots at edges. Returns ``x`` itself when it already has
    that size.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(x[None] if x.ndim == 3 else x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return (y[0] if x.ndim == 3 else y).clamp_(0, 1)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """Snap [0, 1] values to the 256 levels of an 8-bit file, rounding to nearest."""
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


def downsample(
    x: torch.Tensor, factor: int | None = None, *, size: Size | None = None, quantize: bool = False
) -> torch.Tensor:
    """Shrink by an integer ``factor`` (H and W must divide exactly) or to ``size``.

    ``quantize=True`` rounds to 8-bit levels as if the result had been saved as a PNG.
    """
    if (factor is None) == (size is None):
        raise ValueError("downsample: give exactly one of factor or size")
    if factor is not None:
        h, w = x.shape[-2:]
        if factor < 1 or h % factor or w % factor:
            raise ValueError(f"downsample: size {h}x{w} is not divisible by factor {factor}")
        size = (h // factor, w // factor)
    y = resize(x, size)
    return quantize8(y) if quantize else y
