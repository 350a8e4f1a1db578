"""A probe of why a style grid does not make colourisation's modes regional: Algorithm 1 with a choice per region.

    python benchmarks/regional_pick.py train --config CONFIG.yaml --out RUN [chimle train's options]
    python benchmarks/colour_modes.py RUN/checkpoints/last.pt

With `model.style_grid` G > 1, the plain search keeps, at each level, the candidate whose whole partial
output is nearest the target; with G x G independent regional styles almost no candidate has every region
right. This probe trains with a search that judges each candidate cell by cell (LPIPS' spatial map pooled
to the grid) and gives every cell the style vector and the noise of the candidate best *in that cell*,
then the next level builds on that composed code. With one style vector (the papers' tower, as for 8x SR)
only the noise is chosen cell by cell (`NOISE_CELLS`), the style being the best whole candidate's. It
patches `chimle.search.hierarchical` for this process only (a probe, not a method of the library: its
picks are not replayable, so such a run cannot `--resume` mid-round). docs/research.md has what it measured.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from chimle import latent, search
from chimle.distances.lpips import LPIPS

# With one style vector (style_grid 1) the style is the whole candidate's and only the spatial noise is
# chosen per cell, on this grid: a composed noise map is still an i.i.d. N(0, I) draw, as the prior's.
NOISE_CELLS = 4


def cell_distances(lp: LPIPS, fa: list[torch.Tensor], fb: list[torch.Tensor], g: int) -> torch.Tensor:
    """(N, G, G): LPIPS' spatial map (`distance_from_features` without the spatial average) pooled to the
    G x G grid, i.e. the average of LPIPS over each cell."""
    spatial = copy.copy(lp)  # the same weights, only the map kept
    spatial.spatial_average = False
    # the map at 4G x 4G first: the deepest taps of a small level can be smaller than the grid
    return F.adaptive_avg_pool2d(spatial.distance_from_features(fa, fb, size=(4 * g, 4 * g)), g)[:, 0]


def regional(model, x, y, distance, samples_per_level, generator=None, *, to_rgb=None, **_) -> search.Selection:
    """Algorithm 1 with each grid cell's component chosen on its own (see the module docstring)."""
    sc = search.Scorer(model, x, y, distance, to_rgb, None)
    n, style_grid = x.shape[0], sc.layout.style_grid > 1
    g = sc.layout.style_grid if style_grid else NOISE_CELLS
    chosen, picks, prefix = [], [], sc.initial
    with sc.context():
        for l, m in enumerate(samples_per_level, 1):
            z = sc.layout.sample_level(l, n * m, generator, sc.device)
            rows = torch.arange(n * m, device=sc.device) // m
            s = sc.step(l, prefix.index(rows), z)
            out = s.output if to_rgb is None else to_rgb(s.output, s.inputs[-1])
            target = [f.index_select(0, rows) for f in sc._target(l)]
            d = cell_distances(distance, distance.features(out.float()), target, g).view(n, m, g, g)
            best = d.argmin(1)  # (N, G, G): the winning candidate of every cell
            whole = d.mean((2, 3)).argmin(1)  # (N,): the best whole candidate
            style = z.style.view(n, m, *z.style.shape[1:])
            if style_grid:
                style = style.gather(1, best[:, None, None].expand(n, 1, style.shape[2], g, g))[:, 0]
            else:  # one style vector: the whole candidate's; only the noise per cell
                style = style[torch.arange(n, device=sc.device), whole]
            noise = z.noise.view(n, m, *z.noise.shape[1:])
            h, w = noise.shape[-2:]
            cell = F.interpolate(best[:, None].float(), size=(h, w), mode="nearest").long()  # each pixel's cell
            noise = noise.gather(1, cell[:, None].expand(n, 1, noise.shape[2], h, w))[:, 0]
            chosen.append(latent.Component(style.contiguous(), noise.contiguous()))
            picks.append(whole)  # stored by checkpoints; not enough to replay the composition
            prefix = sc.step(l, prefix, chosen[-1])
        dists = sc.score(sc.initial, 1, chosen, 1)[:, 0]
    codes = [latent.Component(c.style.clone(), c.noise.clone()) for c in chosen]
    return search.Selection(codes, dists.float(), torch.stack(picks, 1))


if __name__ == "__main__":
    from chimle.apps.cli import main

    search.hierarchical = regional  # search.run, and so the trainer, look it up here
    sys.argv = ["chimle", *sys.argv[1:]]
    sys.exit(main())
