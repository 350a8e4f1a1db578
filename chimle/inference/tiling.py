"""Tiled inference: run a Tower Implicit Model on images too large to process at once.

The input is cut into overlapping tiles; every tile runs the whole tower with the matching crop of
every level's noise (the noise lives at each level's input resolution, so a tile at input offset
(i, j) reads level l's noise at (i, j) * (level size / input size)); the global style codes are
shared. A style grid (`TowerConfig.style_grid` > 1) spans the whole image: every tile's AdaINs use the
window of the grid's upsampled gamma and beta under the tile (`chimle.model.style_map`), computed for
that window alone. The last level's outputs are blended into one canvas with cosine ramps across the overlaps
(weights normalised to sum to 1), so seams do not show.

    hw = tiling.padded_hw(model, (h, w))                 # the size the codes must be drawn for
    codes = model.sample_codes(1, g, input_hw=hw)
    y = tiled_forward(model, x, codes, tile=256, overlap=64)           # (N, C, h * s, w * s)
    y = tiled_forward(model, x, codes, tile=auto_tile(model, (h, w), "4GB"), overlap=64)
    for row, rows in tiled_bands(model, x, codes, tile=256, overlap=64):   # the same, a band at a time
        ...                                                                 # (N, C, r, w * s): rows row..row+r

Whole-image statistics. Every AdaIN normalises its feature by the mean and variance over the whole
image. A tile on its own would use its own statistics, and its tone would drift from its neighbours'
(a tile of sky is normalised differently from a tile of grass). `stats` picks what the tiles share:
  "lowres" (default)  one extra pass over a copy of the input downsampled by `lowres_factor` (a power
                      of 2; by default the smallest that makes it fit in one tile), with the noise
                      subsampled at the same stride (noise[..., ::f, ::f], which keeps it i.i.d.
                      N(0, 1)) and the style codes unchanged; its statistics are imposed on every
                      tile. This is an approximation: features of a downsampled image have nearly
                      but not exactly the statistics of the full-resolution ones (the convolutions
                      see content at another scale). tests/test_tiling.py measures how close it is.
  "aggregate"         two tiled passes: the first records every tile's statistics and combines them
                      into whole-image ones (law of total variance, each tile weighted by the area it
                      contributes), the second imposes them. Twice the cost of "lowres" but usually
                      closer (see below). Also an approximation: a tile's statistics at one AdaIN are
                      measured after per-tile normalisation at the earlier ones, and include its border.
  "full"              statistics of an untiled pass; exact away from the seams, but needs the image
                      to fit at once (used to validate the tiling itself).
  "tile"              each tile's own statistics: the naive way, kept for comparison.

Measured on the random-init "tiny" tower and bundled photos (tests/test_tiling.py; mean abs error of
the [0, 1] output against the untiled pass): 384 px "same", tiles of 128, overlap 32: full 1.2e-4,
lowres 1.4e-3 to 1.9e-3, aggregate 1.1e-3 to 1.9e-3, tile 9.5e-3 to 1.1e-2; 8x SR of 128 px, tiles of
48, overlap 12: full 2.8e-5, lowres 1.0e-3, aggregate 4.2e-4, tile 1.7e-3 to 2.2e-3. "lowres" needs the
downsampled copy to keep some size: for tiny inputs (40 px, copy at 20 px) it is no better than "tile".

Tile borders see zero padding where the untiled network would see the neighbouring content, so a
band along each tile edge is wrong. On the random-init "tiny" tower, tiles with "full" statistics
agree with the untiled pass to ~3e-7 beyond 20 input px of a tile edge ("same" layout, whose first
level works at 1/2^(L-1) of the resolution) or 8 input px (64 output px, 8x SR). A trained tower
has a wider effective receptive field (its residual branches are no longer scaled near zero), so
give the overlap room: a quarter of the tile is a reasonable default.

Memory. The tiles run one at a time (their activations are what `auto_tile` fits into a budget); their
blended output is accumulated one band (a row of tiles) at a time: once a band is done, the rows that
no later band overlaps are final and leave (`tiled_bands` yields them, `tiled_forward` copies them
into its result). Besides the tiles, the codes and the input, a pass holds one band's accumulator:
float32 x C x (tile x s) rows x (W x s) columns, and 1-D blending weights (the ramps are separable, so
the weights of the whole canvas are an outer product of two vectors). `tiled_forward` adds its float32
result; `chimle sample --tile` (`inference.files`) streams the bands into the PNG instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from ..latent import Codes, Component
from ..memory import bytes_per_row, parse_bytes
from ..model import LevelState, NormStats, TowerModel
from ..resample import resize

__all__ = ["tiled_forward", "tiled_bands", "auto_tile", "padded_hw", "pad_to_tower", "tile_starts", "blend_ramp"]

Stats = Literal["lowres", "aggregate", "full", "tile"]


def _align(model: TowerModel) -> int:
    """Tile sides and offsets must be multiples of this so every level's crop lands on whole pixels."""
    return 2 ** (model.cfg.levels - 1) if model.cfg.layout == "same" else 1


