"""Guided search: the codes whose outputs best match a user's hint, a painted patch or a reference image.

CHIMLE's hierarchical search (Algorithm 1) with the hint in place of the observed image, then optionally a
few steps of gradient descent on each code found (as IvO optimises codes), kept near the prior's shell. What
the explorer page's "guided search" runs (`chimle explore`), usable from Python:

    found = guided_search(model, inp.x, hint, mask, [32, 8, 2], seeded(0), task=task,
                          options=GuideOptions(k=4, refine_steps=10))
    found.images, found.codes, found.distances      # best first

`hint` is at the model's (padded) output size (`chimle.inference.explore.Input.pad`); `mask` is 1 where the
user painted. The matches' images are bit for bit those `chimle.inference.explore.render` draws from their
codes, so a saved code reproduces its image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import latent
from ..data.tasks import Task
from ..latent import Codes
from ..memory import chunk_rows
from ..model import TowerModel
from ..resample import resize
from .explore import Progress, render
from .sample import eval_mode

__all__ = ["GuideOptions", "Found", "MaskedL2", "hint_distance", "guided_search", "schedule", "step_costs"]


@dataclass(frozen=True)
class GuideOptions:
    """How a guided search works, beyond what it looks for (`guided_search`)."""

    k: int = 4  # matches returned, best first
    refine_steps: int = 0  # Adam steps on each match after the search (0: none)
    prior_weight: float = 1.0  # weight of the refinement's penalty that keeps each part of the code on its shell
    lr: float = 0.05  # the refinement's Adam step size
    distance: Callable[[Tensor, Tensor], Tensor] | None = None  # for a reference image (no mask); None: LPIPS AlexNet
    memory_budget: int | str | None = 256 << 20  # bytes of activations per chunk of candidates (`search.Scorer`)


def schedule(candidates: int, levels: int) -> list[int]:
    """Candidates per level from one number m: m at level 1, a quarter as many at each finer level (at least
    1). The coarse levels cost the least per candidate (`step_costs`) and decide the most, the colours a
    hint asks for; CHIMLE's own schedules (e.g. 200, 200, 20, 10) also put more candidates there."""
    if candidates < 1 or levels < 1:
        raise ValueError(f"a schedule needs candidates >= 1 and levels >= 1, got {candidates} and {levels}")
    return [candidates] + [max(1, candidates >> (2 * l)) for l in range(1, levels)]


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
    options: GuideOptions | None = None,
    progress: Progress | None = None,
    on_best: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Found:
    """The codes whose outputs best match a hint: CHIMLE's hierarchical search (Algorithm 1) with the hint as
    the target, k matches sharing the work of the coarse level, then optionally `options.refine_steps` of Adam on each.

    hint (1, 3, H, W) in [0, 1] at the (padded) output size; mask (1, 1, H, W) in [0, 1], 1 where the
    user painted: the distance is then `MaskedL2` (only the painted pixels count, at every level of the
    search). mask=None: the hint is a whole reference image, compared with `options.distance` (default LPIPS
    AlexNet, whose weights must be installed). `options` (`GuideOptions`): k, the refinement, the memory.

    samples_per_level (m_1..m_L): candidates per level, in all. Level 1 judges its m_1 candidates once and
    keeps the best k as the prefixes of the k matches (k independent searches would judge k m_1); at each
    finer level every match draws m_l / k candidates (at least 1) on top of its cached prefix and keeps its
    best. A level with one candidate per match is not judged (nothing to choose). The prefixes are run one
    code at a time, as `render` runs them, so the last level's output of each match is its final image, bit
    for bit: no render afterwards. The coarse levels cost the least per candidate and decide the most (the
    colours a hint asks for), hence more candidates there. Candidates are judged in chunks within
    `options.memory_budget` (`chimle.search.Scorer`).

    `progress(done, total)` reports the work (FLOPs) done, after every chunk; `on_best(level, images,
    distances)` the best so far of each match after each level (partial outputs, (k', 3, h_l, w_l)).

    Refinement, as IvO optimises codes: minimise d(f(x, z), hint) + options.prior_weight * sum over the parts of
    z (each level's style and noise) of (|part|^2 / dim - 1)^2. The penalty keeps each part on the shell
    where Gaussian draws live, rather than pulling it to 0 (the prior's mode, which no draw resembles);
    without it the code drifts off the prior and the output stops looking like the model's samples.
    Each code keeps the best point of its path by distance, so refinement never makes a match worse.
    """
    from ..search import Scorer

    opt = options if options is not None else GuideOptions()
    k, refine_steps = opt.k, opt.refine_steps
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"one input (1, C, h, w) expected, got {tuple(x.shape)}")
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
    elif opt.distance is not None:
        d = opt.distance
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

    sc = Scorer(model, x, hint, d, None if task is None else task.rgb, opt.memory_budget)
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
        codes = _refine(model, x, hint, d, codes, task, opt, lambda i: tick(3 * full))
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
    opt: GuideOptions,
    on_step: Callable[[int], None] | None = None,
) -> Codes:
    """Adam on each code, keeping each one's best point; one code at a time (the rows are independent: the loss
    is a sum of per-row terms and Adam works per element), so that the activations kept for the backward pass
    are those of one output, not k."""
    k = codes[0].style.shape[0]
    if k > 1:
        return latent.cat([_refine(model, x, hint, d, latent.index(codes, [i]), task, opt, on_step) for i in range(k)])
    device, steps = model.device, opt.refine_steps
    layout = model.latent_layout(tuple(x.shape[-2:]))
    z = latent.flatten(latent.to(codes, device)).detach().clone().requires_grad_(True)
    xs, ys = x.to(device).expand(k, -1, -1, -1), hint.expand(k, -1, -1, -1)
    # the parts of the flat code, (offset, size): each level's style, then its noise
    parts, off = [], 0
    for dim in layout.dims():
        parts += [(off, layout.style_dim), (off + layout.style_dim, dim - layout.style_dim)]
        off += dim
    adam = torch.optim.Adam([z], lr=opt.lr)
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
                adam.zero_grad(set_to_none=True)
                (dist + opt.prior_weight * prior).sum().backward()
                adam.step()
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
