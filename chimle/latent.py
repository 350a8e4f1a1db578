"""Division of the latent code into per-level components (CHIMLE Sect. 2.2, "Division of latent code").

The code z of a Tower Implicit Model with L levels is split into L components z_1..z_L, ordered
from the coarsest level to the finest. Component z_l feeds level l only:

    z_l = (style_l, noise_l)
      style_l : (N, code_dim)                  global code, drives the mapping network (global stream);
                (N, code_dim, G, G) with `TowerConfig.style_grid` G > 1: a G x G grid of style vectors
                spread over the image, so the style can differ by region
      noise_l : (N, noise_channels, h_l, w_l)  spatial noise at level l's input resolution (local stream)

A batch of codes is a plain ``list[Component]`` (one entry per level, possibly fewer than L for a
partial code). Everything here is a pure function of tensors, so the search can replace one level's
component, repeat codes for m candidates, or pick the winners without touching the model.

    layout = LatentLayout(code_dim=128, noise_channels=5, sizes=[(32, 32), (64, 64)])
    codes = layout.sample(4, generator=torch.Generator().manual_seed(0))
    codes = replace(codes, level=2, component=layout.sample_level(2, 4))
    z = flatten(codes)                      # (4, n) with n = sum_l k_l
    assert all(torch.equal(a.noise, b.noise) for a, b in zip(unflatten(z, layout), codes))
    frames = interpolate(index(codes, [0]), index(codes, [1]), steps=16)   # 16 codes from row 0 to row 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Component",
    "Codes",
    "LatentLayout",
    "replace",
    "repeat",
    "index",
    "cat",
    "flatten",
    "unflatten",
    "to",
    "to_authors",
    "from_authors",
    "slerp",
    "interpolate",
]


class Component(NamedTuple):
    """The latent component z_l of one level for a batch."""

    style: Tensor  # (N, code_dim), or (N, code_dim, G, G) for a style grid G > 1
    noise: Tensor  # (N, noise_channels, h_l, w_l)


Codes = list[Component]


@dataclass(frozen=True)
class LatentLayout:
    """Shapes of the components z_1..z_L for one input size (the noise follows the level's resolution)."""

    code_dim: int
    noise_channels: int
    sizes: tuple[tuple[int, int], ...]  # (h_l, w_l) per level, coarsest first
    style_grid: int = 1  # G: each level's style is one vector (G = 1) or a G x G grid of them

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(tuple(s) for s in self.sizes))
        if self.style_grid < 1:
            raise ValueError(f"style_grid must be >= 1, got {self.style_grid}")

    @property
    def style_shape(self) -> tuple[int, ...]:
        """The shape of one style, without the batch: (code_dim,) or (code_dim, G, G)."""
        g = self.style_grid
        return (self.code_dim,) if g == 1 else (self.code_dim, g, g)

    @property
    def style_dim(self) -> int:
        """The number of dimensions of one level's style: code_dim * G * G."""
        return self.code_dim * self.style_grid**2

    @property
    def levels(self) -> int:
        return len(self.sizes)

    def dims(self) -> list[int]:
        """k_l, the number of dimensions of each component (sum = n, the size of z)."""
        return [self.style_dim + self.noise_channels * h * w for h, w in self.sizes]

    def sample_level(
        self, level: int, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Component:
        """Draw n i.i.d. N(0, I) components for `level` (1-based), on the generator's device, then moved to
        `device` (default: the generator's): torch draws only where its generator lives, and this way the
        same seed gives the same code whatever device the model is on."""
        h, w = self.sizes[level - 1]
        at = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
        style = torch.randn(n, *self.style_shape, generator=generator, device=at)
        noise = torch.randn(n, self.noise_channels, h, w, generator=generator, device=at)
        return Component(style.to(device or at), noise.to(device or at))

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        levels: int | None = None,
    ) -> Codes:
        """Draw n whole codes (components of levels 1..levels, default all)."""
        return [
            self.sample_level(l, n, generator, device)
            for l in range(1, (self.levels if levels is None else levels) + 1)
        ]

    def zeros(self, n: int, device: torch.device | str | None = None) -> Codes:
        """The all-zero code, used for the cIMLE pretraining stage (z = 0)."""
        return [
            Component(
                torch.zeros(n, *self.style_shape, device=device),
                torch.zeros(n, self.noise_channels, h, w, device=device),
            )
            for h, w in self.sizes
        ]


def replace(codes: Codes, level: int, component: Component) -> Codes:
    """A copy of `codes` whose component at `level` (1-based) is `component`; other levels untouched."""
    out = list(codes)
    if level == len(out) + 1:
        out.append(component)
    else:
        out[level - 1] = component
    return out


def repeat(codes: Codes, m: int) -> Codes:
    """Each code repeated m times in place: row i becomes rows i*m .. i*m+m-1."""
    return [Component(c.style.repeat_interleave(m, 0), c.noise.repeat_interleave(m, 0)) for c in codes]


def index(codes: Codes, idx: Tensor | Sequence[int] | slice) -> Codes:
    """Rows `idx` of every component."""
    if not codes:
        return []
    if not isinstance(idx, slice):
        idx = torch.as_tensor(idx, device=codes[0].style.device, dtype=torch.long)
    return [Component(c.style[idx], c.noise[idx]) for c in codes]


def channels_last(codes: Codes) -> Codes:
    """The same codes with the noise maps in channels-last memory layout (on CUDA the tower's
    activations are channels-last, which cuDNN's bf16 convolutions prefer)."""
    return [Component(c.style, c.noise.contiguous(memory_format=torch.channels_last)) for c in codes]


def cat(batches: Sequence[Codes]) -> Codes:
    """Concatenate batches of codes along the batch dimension."""
    return [
        Component(torch.cat([b[l].style for b in batches]), torch.cat([b[l].noise for b in batches]))
        for l in range(len(batches[0]))
    ]


