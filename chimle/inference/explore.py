"""Exploring the modes of a model: samples that keep their codes, variations from a level, walks
between two codes, and a guided search for the code whose output matches a user's hint.

The functions behind `chimle explore` (the page is `chimle.apps.explore_server`), usable from Python:

    inp = prepare(model, task, load_image("photo.png"), degrade=True)
    images, codes = draw_samples(model, inp.x, 8, seeded(0), task=task)           # (8, 3, H, W), 8 codes
    var_images, var_codes = vary(model, inp.x, latent.index(codes, [3]), level=2, num=8, generator=g, task=task)
    frames = render(model, inp.x, interpolate_codes(latent.index(codes, [0]), latent.index(codes, [1]), 16), task)
    found = guided_search(model, inp.x, hint, mask, [32, 16, 8], g, task=task, refine_steps=10)
    save_code("sample.npz", latent.index(codes, [3]), code_meta(model, task, inp))
    sample_with_code("weights.safetensors", "photo.png", "sample.npz", "out/")   # `chimle sample --code`

Every image here is RGB in [0, 1] at the model's output size for the (padded) input `x`; `Input.crop`
cuts the padding off. Outputs are rendered one code at a time (`render`), in the page and on the
command line alike, so that a downloaded code reproduces its PNG bit for bit: a batched forward may
round differently from a single one.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import latent
from ..data.imageio import load_image, save_image
from ..data.tasks import Task, make_task
from ..latent import Codes, Component
from ..memory import chunk_rows
from ..model import TowerModel
from ..resample import resize
from .sample import eval_mode, redraw_from
from .tiling import pad_to_tower
from .weights import load_with_task

__all__ = [
    "Input",
    "Found",
    "fit_size",
    "prepare",
    "render",
    "draw_samples",
    "vary",
    "slerp",
    "interpolate_codes",
    "MaskedL2",
    "hint_distance",
    "guided_search",
    "consistency",
    "code_meta",
    "save_code",
    "load_code",
    "check_code",
    "sample_with_code",
    "to_png_bytes",
    "CODE_FORMAT",
]

CODE_FORMAT = "chimle-code-1"


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Input:
    """A model input made from an image file, with what is needed to show and reproduce it."""

    x: Tensor  # (1, C, h, w): the model's input, padded to what the tower needs
    hw: tuple[int, int]  # the input's size before padding
    scale: int  # output side / input side
    degraded: bool  # True: x was made from the file by the task's degradation (the file is the target)
    target: Tensor | None = None  # (3, H, W): the real image when degraded, cropped to the outputs' size

    @property
    def output_hw(self) -> tuple[int, int]:
        """Size of the outputs once the padding is cut off."""
        return self.hw[0] * self.scale, self.hw[1] * self.scale

    def crop(self, images: Tensor) -> Tensor:
        """Outputs (..., H_padded, W_padded) -> (..., H, W) without the padding."""
        h, w = self.output_hw
        return images[..., :h, :w]

    def pad(self, image: Tensor) -> Tensor:
        """An image at `output_hw` (..., H, W) -> the padded output size, zeros in the padding (a mask
        padded this way ignores the padding)."""
        h, w = self.output_hw
        ph, pw = self.x.shape[-2] * self.scale - h, self.x.shape[-1] * self.scale - w
        return torch.nn.functional.pad(image, (0, pw, 0, ph)) if ph or pw else image


def fit_size(h: int, w: int, max_pixels: int) -> tuple[int, int]:
    """The size (h', w') of the same aspect with h' w' <= max_pixels, (h, w) itself when it fits: how the page
    scales a photo too large for the server's `--max-pixels`, recorded in the code's meta as `resize` so that
    `sample_with_code` scales the same file the same way."""
    if h * w <= max_pixels:
        return h, w
    f = math.sqrt(max_pixels / (h * w))
    return max(1, int(h * f)), max(1, int(w * f))


def prepare(model: TowerModel, task: Task | None, image: Tensor, degrade: bool = False, seed: int = 0) -> Input:
    """An image (3, H, W) in [0, 1] -> the model's input.

    degrade=True treats the image as a real full-resolution photo: the task makes the input from it (for
    super-resolution, after cropping the photo to a multiple of the scale) and the photo is kept as the
    target. Otherwise the image is the input itself (`Task.prepare_input`: lightness for colourisation).
    The input is padded (reflect) to what the tower needs; `Input.crop` cuts the outputs back.
    """
    target = None
    if degrade:
        if task is None or task.paired:
            raise ValueError("'degrade it first' needs a task that makes inputs from photos (sr, colorize, jpeg...)")
        s = task.scale
        h, w = (d - d % s for d in image.shape[-2:])
        if h < 1 or w < 1:
            raise ValueError(f"the image ({image.shape[-2]}x{image.shape[-1]}) is smaller than the scale {s}")
        target = image[:, :h, :w]
        x = task.degrade(target, seed)
    else:
        x = image if task is None else task.prepare_input(image)
    if x.shape[0] != model.cfg.in_channels:
        raise ValueError(f"the model takes {model.cfg.in_channels}-channel inputs, the task made {x.shape[0]}")
    xp, hw = pad_to_tower(x[None], model)
    return Input(xp, hw, model.cfg.scale, degrade, target)


# ---------------------------------------------------------------------------------------------
# Samples, variations, interpolation


Progress = Callable[[float, float], None]  # progress(done, total): may raise to stop the work (a cancel)


@torch.inference_mode()
def render(
    model: TowerModel, x: Tensor, codes: Codes, task: Task | None = None, progress: Progress | None = None
) -> Tensor:
    """The last level's output for every code of a batch, as RGB: (N, 3, H, W) for an input x (1, C, h, w).

    One code at a time (batch 1), whatever N: the page and `sample_with_code` then run the very same
    computation for a code, so a downloaded code reproduces its image exactly. `progress(i, N)` is called
    before each code and after the last."""
    x = x.to(model.device)
    out, n = [], codes[0].style.shape[0]
    with eval_mode(model), parametrize.cached():
        for i in range(n):
            if progress is not None:
                progress(i, n)
            y = model(x, latent.to(latent.index(codes, [i]), model.device))[-1]
            out.append(y if task is None else task.rgb(y, x))
    if progress is not None:
        progress(n, n)
    return torch.cat(out).float().cpu()


def draw_samples(
    model: TowerModel,
    x: Tensor,
    num: int,
    generator: torch.Generator | None = None,
    *,
    task: Task | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, Codes]:
    """`num` samples of one input x (1, C, h, w), every level's component drawn independently (as at test
    time): (images (num, 3, H, W), their codes (batch num, on the CPU))."""
    _check_one(x)
    codes = latent.to(model.sample_codes(num, generator, input_hw=tuple(x.shape[-2:])), "cpu")
    return render(model, x, codes, task, progress), codes


def vary(
    model: TowerModel,
    x: Tensor,
    codes: Codes,
    level: int,
    num: int,
    generator: torch.Generator | None = None,
    *,
    task: Task | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, Codes]:
    """`num` variations of one sample: its components z_1..z_{level-1} kept, z_level..z_L redrawn (level 1
    redraws everything; level L varies only the finest details). `codes` is that sample's code (batch 1).
    Returns (images (num, 3, H, W), codes (batch num))."""
    _check_one(x)
    if not 1 <= level <= model.cfg.levels:
        raise ValueError(f"level must be in 1..{model.cfg.levels}, got {level}")
    if codes[0].style.shape[0] != 1 or len(codes) != model.cfg.levels:
        raise ValueError(f"vary needs one whole code ({model.cfg.levels} levels, batch 1)")
    base = latent.repeat(latent.to(codes, model.device), num)
    # redraw_from draws on the generator's device; the CPU copy is what the page keeps and saves
    new = redraw_from(model, base, level, generator, tuple(x.shape[-2:]))
    new = latent.to(new, "cpu")
    return render(model, x, new, task, progress), new


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between rows of a and b (each row a vector), with the norm interpolated
    linearly. A straight line between two Gaussian draws passes near the origin (at t = 1/2 its norm is
    ~0.71 of theirs), where the prior has almost no mass, so the middle frames fade; along the arc every
    frame stays on the shell where draws of N(0, I) live."""
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


