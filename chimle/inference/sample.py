"""Sampling: many different outputs per input, sample grids, and the papers' latent-code tricks.

At test time every level's component is drawn independently (CHIMLE Sect. 2.2). Options:
  from_level=k   keep the components of levels < k fixed and redraw levels >= k, so coarse content
                 stays and finer detail varies (CHIMLE appendix Fig. 9: local vs global variation);
  same_code      one code for every input: a consistent "style" across inputs (cIMLE Fig. 12); in
                 `sample_paths` every file replays the same draws, so sample k shares its code;
  interpolate    a sequence of outputs between two codes (cIMLE Fig. 11), along the arc (slerp).

`back_project` is optional post-processing, off by default (`chimle sample --project`): it replaces a
super-resolution sample's low frequencies by the input's, as Explorable SR's consistency enforcement does.

    samples = generate(model, x, num=8, generator=torch.Generator().manual_seed(0), task=task)
    frames = interpolate(model, x, steps=16, generator=g, task=task)

Grids and files: `chimle.inference.figures`, `chimle.inference.files` (`chimle sample`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from .. import latent
from ..data.tasks import Task
from ..latent import Codes
from ..model import TowerModel
from .tiling import tiled_forward

__all__ = ["generate", "draw_codes", "interpolate", "redraw_from", "eval_mode", "back_project"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in (a training loop that
    draws sample grids must not find its model switched)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def redraw_from(
    model: TowerModel, codes: Codes, level: int, generator: torch.Generator | None, input_hw: tuple[int, int]
) -> Codes:
    """`codes` with the components of levels >= `level` redrawn (levels < `level` unchanged)."""
    layout = model.latent_layout(input_hw)
    n = codes[0].style.shape[0]
    out = list(codes)
    for l in range(level, model.cfg.levels + 1):
        out = latent.replace(out, l, layout.sample_level(l, n, generator, model.device))
    return out


def draw_codes(
    model: TowerModel,
    x: Tensor,
    num: int,
    generator: torch.Generator | None = None,
    *,
    from_level: int | None = None,
    same_code: bool = False,
) -> Iterator[Codes]:
    """The codes of `num` samples per input of x (N, C, h, w), one sample's codes (N inputs) at a time: the
    one order in which sampling draws from `generator` (`generate`, and `chimle sample --tile`, which streams
    each sample into its file), so the same seed gives the same samples whichever path runs them.

    Default: a fresh code per input and sample. from_level=k: one code per input is drawn first, and every
    sample redraws its levels >= k (levels < k shared by the samples, CHIMLE appendix Fig. 9). same_code:
    sample k uses one code for every input (cIMLE Fig. 12)."""
    n, hw = x.shape[0], tuple(x.shape[-2:])
    if from_level is not None and not 1 <= from_level <= model.cfg.levels:
        raise ValueError(f"from_level must be in 1..{model.cfg.levels}, got {from_level}")
    base = model.sample_codes(n, generator, input_hw=hw) if from_level is not None else None
    for _ in range(num):
        if base is not None:
            yield redraw_from(model, base, from_level, generator, hw)
        elif same_code:
            yield latent.repeat(model.sample_codes(1, generator, input_hw=hw), n)
        else:
            yield model.sample_codes(n, generator, input_hw=hw)


@torch.inference_mode()
def generate(
    model: TowerModel,
    x: Tensor,
    num: int,
    generator: torch.Generator | None = None,
    *,
    task: Task | None = None,
    from_level: int | None = None,
    same_code: bool = False,
    all_levels: bool = False,
    tile: int | None = None,
    overlap: int | None = None,
) -> Tensor:
    """`num` samples per input: (num, N, 3, H, W) RGB in [0, 1] (or every level's, if all_levels).

    The codes are `draw_codes`'s: from_level=k keeps levels < k of one code per input and redraws the
    others; same_code: sample k uses one code for every input.
    tile: run the tower tile by tile (`chimle.inference.tiling`, tiles of `tile` input px overlapping by
    `overlap`, default tile // 4) so that large images fit in memory; last level only. The codes are
    the same as untiled, so a tiled sample matches its untiled twin away from the seams.
    `task.rgb` turns outputs into RGB (colourisation); without a task they are returned as they are.
    The model runs in eval mode and is left in the mode it was in.
    """
    if tile is not None and all_levels:
        raise ValueError("tiled sampling returns the last level only (all_levels=False)")
    codes = draw_codes(model, x, num, generator, from_level=from_level, same_code=same_code)
    x = x.to(model.device)
    with eval_mode(model):
        results = []
        for c in codes:
            if tile is not None:
                outs = [tiled_forward(model, x, c, tile, tile // 4 if overlap is None else overlap)]
            else:
                outs = model(x, c)
            outs = [o if task is None else task.rgb(o, x) for o in outs]
            results.append(outs if all_levels else outs[-1])
        if all_levels:
            return [torch.stack([r[l] for r in results]) for l in range(len(results[0]))]
        return torch.stack(results)


@torch.inference_mode()
def interpolate(
    model: TowerModel,
    x: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    *,
    task: Task | None = None,
    codes: tuple[Codes, Codes] | None = None,
) -> Tensor:
    """Outputs along the arc between two codes (`chimle.latent.interpolate`, slerp per level of the style and
    the noise, the interpolation the explorer page makes too): (steps, N, 3, H, W), frame 0 the output of the
    first code and the last frame that of the second. Without `codes`, the two are those of samples 0 and 1 of
    `generate` with the same generator (`draw_codes`). Each frame runs as one batch of the N inputs."""
    if codes is None:
        codes = tuple(draw_codes(model, x, 2, generator))
    x = x.to(model.device)
    frames = []
    with eval_mode(model), parametrize.cached():
        for z in latent.interpolate(*codes, steps):
            out = model(x, latent.to(z, model.device))[-1]
            frames.append(out if task is None else task.rgb(out, x))
    return torch.stack(frames)


@torch.no_grad()
def back_project(samples: Tensor, x: Tensor, task: Task, iters: int = 20) -> Tensor:
    """Super-resolution samples (..., N, 3, H, W) made consistent with their inputs x (N, 3, h, w).

    Iterative back-projection (Irani & Peleg 1991): s <- s + up(x - observe(s)), `observe` the task's
    bicubic downsample and `up` the bicubic upsample, so the sample's low frequencies converge to the
    input's and its high frequencies (the model's detail) stay. Post-processing, not the model: the
    consistency of the models themselves is measured without it (README, "Shipped models").
    """
    if task.name != "sr":
        raise ValueError(f"back-projection is defined for super-resolution, not {task.name!r}")
    shape = samples.shape
    s = samples.reshape(-1, *shape[-3:]).float()
    xx = x.to(s).repeat(s.shape[0] // x.shape[0], 1, 1, 1)
    for _ in range(iters):
        err = xx - task.observe(s)
        s = (s + F.interpolate(err, size=shape[-2:], mode="bicubic", align_corners=False)).clamp(0, 1)
    return s.reshape(shape).to(samples.dtype)