def padded_hw(model: TowerModel, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The input size after reflect padding to what the tower accepts: draw the codes for this size."""
    a = _align(model)
    return tuple(-(-s // a) * a for s in input_hw)  # type: ignore[return-value]


def pad_to_tower(x: Tensor, model: TowerModel) -> tuple[Tensor, tuple[int, int]]:
    """Reflect-pad an input so its sides suit the tower ("same" layout: multiples of 2^(L-1))."""
    h, w = x.shape[-2:]
    if model.cfg.layout == "upscale":
        return x, (h, w)
    f = 2 ** (model.cfg.levels - 1)
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Evenly spaced tile offsets covering [0, size): first 0, last size - tile, all multiples of
    `align`, as few as possible with every neighbouring pair overlapping by at least `overlap`."""
    if tile >= size:
        return [0]
    s, t, o = size // align, tile // align, -(-overlap // align)  # work in units of `align`
    if o >= t:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    n = -(-(s - o) // (t - o))
    # floor(i * (s - t) / (n - 1)) steps by at most ceil((s - t) / (n - 1)) <= t - o: overlap >= o.
    return [i * (s - t) // (n - 1) * align for i in range(n)]


def blend_ramp(n: int, left: int, right: int, device: torch.device | None = None) -> Tensor:
    """1-D weights of one tile side of length n: cosine ramps, ~0 at the edge, over the `left` and
    `right` overlaps with the neighbouring tiles, 1 elsewhere."""
    w = torch.ones(n, device=device)
    for k, side in ((left, slice(0, left)), (right, slice(n - right, n))):
        if k > 0:
            r = torch.sin(0.5 * math.pi * (torch.arange(k, device=device) + 0.5) / k) ** 2
            w[side] = torch.minimum(w[side], r if side.start == 0 else r.flip(0))
    return w


def auto_tile(model: TowerModel, input_hw: tuple[int, int], memory_budget: int | str, batch: int = 1) -> int:
    """The largest square tile side (in input pixels) whose inference fits in `memory_budget` bytes for
    `batch` images, by the search's activation estimate (`chimle.memory.bytes_per_row`); never larger
    than the (padded) image and never smaller than the tower's alignment."""
    a, budget = _align(model), parse_bytes(memory_budget)
    levels = range(1, model.cfg.levels + 1)
    tile = a
    for t in range(a, max(padded_hw(model, input_hw)) + a, a):
        if batch * bytes_per_row(model, levels, (t, t)) > budget:
            break
        tile = t
    return tile


def _subsample(noise: Tensor, size: tuple[int, int]) -> Tensor:
    """Pick a grid of noise samples (stride in/out): a subset of i.i.d. N(0, 1) values stays N(0, 1),
    unlike an average, which would shrink the variance. Equals noise[..., ::f, ::f] when f divides."""
    h, w = noise.shape[-2:]
    rows = torch.arange(size[0], device=noise.device) * h // size[0]
    cols = torch.arange(size[1], device=noise.device) * w // size[1]
    return noise.index_select(-2, rows).index_select(-1, cols)


def _record_stats(model: TowerModel, x: Tensor, codes: Codes) -> list[NormStats]:
    rec = [NormStats() for _ in range(model.cfg.levels)]
    model(x, codes, stats=rec)
    return [NormStats(r.values, fixed=True) for r in rec]


def _lowres_stats(model: TowerModel, x: Tensor, codes: Codes, factor: int) -> list[NormStats]:
    """Statistics of one pass over x downsampled by `factor`, with the noise subsampled to match."""
    h, w = x.shape[-2:]
    a = _align(model)
    small = (max(a, h // factor // a * a), max(a, w // factor // a * a))  # keep the tower's alignment
    sizes = model.cfg.level_sizes(*small)
    low_codes = [Component(c.style, _subsample(c.noise, s)) for c, s in zip(codes, sizes)]
    return _record_stats(model, resize(x, small), low_codes)


@torch.inference_mode()
def tiled_forward(
    model: TowerModel,
    x: Tensor,
    codes: Codes,
    tile: int,
    overlap: int,
    stats: Stats = "lowres",
    lowres_factor: int | None = None,
) -> Tensor:
    """The last level's output (N, C, H * s, W * s) of x (N, C_in, H, W), computed tile by tile.

    `tile` and `overlap` are in input pixels (rounded to the tower's alignment: 2^(L-1) for the "same"
    layout). `codes` are whole codes for the padded input, `model.latent_layout(padded_hw(model, (H, W)))`.
    x and the result stay on x's device (the CPU can hold a big canvas); tiles run on the model's device.
    """
    out: Tensor | None = None
    for row, rows in tiled_bands(model, x, codes, tile, overlap, stats, lowres_factor):
        if out is None:
            h, w = x.shape[-2:]
            out = rows.new_empty(*rows.shape[:2], h * model.cfg.scale, w * model.cfg.scale)
        out[..., row : row + rows.shape[-2], :] = rows
    assert out is not None
    return out


@torch.inference_mode()
def tiled_bands(
    model: TowerModel,
    x: Tensor,
    codes: Codes,
    tile: int,
    overlap: int,
    stats: Stats = "lowres",
    lowres_factor: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """`tiled_forward`'s output a band at a time, top to bottom: (row, rows) with rows (N, C, r, W * s)
    the final values of output rows [row, row + r) (float, on x's device). Together the bands cover the
    H * s rows exactly once; only one band's accumulator is held (see "Memory" above)."""
    if stats not in ("lowres", "full", "tile", "aggregate"):
        raise ValueError(f"stats must be 'lowres', 'full', 'tile' or 'aggregate', got {stats!r}")
    if len(codes) != model.cfg.levels:
        raise ValueError(f"need one code component per level ({model.cfg.levels}), got {len(codes)}")
    cfg, dev, a = model.cfg, model.device, _align(model)
    h0, w0 = x.shape[-2:]
    x, _ = pad_to_tower(x, model)
    h, w = x.shape[-2:]
    want = model.latent_layout((h, w)).sizes
    if tuple(tuple(c.noise.shape[-2:]) for c in codes) != want:
        raise ValueError(
            f"codes are laid out for noise sizes {[tuple(c.noise.shape[-2:]) for c in codes]}, but the "
            f"padded input {h}x{w} needs {list(want)}: draw them for tiling.padded_hw(model, (H, W))"
        )
    tile = max(a, tile // a * a)
    th, tw, s = min(tile, h), min(tile, w), cfg.scale
    ys, xs = tile_starts(h, th, overlap, a), tile_starts(w, tw, overlap, a)
    level_sizes = cfg.level_sizes(h, w)
    level_scale = [lh / h for lh, _ in level_sizes]  # noise resolution / input resolution
    # The input pyramid of the whole image, cropped per tile, so that a tile's coarse inputs are exactly
    # the untiled ones (downsampling each tile on its own would differ near its borders).
    pyramid = model.initial_state(x).inputs

    def run(y0: int, x0: int, norm: list[NormStats] | None) -> Tensor:
        state = LevelState([_crop(p, y0, x0, th, tw, p.shape[-2] / h).to(dev) for p in pyramid], None, [], None)
        for l, c in enumerate(codes, 1):
            z = Component(c.style.to(dev), _crop(c.noise, y0, x0, th, tw, level_scale[l - 1]).to(dev))
            region = (round(y0 * level_scale[l - 1]), round(x0 * level_scale[l - 1]), *level_sizes[l - 1])
            state = model.step(l, state, z, None if norm is None else norm[l - 1], region)
        return state.output.float().to(x.device)

    def ramp(starts: list[int], k: int, size: int) -> Tensor:
        # Ramps only towards neighbouring tiles: the image border keeps full weight.
        before = (starts[k - 1] + size - starts[k]) * s if k > 0 else 0
        after = (starts[k] + size - starts[k + 1]) * s if k + 1 < len(starts) else 0
        return blend_ramp(size * s, before, after, x.device)

    ramps_y = [ramp(ys, i, th) for i in range(len(ys))]
    ramps_x = [ramp(xs, j, tw) for j in range(len(xs))]
    # A tile's weights are ramp_y[i] x ramp_x[j], so the canvas's total weight is an outer product too.
    total_y, total_x = torch.zeros(h * s, device=x.device), torch.zeros(w * s, device=x.device)
    for y0, r in zip(ys, ramps_y):
        total_y[y0 * s : (y0 + th) * s] += r
    for x0, r in zip(xs, ramps_x):
        total_x[x0 * s : (x0 + tw) * s] += r

    grid = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    # Weight norm recomputes every conv weight on each access: compute them once for all tiles.
    with parametrize.cached():
        shared: list[NormStats] | None = None
        whole = lambda: (x.to(dev), [Component(c.style.to(dev), c.noise.to(dev)) for c in codes])  # noqa: E731
        if stats == "full":
            shared = _record_stats(model, *whole())
        elif stats == "lowres":
            f = lowres_factor or 2 ** max(0, math.ceil(math.log2(max(h, w) / tile)))
            shared = _lowres_stats(model, *whole(), f)
        elif stats == "aggregate":
            per_tile = []
            for i, j in grid:
                rec = [NormStats() for _ in codes]
                run(ys[i], xs[j], rec)
                per_tile.append((rec, float(ramps_y[i].sum() * ramps_x[j].sum())))
            shared = _combine(per_tile)
        carry: Tensor | None = None  # rows of the previous band that this band overlaps, accumulated
        for i, y0 in enumerate(ys):
            band = torch.zeros(x.shape[0], cfg.out_channels, th * s, w * s, device=x.device)
            if carry is not None:
                band[..., : carry.shape[-2], :] = carry
            for j, x0 in enumerate(xs):
                band[..., x0 * s : (x0 + tw) * s] += ramps_y[i][:, None] * ramps_x[j] * run(y0, x0, shared)
            done = (ys[i + 1] - y0) * s if i + 1 < len(ys) else th * s  # rows no later band touches
            carry = band[..., done:, :].clone() if i + 1 < len(ys) else None
            top, bottom = y0 * s, min(y0 * s + done, h0 * s)  # the reflect-padded rows are cropped
            if bottom > top:
                rows = band[..., : bottom - top, : w0 * s] / (total_y[top:bottom, None] * total_x[: w0 * s])
                yield top, rows
            del band


def _combine(per_tile: list[tuple[list[NormStats], float]]) -> list[NormStats]:
    """Whole-image statistics from per-tile ones, each tile weighted by the area it contributes:
    mean = E[mean_t], var = E[var_t + (mean_t - mean)^2] (law of total variance)."""
    total = sum(wt for _, wt in per_tile)
    out = []
    for l in range(len(per_tile[0][0])):
        values = []
        for k in range(len(per_tile[0][0][l].values)):
            mean = sum(wt * rec[l].values[k][0] for rec, wt in per_tile) / total
            var = sum(wt * (rec[l].values[k][1] + (rec[l].values[k][0] - mean) ** 2) for rec, wt in per_tile) / total
            values.append((mean, var))
        out.append(NormStats(values, fixed=True))
    return out


def _crop(t: Tensor, y0: int, x0: int, th: int, tw: int, scale: float) -> Tensor:
    """The region of t (at `scale` x the input resolution) under the input tile (y0, x0, th, tw)."""
    y, x, hh, ww = (round(v * scale) for v in (y0, x0, th, tw))
    return t[..., y : y + hh, x : x + ww]