def interpolate_codes(a: Codes, b: Codes, steps: int) -> Codes:
    """`steps` codes from a to b (both batch 1; the ends are a and b exactly): per level, slerp of the
    style vector and of the noise map, each Gaussian on its own, so every frame is a typical draw of the
    prior (`slerp`). Returns a batch of `steps` codes."""
    if steps < 2:
        raise ValueError(f"interpolation needs at least 2 frames, got {steps}")
    if len(a) != len(b) or any(p.noise.shape != q.noise.shape or p.style.shape != q.style.shape for p, q in zip(a, b)):
        raise ValueError("the two codes have different shapes (samples of different inputs?)")
    frames = []
    for i in range(steps):
        t = i / (steps - 1)
        if i == 0 or i == steps - 1:  # the ends exactly, not up to rounding
            frames.append(a if i == 0 else b)
        else:
            frames.append([Component(slerp(p.style, q.style, t), slerp(p.noise, q.noise, t)) for p, q in zip(a, b)])
    return latent.cat(frames)


# ---------------------------------------------------------------------------------------------
# Guided search


class MaskedL2:
    """Mean squared pixel error over the painted pixels only: d(a, b) = sum m (a - b)^2 / (3 sum m), (N,).

    The mask (1, 1, H, W) in [0, 1] is given at full resolution and resized to each level's size as the
    search asks for it (antialiased, so a thin stroke becomes a faint weight at a coarse level rather
    than vanishing). A plain callable distance: `chimle.search.hierarchical` accepts it as it is."""

    def __init__(self, mask: Tensor):
        if mask.ndim != 4 or mask.shape[:2] != (1, 1):
            raise ValueError(f"mask must be (1, 1, H, W), got {tuple(mask.shape)}")
        self.mask = mask.float()
        self._sized: dict[tuple[int, int, torch.device], Tensor] = {}

    def at(self, hw: tuple[int, int], device: torch.device) -> Tensor:
        key = (int(hw[0]), int(hw[1]), device)
        if key not in self._sized:
            self._sized[key] = resize(self.mask, key[:2]).to(device)
        return self._sized[key]

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        m = self.at(tuple(a.shape[-2:]), a.device)
        err = (m * (a - b).pow(2)).flatten(1).sum(1)
        return err / (3 * m.sum()).clamp_min(1e-8)