def to(codes: Codes, device: torch.device | str, dtype: torch.dtype | None = None) -> Codes:
    return [Component(c.style.to(device, dtype), c.noise.to(device, dtype)) for c in codes]


def flatten(codes: Codes) -> Tensor:
    """z in R^n: the components concatenated in level order, each as (style.flatten(), noise.flatten())."""
    return torch.cat([torch.cat([c.style.flatten(1), c.noise.flatten(1)], 1) for c in codes], 1)


def unflatten(z: Tensor, layout: LatentLayout) -> Codes:
    """Inverse of `flatten` for a full code of `layout`."""
    if z.shape[1] != sum(layout.dims()):
        raise ValueError(f"code has {z.shape[1]} dims, layout expects {sum(layout.dims())}")
    out, offset = [], 0
    for h, w in layout.sizes:
        style = z[:, offset : offset + layout.style_dim].reshape(-1, *layout.style_shape)
        offset += layout.style_dim
        k = layout.noise_channels * h * w
        noise = z[:, offset : offset + k].reshape(-1, layout.noise_channels, h, w)
        offset += k
        out.append(Component(style, noise))
    return out


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """The point at t in [0, 1] on the arc from a to b, row by row (each row of a (N, ...) batch one vector):
    the direction moves along the great circle between the two directions, the norm linearly from |a| to |b|.

    Why not a straight line: a code is a draw of N(0, I) in many dimensions, and such draws lie on a thin
    shell of radius about sqrt(dim), in directions nearly orthogonal to each other. The midpoint of the
    straight line between two of them has norm about 0.71 of theirs, deep inside the shell, where the prior
    has almost no mass: the middle frames of a linear walk are outputs of codes the model never saw in
    training and fade towards its output at z = 0. Along the arc every point stays on the shell."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)
    ua, ub = fa / na.clamp_min(1e-12), fb / nb.clamp_min(1e-12)
    omega = torch.arccos((ua * ub).sum(1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    # (nearly) parallel directions: the arc is the segment
    near = so.abs() < 1e-6
    wa = torch.where(near, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / so.where(~near, 1))
    wb = torch.where(near, torch.full_like(so, t), torch.sin(t * omega) / so.where(~near, 1))
    u = wa * ua + wb * ub
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = u * ((1 - t) * na + t * nb)
    return out.to(a.dtype).view_as(a)


def interpolate(a: Codes, b: Codes, steps: int) -> list[Codes]:
    """`steps` codes from a to b, evenly spaced in t: frame i is at t = i / (steps - 1), frame 0 is a and
    the last frame b exactly (not up to rounding). a and b are batches of the same shape, row j of a walking
    to row j of b. Per level, the style vector and the noise map are interpolated on their own, each by
    `slerp`: each part is a Gaussian draw of its own size, so each stays on its own shell and every frame is
    a typical draw of the prior. The one interpolation of chimle: `chimle sample --interpolate`
    (`chimle.inference.sample.interpolate`) and the explorer page both walk these codes."""
    if steps < 2:
        raise ValueError(f"interpolation needs at least 2 frames, got {steps}")
    if len(a) != len(b) or any(p.noise.shape != q.noise.shape or p.style.shape != q.style.shape for p, q in zip(a, b)):
        raise ValueError("the two codes have different shapes (samples of different inputs?)")
    frames = [list(a)]
    for i in range(1, steps - 1):
        t = i / (steps - 1)
        frames.append([Component(slerp(p.style, q.style, t), slerp(p.noise, q.noise, t)) for p, q in zip(a, b)])
    return frames + [list(b)]


# The authors' layout (niopeng/CHIMLE, for towers converted from their checkpoints): one flat tensor per level,
# code_l of shape (N, code_dim + noise_channels * h_l * w_l), read by their forward as
#     style = code_l[:, :code_dim]
#     noise = code_l[:, code_dim:].reshape(N, noise_channels, h_l, w_l)
# i.e. exactly one of our components flattened (row-major C, H, W). The noise sizes agree too: theirs are
# (h, w) * 2^(l-1) of the first level's input, which is `LatentLayout.sizes` for both layouts.


def to_authors(codes: Codes) -> list[Tensor]:
    """Our components -> the authors' per-level flat codes [(N, code_dim + noise_channels * h_l * w_l), ...]."""
    if any(c.style.ndim != 2 for c in codes):
        raise ValueError("the authors' codes have one style vector per level: model.style_grid > 1 has no such layout")
    return [torch.cat([c.style, c.noise.flatten(1)], 1) for c in codes]


def from_authors(flat: Sequence[Tensor], layout: LatentLayout) -> Codes:
    """The authors' per-level flat codes (levels 1..k, k <= layout.levels, as their partial codes) -> our
    components. Inverse of `to_authors`; the tensors are viewed, not copied, where they are contiguous."""
    if layout.style_grid != 1:
        raise ValueError("the authors' codes have one style vector per level: model.style_grid > 1 has no such layout")
    if not 1 <= len(flat) <= layout.levels:
        raise ValueError(f"expected 1..{layout.levels} per-level codes, got {len(flat)}")
    out = []
    for l, (code, (h, w), k) in enumerate(zip(flat, layout.sizes, layout.dims()), 1):
        if code.ndim != 2 or code.shape[1] != k:
            raise ValueError(
                f"level {l}: the authors' code must be (N, {k}) = (N, {layout.code_dim} + "
                f"{layout.noise_channels} x {h} x {w}), got {tuple(code.shape)}"
            )
        out.append(
            Component(code[:, : layout.code_dim], code[:, layout.code_dim :].reshape(-1, layout.noise_channels, h, w))
        )
    return out