def hint_distance(images: Tensor, hint: Tensor, mask: Tensor | None, distance: Callable | None = None) -> Tensor:
    """Distance of each image (N, 3, H, W) to the hint (1, 3, H, W): masked L2 on the painted pixels, or
    `distance` (LPIPS for a reference image) when there is no mask. (N,), float on the CPU."""
    if mask is not None:
        d = MaskedL2(mask)
    elif distance is not None:
        d = distance
    else:
        raise ValueError("a reference image needs a distance (e.g. chimle.LPIPS('alex'))")
    with torch.no_grad():
        return d(images.float(), hint.expand_as(images).to(images.device).float()).float().cpu()


class Found(NamedTuple):
    """What a guided search found, best first."""

    images: Tensor  # (k, 3, H, W)
    codes: Codes  # batch k, on the CPU
    distances: Tensor  # (k,): distance of each image to the hint (the masked one for a painted hint)


def guided_search(
    model: TowerModel,
    x: Tensor,
    hint: Tensor,
    mask: Tensor | None,
    samples_per_level: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    task: Task | None = None,
    k: int = 4,
    refine_steps: int = 0,
    prior_weight: float = 1.0,
    lr: float = 0.05,
    distance: Callable | None = None,
    progress: Progress | None = None,
    on_best: Callable[[int, Tensor, Tensor], None] | None = None,
    memory_budget: int | str | None = 256 << 20,
) -> Found:
    """The codes whose outputs best match a hint: CHIMLE's hierarchical search (Algorithm 1) with the hint as
    the target, k matches sharing the work of the coarse level, then optionally `refine_steps` of Adam on each.

    hint (1, 3, H, W) in [0, 1] at the (padded) output size; mask (1, 1, H, W) in [0, 1], 1 where the
    user painted: the distance is then `MaskedL2` (only the painted pixels count, at every level of the
    search). mask=None: the hint is a whole reference image, compared with `distance` (default LPIPS
    AlexNet, whose weights must be installed).

    samples_per_level (m_1..m_L): candidates per level, in all. Level 1 judges its m_1 candidates once and
    keeps the best k as the prefixes of the k matches (k independent searches would judge k m_1); at each
    finer level every match draws m_l / k candidates (at least 1) on top of its cached prefix and keeps its
    best. A level with one candidate per match is not judged (nothing to choose). The prefixes are run one
    code at a time, as `render` runs them, so the last level's output of each match is its final image, bit
    for bit: no render afterwards. The coarse levels cost the least per candidate and decide the most (the
    colours a hint asks for), hence more candidates there. Candidates are judged in chunks within
    `memory_budget` (`chimle.search.Scorer`).

    `progress(done, total)` reports the work (FLOPs) done, after every chunk; `on_best(level, images,
    distances)` the best so far of each match after each level (partial outputs, (k', 3, h_l, w_l)).

    Refinement, as IvO optimises codes: minimise d(f(x, z), hint) + prior_weight * sum over the parts of
    z (each level's style and noise) of (|part|^2 / dim - 1)^2. The penalty keeps each part on the shell
    where Gaussian draws live, rather than pulling it to 0 (the prior's mode, which no draw resembles);
    without it the code drifts off the prior and the output stops looking like the model's samples.
    Each code keeps the best point of its path by distance, so refinement never makes a match worse.
    """
    from ..search import Scorer

    _check_one(x)
    if mask is not None and float(mask.sum()) <= 0:
        raise ValueError("the hint is empty: paint on the sample first (or give a reference image)")
    if hint.ndim != 4 or hint.shape[:2] != (1, 3):
        raise ValueError(f"hint must be (1, 3, H, W), got {tuple(hint.shape)}")
    L = model.cfg.levels
    sizes = model.cfg.output_sizes(*x.shape[-2:])
    if tuple(hint.shape[-2:]) != tuple(sizes[-1]):
        h, w = sizes[-1]
        raise ValueError(f"the hint is {hint.shape[-2]}x{hint.shape[-1]}, the outputs are {h}x{w}")
    if len(samples_per_level) != L or min(samples_per_level) < 1:
        raise ValueError(f"samples_per_level needs one count >= 1 per level ({L}), got {list(samples_per_level)}")
    if mask is not None:
        d = MaskedL2(mask)
    elif distance is not None:
        d = distance
    else:
        from ..distances.lpips import LPIPS  # heavy (weights): only for a reference image

        d = LPIPS("alex")
    if isinstance(d, torch.nn.Module):
        d = d.to(model.device)
    device = model.device
    hint = hint.clamp(0, 1).to(device)
    x = x.to(device)
    to_rgb = (lambda out, inp: out) if task is None else task.rgb
    layout = model.latent_layout(tuple(x.shape[-2:]))
    beams = min(k, samples_per_level[0])
    per_beam = [samples_per_level[0]] + [max(1, m // beams) for m in samples_per_level[1:]]

    # the work, in FLOPs: candidates judged, the prefixes run one code at a time, refinement (a backward costs
    # about twice its forward) and the renders after it
    cost = step_costs(model, tuple(x.shape[-2:]))
    total = cost[0] * (per_beam[0] + beams)
    for l in range(2, L + 1):
        m = per_beam[l - 1]
        total += cost[l - 1] * beams * (1 if m == 1 else m if l == L else m + 1)
    if refine_steps > 0:
        total += (3 * refine_steps + 1) * k * sum(cost)
    done = 0.0

    def tick(units: float) -> None:
        nonlocal done
        done += units
        if progress is not None:
            progress(min(done, total), total)

    sc = Scorer(model, x, hint, d, None if task is None else task.rgb, memory_budget)
    targets = [resize(hint, hw) for hw in sizes]
    tick(0)
    with sc.context():
        # level 1: m_1 candidates judged once for all the matches (the state of the input is shared)
        z1 = layout.sample_level(1, per_beam[0], generator, device)
        d1 = torch.empty(per_beam[0], device=device)
        chunk = chunk_rows(model, range(1, 2), tuple(x.shape[-2:]), sc.budget)
        for lo in range(0, per_beam[0], chunk):
            hi = min(lo + chunk, per_beam[0])
            d1[lo:hi] = sc.score(sc.initial, 1, [latent.Component(z1.style[lo:hi], z1.noise[lo:hi])], hi - lo)[0]
            tick(cost[0] * (hi - lo))
        picks = d1.argsort()[:beams].tolist()
        chosen = [[latent.Component(z1.style[j : j + 1], z1.noise[j : j + 1])] for j in picks]
        # each match's prefix, one code at a time: the very computation `render` makes
        states = []
        for code in chosen:
            states.append(model.step(1, model.initial_state(x.clone()), code[0]))
            tick(cost[0])
        if on_best is not None:
            on_best(1, torch.cat([to_rgb(s.output, x) for s in states]).float().cpu(), d1[picks].float().cpu())
        for l in range(2, L + 1):
            m = per_beam[l - 1]
            last = l == L
            for b in range(beams):
                z = layout.sample_level(l, m, generator, device)
                if m == 1:  # nothing to choose: the one candidate is the match's next component
                    j = 0
                elif last:  # the final images: each candidate at batch 1, as `render`
                    outs, ds = [], []
                    for j in range(m):
                        s = model.step(l, states[b], latent.Component(z.style[j : j + 1], z.noise[j : j + 1]))
                        outs.append(s)
                        ds.append(float(d(to_rgb(s.output, x).float(), targets[-1])[0]))
                        tick(cost[l - 1])
                    j = int(torch.tensor(ds).argmin())
                    states[b] = outs[j]
                else:
                    dl = sc.score(states[b], l, [z], m)[0]
                    tick(cost[l - 1] * m)
                    j = int(dl.argmin())
                chosen[b].append(latent.Component(z.style[j : j + 1], z.noise[j : j + 1]))
                if not (last and m > 1):
                    states[b] = model.step(l, states[b], chosen[b][-1])
                    tick(cost[l - 1])
            if on_best is not None:
                images = torch.cat([to_rgb(s.output, x) for s in states]).float()
                on_best(l, images.cpu(), d(images, targets[l - 1].expand(beams, -1, -1, -1)).float().cpu())
        codes = latent.cat([latent.to(c, "cpu") for c in chosen])
        images = torch.cat([to_rgb(s.output, x) for s in states]).float()
        del states
    codes = _detach(codes)
    if refine_steps > 0:
        full = sum(cost)
        codes = _refine(model, x, hint, d, codes, task, refine_steps, prior_weight, lr, lambda i: tick(3 * full))
        images = render(model, x, codes, task, lambda i, n: tick(full) if i else None)
    with torch.no_grad():
        dists = d(images.to(device), hint.expand(images.shape[0], -1, -1, -1)).float().cpu()
    order = dists.argsort()
    if progress is not None:
        progress(total, total)
    return Found(images.cpu()[order], latent.index(codes, order), dists[order])


def _detach(codes: Codes) -> Codes:
    # copies made outside inference mode: the refinement's Adam takes gradients through them
    return [latent.Component(c.style.clone(), c.noise.clone()) for c in codes]


def _refine(
    model: TowerModel,
    x: Tensor,
    hint: Tensor,
    d: Callable,
    codes: Codes,
    task: Task | None,
    steps: int,
    prior_weight: float,
    lr: float,
    on_step: Callable[[int], None] | None = None,
) -> Codes:
    """Adam on each code, keeping each one's best point; one code at a time (the rows are independent: the loss
    is a sum of per-row terms and Adam works per element), so that the activations kept for the backward pass
    are those of one output, not k."""
    k = codes[0].style.shape[0]
    if k > 1:
        return latent.cat(
            [
                _refine(model, x, hint, d, latent.index(codes, [i]), task, steps, prior_weight, lr, on_step)
                for i in range(k)
            ]
        )
    device = model.device
    k = codes[0].style.shape[0]
    layout = model.latent_layout(tuple(x.shape[-2:]))
    z = latent.flatten(latent.to(codes, device)).detach().clone().requires_grad_(True)
    xs, ys = x.to(device).expand(k, -1, -1, -1), hint.expand(k, -1, -1, -1)
    # the parts of the flat code, (offset, size): each level's style, then its noise
    parts, off = [], 0
    for dim in layout.dims():
        parts += [(off, layout.code_dim), (off + layout.code_dim, dim - layout.code_dim)]
        off += dim
    opt = torch.optim.Adam([z], lr=lr)
    best_z, best_d = z.detach().clone(), torch.full((k,), math.inf, device=device)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with eval_mode(model), parametrize.cached():
            for step in range(steps + 1):
                out = model(xs, latent.unflatten(z, layout))[-1]
                dist = d(out if task is None else task.rgb(out, xs), ys)
                better = dist.detach() < best_d
                best_d = torch.where(better, dist.detach(), best_d)
                best_z[better] = z.detach()[better]
                if step == steps:  # the last point is measured, not stepped from
                    break
                if on_step is not None:
                    on_step(step)
                prior = sum((z[:, o : o + n].pow(2).mean(1) - 1).pow(2) for o, n in parts)
                opt.zero_grad(set_to_none=True)
                (dist + prior_weight * prior).sum().backward()
                opt.step()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return latent.to(latent.unflatten(best_z, layout), "cpu")


_COSTS: dict[str, list[float]] = {}


def step_costs(model: TowerModel, input_hw: tuple[int, int]) -> list[float]:
    """FLOPs of each level's step for one code and an input of `input_hw`: counted once per model on a 16 x 16
    input and scaled by the area (every layer is a convolution or works per pixel, bar the small mapping
    networks). What a job's progress is measured in, so that its estimate of the time left holds."""
    from torch.utils.flop_counter import FlopCounterMode

    key = repr(model.cfg)  # the costs depend on the architecture only
    if key not in _COSTS:
        x = torch.rand(1, model.cfg.in_channels, 16, 16, device=model.device)
        codes = model.sample_codes(1, input_hw=(16, 16))
        state, costs = model.initial_state(x), []
        # no_grad, not inference_mode: the weight-norm parametrisation fails under the FLOP counter in inference mode
        with torch.inference_mode(False), torch.no_grad(), eval_mode(model), parametrize.cached():
            for level, z in enumerate(codes, 1):
                with FlopCounterMode(display=False) as count:
                    state = model.step(level, state, z)
                costs.append(float(count.get_total_flops()))
        _COSTS[key] = costs
    area = input_hw[0] * input_hw[1] / 256
    return [c * area for c in _COSTS[key]]


# ---------------------------------------------------------------------------------------------
# Super-resolution consistency


def consistency(sample: Tensor, x: Tensor, task: Task) -> Tensor:
    """How far each sample (N, 3, H, W), observed as the task observes (`Task.observe`: for
    super-resolution the antialiased bicubic downsample, no rounding), is from the input x (1 or N, C, h, w):
    mean absolute error in [0, 1] units, (N,). A faithful upscaler's samples differ in detail but all
    downsample to (almost) the input; a large value means the sample made up content the input
    contradicts. `chimle.evaluation.metrics.consistency` is the aggregate over a set, with the shifts."""
    small = task.observe(sample.float())
    if small is None:
        raise ValueError(f"consistency is not defined for the {task.name!r} task")
    if small.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"samples of {tuple(sample.shape[-2:])} do not match the input {tuple(x.shape[-2:])} at scale {task.scale}"
        )
    return (small - x.to(small)).abs().flatten(1).mean(1).cpu()


# ---------------------------------------------------------------------------------------------
# Codes as .npz


def code_meta(model: TowerModel, task: Task | None, inp: Input, **extra) -> dict:
    """What a saved code records besides its tensors: enough to rebuild the input it belongs to and to
    refuse a code for another model or another input size with a clear message."""
    return {
        "input_hw": list(inp.x.shape[-2:]),
        "degrade": inp.degraded,
        "task": task.config() if task is not None else None,
        "levels": model.cfg.levels,
        "code_dim": model.cfg.code_dim,
        "noise_channels": model.cfg.noise_channels,
        **extra,
    }


def save_code(dest: str | Path | BinaryIO, codes: Codes, meta: dict | None = None) -> None:
    """One code (batch 1) as .npz: `style_l` (code_dim,) and `noise_l` (C, h_l, w_l) for l = 1..L, float32,
    plus `format` and `meta` (JSON). A path or a binary file object."""
    if codes[0].style.shape[0] != 1:
        raise ValueError(f"save_code saves one code, got a batch of {codes[0].style.shape[0]}")
    arrays = {"format": np.array(CODE_FORMAT), "meta": np.array(json.dumps(meta or {}))}
    for l, c in enumerate(codes, 1):
        arrays[f"style_{l}"] = c.style[0].detach().float().cpu().numpy()
        arrays[f"noise_{l}"] = c.noise[0].detach().float().cpu().numpy()
    if isinstance(dest, (str, Path)):
        from ..data.imageio import atomic_write

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(dest, lambda f: f.write(buf.getvalue()))
    else:
        np.savez(dest, **arrays)


def load_code(src: str | Path | BinaryIO) -> tuple[Codes, dict]:
    """(code (batch 1), meta) from a file written by `save_code`; a bad file raises ValueError naming it."""
    name = str(src) if isinstance(src, (str, Path)) else "code"
    try:
        f = np.load(src, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"code file '{name}' does not exist") from None
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types for a bad file
        raise ValueError(f"code file '{name}' cannot be read: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"'{name}' is not a chimle code (.npz written by chimle explore)")
    with f:
        if "format" not in f or str(f["format"]) != CODE_FORMAT:
            raise ValueError(f"'{name}' is not a chimle code (.npz written by chimle explore)")
        try:
            meta = json.loads(str(f["meta"]))
            codes, l = [], 1
            while f"style_{l}" in f:
                codes.append(
                    Component(
                        torch.from_numpy(f[f"style_{l}"]).float()[None], torch.from_numpy(f[f"noise_{l}"]).float()[None]
                    )
                )
                l += 1
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"code file '{name}' cannot be read: {' '.join(str(e).split())[:200]}") from None
    if not codes:
        raise ValueError(f"'{name}' holds no code")
    return codes, meta


def check_code(model: TowerModel, codes: Codes, x: Tensor, name: str = "the code") -> None:
    """ValueError (one line) unless `codes` fits the model and the input x."""
    layout = model.latent_layout(tuple(x.shape[-2:]))
    if len(codes) != layout.levels:
        raise ValueError(f"{name} has {len(codes)} levels, the model {layout.levels}")
    for l, (c, (h, w)) in enumerate(zip(codes, layout.sizes), 1):
        want = (layout.noise_channels, h, w)
        if c.style.shape[1] != layout.code_dim or tuple(c.noise.shape[1:]) != want:
            raise ValueError(
                f"{name} does not fit this model and input: level {l} has style {c.style.shape[1]} and noise "
                f"{tuple(c.noise.shape[1:])}, this input needs {layout.code_dim} and {want} (another input size?)"
            )


def sample_with_code(
    weights: str | Path,
    input: str | Path,
    code: str | Path,
    out: str | Path,
    *,
    degrade: bool | None = None,
    device: str = "cpu",
) -> Path:
    """`chimle sample WEIGHTS INPUT --code CODE.npz --out DIR`: the output of that code for that input,
    exactly as the page showed it, written to DIR/<input>_<code>.png. The input is prepared as the page
    prepared it (`degrade` defaults to what the code file records), and rendered with the number of CPU
    threads it records (the page's)."""
    model, task_cfg = load_with_task(weights, device)
    task = make_task(**task_cfg) if task_cfg else None
    codes, meta = load_code(code)
    image = load_image(input)
    if meta.get("resize"):  # the page scaled the photo to fit its --max-pixels: the same resize here
        image = resize(image, tuple(meta["resize"]))
    inp = prepare(model, task, image, bool(meta.get("degrade", False)) if degrade is None else degrade)
    check_code(model, codes, inp.x, f"code '{code}'")
    # With the page's number of threads: how a CPU convolution splits its work can change the last float bit,
    # and then, now and again, a pixel's 8-bit value (measured on sr8-small: 1 thread against 2, 1 PNG of 2).
    before = torch.get_num_threads()
    if meta.get("threads") and torch.device(device).type == "cpu":
        torch.set_num_threads(int(meta["threads"]))
    try:
        image = inp.crop(render(model, inp.x, codes, task))[0]
    finally:
        torch.set_num_threads(before)
    return save_image(image, Path(out) / f"{Path(input).stem}_{Path(code).stem}.png")


def to_png_bytes(image: Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> PNG bytes, rounded exactly as `save_image` rounds."""
    from PIL import Image

    from ..data.imageio import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image.detach().float().cpu()).permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _check_one(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"one input (1, C, h, w) expected, got {tuple(x.shape)}")
