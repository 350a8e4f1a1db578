"""The IMLE selection: find, for each input, the latent code whose output is nearest the observed image.

* `flat`          cIMLE (Li*, Peng*, Zhang*, Malik, IJCV 2020, Sect. 3.5; Eq. 1 of the CHIMLE paper):
                  draw m whole codes, run the full model on each, keep the argmin of d(f(x, z_j), y).
* `hierarchical`  CHIMLE (Peng, Li, NeurIPS 2022, Algorithm 1): level by level, keep the components
                  already chosen, draw m_l candidates for the next component, judge each by the
                  partial output of that level against the target downsampled to it, keep the argmin.

Both run without gradients, in chunks of candidates sized from a memory budget, and compute each
target's distance features once per level (not once per chunk). They return the chosen codes and
the distances of those codes at the last level.

Fast paths (`chimle bench speed` measures them, chimle/apps/bench_speed.py; the figures are in
docs/measurements.md): inference mode; weight-norm weights computed once per search
(parametrize.cached); on CUDA bf16 autocast, channels-last activations and cuDNN autotuning; no
host-device synchronisation inside the chunk loop (slices, not index tensors, and no .item());
`SearchOptions(compile=True)` runs each level through torch.compile (off by default: it pays off only
over many searches of the same shapes, after compiling; benchmarks/compile.py measures it on your
hardware).

`choose` is the one place a method name becomes a search (`Method`): `run` searches with it, `replay`
redraws its codes from its picks, `ablation` runs a rung of the ladder of the CHIMLE paper's Fig. 7.

    codes, dists = hierarchical(model, x, y, chimle.LPIPS("vgg"), samples_per_level=[200, 200, 20, 10])
    codes, dists = flat(model, x, y, chimle.LPIPS("vgg"), num_samples=430)
    chosen = run(choose("chimle", "full", [200, 200, 20, 10]), model, x, y, chimle.LPIPS("vgg"))
    chosen.codes, chosen.dists, chosen.picks    # a `Selection`; it unpacks as (codes, dists)

`x` is the input batch and `y` the observed outputs at full resolution, both in [0, 1].
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from . import latent
from .latent import Codes
from .loss import Distance, FeatureDistance, ToRGB
from .memory import chunk_rows, default_budget, parse_bytes
from .model import LevelState, TowerModel
from .resample import resize

__all__ = [
    "hierarchical",
    "flat",
    "Selection",
    "SearchOptions",
    "Method",
    "choose",
    "run",
    "ablation",
    "reference_hierarchical",
    "draw",
    "replay",
    "Scorer",
    "ABLATIONS",
    "ABLATION_SWITCHES",
    "Distance",
    "ToRGB",
    "LevelCost",
    "level_costs",
    "search_cost",
]


@dataclass(frozen=True)
class SearchOptions:
    """How a search computes, never what it selects.

    `memory_budget`: bytes (or "2GB") of candidates run at once; None: the device's default.
    `compile`: run each level through torch.compile (off by default; see the module's docstring).
    `on_level(l, d)`: called after level l's selection of `hierarchical` with its candidates' distances
    d (N, m_l) (the speed benchmark times the levels with it)."""

    memory_budget: int | str | None = None
    compile: bool = False
    on_level: Callable[[int, Tensor], None] | None = None


@dataclass(frozen=True)
class Selection:
    """What a search chose for each of its N inputs: the codes (one component per level), d(y_L, y~_L)
    of those codes (N,), and the winning candidate index j of every level, `picks`: (N, L) for
    `hierarchical`, (N, 1) for `flat`, (N, 0) for the zero code. With the generator's seed the picks
    rebuild the codes (`replay`), which is what a training checkpoint stores.

    Unpacks (and indexes) as the pair (codes, dists): `codes, dists = hierarchical(...)`."""

    codes: Codes
    dists: Tensor
    picks: Tensor

    def __iter__(self) -> Iterator:
        return iter((self.codes, self.dists))

    def __getitem__(self, i: int):
        return (self.codes, self.dists)[i]


def hierarchical(
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    samples_per_level: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    iterative: bool = True,
    partial: bool = True,
    to_rgb: ToRGB | None = None,
    options: SearchOptions = SearchOptions(),
) -> Selection:
    """CHIMLE latent search, Algorithm 1 of the CHIMLE paper, for a batch of inputs.

    for l = 1..L:  draw m_l candidates z_l^(j);  y~_l^(j) = l-th output of f(x, (z*_1..z*_{l-1}, z_l^(j)));
                   z*_l = argmin_j d(y_l, y~_l^(j))

    `reference_hierarchical` is the same loop written plainly; this one runs it in memory-bounded
    chunks of candidates, each level on top of the cached state of the chosen prefix.

    The switches give the ablations of the paper's Fig. 7:
      iterative=False  "no IC" (no iterative combination): component l is judged with fresh random
                       z_1..z_{l-1} for every candidate instead of the chosen z*_1..z*_{l-1}; only the
                       winner's z_l is kept, and the chosen components are combined at the end.
      partial=False    "no PE" (no partial evaluation): every candidate is completed with fresh random
                       components for levels l+1..L and judged by the final output against the
                       full-resolution target instead of by the level-l output.
      (no CD, no code division, is `flat`: whole codes, one selection; see `ablation`.)

    `options`: memory, torch.compile and a per-level hook (`SearchOptions`).

    Returns the `Selection`: the chosen codes (one component per level, batch N), d(y_L, y~_L) of those
    codes (N,), and the winners j of every level (N, L).
    """
    if len(samples_per_level) != model.cfg.levels:
        raise ValueError(
            f"samples_per_level needs one count per level ({model.cfg.levels}), got {list(samples_per_level)}"
        )
    sc = Scorer(model, x, y, distance, to_rgb, options.memory_budget, options.compile)
    n = x.shape[0]
    chosen: Codes = []
    picks: list[Tensor] = []
    prefix = sc.initial  # state after z*_1..z*_{l-1}
    with sc.context():
        for l, m in enumerate(samples_per_level, 1):
            earlier, z_l, later = draw(sc.layout, l, n * m, generator, sc.device, iterative, partial)
            start, state = (l, prefix) if iterative else (1, sc.initial)
            d = sc.score(state, start, earlier + [z_l] + later, m)  # (N, m)
            best = d.argmin(1)
            chosen.append(latent.index([z_l], torch.arange(n, device=sc.device) * m + best)[0])
            picks.append(best)
            if iterative:
                prefix = sc.step(l, prefix, sc.fmt(chosen[-1]))
            if options.on_level is not None:
                options.on_level(l, d)
        if iterative and partial:
            dists = d.gather(1, best[:, None])[:, 0]
        else:
            dists = sc.score(sc.initial, 1, chosen, 1)[:, 0]
    return Selection(_detach(chosen), dists.float().clone(), torch.stack(picks, 1))


def draw(
    layout: latent.LatentLayout,
    level: int,
    rows: int,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
    iterative: bool = True,
    partial: bool = True,
) -> tuple[Codes, latent.Component, Codes]:
    """The random draws of one level of Algorithm 1, in the order every search makes them:
    (fresh z_1..z_{l-1} for "no IC", else []), the candidates z_l, (fresh z_{l+1}..z_L for "no PE", else [])."""
    z_l = layout.sample_level(level, rows, generator, device)
    earlier = [] if iterative else layout.sample(rows, generator, device, levels=level - 1)
    later = (
        []
        if partial
        else [layout.sample_level(k, rows, generator, device) for k in range(level + 1, layout.levels + 1)]
    )
    return earlier, z_l, later


def replay(layout: latent.LatentLayout, method: Method, picks: Tensor, generator: torch.Generator | None) -> Codes:
    """The codes a search with `method` chose, rebuilt (on the CPU) from its generator (seeded as it was)
    and its winners, `Selection.picks`: (N, L) for `hierarchical` (the j of every level), (N, 1) or (N,)
    for `flat`. Draws exactly what the search drew, so the result is bit-equal."""
    picks = torch.as_tensor(picks, dtype=torch.long).cpu()
    n = picks.shape[0]
    if method.zero:
        return layout.zeros(n)
    if method.flat:
        m = method.counts[0]
        return latent.index(layout.sample(n * m, generator), torch.arange(n) * m + picks.view(n))
    out = []
    for l, m in enumerate(method.counts, 1):
        _, z_l, _ = draw(layout, l, n * m, generator, None, method.iterative, method.partial)
        out.append(latent.index([z_l], torch.arange(n) * m + picks[:, l - 1])[0])
    return out


@torch.no_grad()
def reference_hierarchical(
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    samples_per_level: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    iterative: bool = True,
    partial: bool = True,
    to_rgb: ToRGB | None = None,
) -> tuple[Codes, Tensor]:
    """Algorithm 1 of the CHIMLE paper written plainly: the yardstick of `hierarchical` in the tests
    and the speed benchmark. Same draws, same returns; one full forward (levels 1..l, or 1..L
    without partial evaluation) per candidate and input, the distance recomputed every time,
    float32, no chunking, no caching.

        for l = 1..L:  for each input i, candidate j:
                           d_ij = d(y_i at level l, l-th output of f(x_i, (z*_1..z*_{l-1}, z_l^(j))))
                       z*_l = z_l^(argmin_j d_ij)
    """
    layout, n, L = model.latent_layout(x.shape[-2:]), x.shape[0], model.cfg.levels
    sizes = model.cfg.output_sizes(*x.shape[-2:])
    one = lambda codes, r: [latent.Component(c.style[r : r + 1], c.noise[r : r + 1]) for c in codes]  # noqa: E731
    chosen: Codes = []
    for l, m in enumerate(samples_per_level, 1):
        earlier, z_l, later = draw(layout, l, n * m, generator, model.device, iterative, partial)
        judged = l if partial else L
        best = []
        for i in range(n):
            ds = []
            for j in range(m):
                r = i * m + j
                code = (one(chosen, i) if iterative else one(earlier, r)) + one([z_l], r) + one(later, r)
                out = model(x[i : i + 1], code)[-1]
                if to_rgb is not None:
                    out = to_rgb(out, x[i : i + 1])
                ds.append(distance(out.float(), resize(y[i : i + 1], sizes[judged - 1])))
            best.append(i * m + int(torch.cat(ds).argmin()))
        chosen.append(latent.index([z_l], best)[0])
    out = model(x, chosen)[-1]
    return chosen, distance((out if to_rgb is None else to_rgb(out, x)).float(), y)


def flat(
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    to_rgb: ToRGB | None = None,
    zero: bool = False,
    options: SearchOptions = SearchOptions(),
) -> Selection:
    """cIMLE selection (Eq. 1 of the CHIMLE paper, Sect. 3.5 of the cIMLE paper):
    z* = argmin_j d(f(x, z_j), y) over m whole codes.

    `zero=True` returns the all-zero code (cIMLE's pretraining stage with z = 0) and its distance.
    Returns the `Selection` (picks: the winners j, (N, 1); (N, 0) for the zero code).
    """
    sc = Scorer(model, x, y, distance, to_rgb, options.memory_budget, options.compile)
    n = x.shape[0]
    with sc.context():
        if zero:
            codes = sc.layout.zeros(n, sc.device)
            no_picks = torch.zeros(n, 0, dtype=torch.long, device=sc.device)
            return Selection(codes, sc.score(sc.initial, 1, codes, 1)[:, 0].float().clone(), no_picks)
        codes = sc.layout.sample(n * num_samples, generator, sc.device)
        d = sc.score(sc.initial, 1, codes, num_samples)
        best = d.argmin(1)
        chosen = latent.index(codes, torch.arange(n, device=sc.device) * num_samples + best)
    return Selection(_detach(chosen), d.gather(1, best[:, None])[:, 0].float().clone(), torch.stack([best], 1))


class LevelCost(NamedTuple):
    """Work per candidate at one level, in FLOPs (convolutions and matmuls, `torch.utils.flop_counter`)."""

    step: float  # running level l on top of the state its prefix left (partial evaluation)
    distance: float  # the distance at level l, the candidate's side only (a search embeds the target once)


@torch.no_grad()
def level_costs(
    model: TowerModel, input_hw: tuple[int, int], distance: Distance, to_rgb: ToRGB | None = None
) -> list[LevelCost]:
    """FLOPs of each level's step and of the distance at that level, for one candidate of an input of
    `input_hw`: the unit of `search_cost`. Counted on one forward of batch 1 (per-candidate work
    scales linearly with the batch); the weight-norm recomputation and the targets' embeddings are
    per search, not per candidate, and are left out."""
    x = torch.rand(1, model.cfg.in_channels, *input_hw, device=model.device)
    codes = model.sample_codes(1, input_hw=input_hw)
    costs, state = [], model.initial_state(x)
    with parametrize.cached():
        for l, z in enumerate(codes, 1):
            with FlopCounterMode(display=False) as step:
                state = model.step(l, state, z)
            out = state.output if to_rgb is None else to_rgb(state.output, x)
            target = torch.rand_like(out.float())
            if isinstance(distance, FeatureDistance):
                ft = distance.features(target)
                with FlopCounterMode(display=False) as dist:
                    distance.distance_from_features(distance.features(out.float()), ft)
            else:
                with FlopCounterMode(display=False) as dist:
                    distance(out.float(), target)
            costs.append(LevelCost(float(step.get_total_flops()), float(dist.get_total_flops())))
    return costs


def search_cost(
    costs: Sequence[LevelCost],
    samples_per_level: Sequence[int] | None = None,
    *,
    num_samples: int | None = None,
    iterative: bool = True,
    partial: bool = True,
) -> float:
    """The work of one search for one input in *full-forward equivalents*: one unit is what judging one
    whole code costs (all L steps + the distance on the final output), so `flat` with n codes costs n.

    `hierarchical` (Algorithm 1) runs, for each of the m_l candidates of level l, only level l on top
    of the cached prefix plus the distance at level l, then advances the chosen prefix once; with m at
    every level that is m x (1 + the distances at levels 1..L-1 as a share of a full forward) plus the
    L-1 prefix steps. Without iterative combination ("no IC") a candidate runs levels 1..l; without
    partial evaluation ("no PE") it runs on to level L and is judged there.
    """
    full = sum(c.step for c in costs) + costs[-1].distance
    if num_samples is not None:
        return float(num_samples)
    levels, total = len(costs), 0.0
    for l, m in enumerate(samples_per_level, 1):
        last = l if partial else levels
        run = range(l if iterative else 1, last + 1)
        total += m * (sum(costs[k - 1].step for k in run) + costs[last - 1].distance)
        if iterative and l < levels:
            total += costs[l - 1].step  # the chosen z*_l advances the prefix once
    return total / full


# The ablation ladder of CHIMLE Fig. 7, each a strict removal from the previous one; the switches
# (iterative combination, partial evaluation) of `hierarchical` for the rungs that keep code division.
ABLATIONS = ("full", "no_ic", "no_ic_pe", "no_ic_pe_cd")
ABLATION_SWITCHES = {"full": (True, True), "no_ic": (False, True), "no_ic_pe": (False, False)}
METHODS = ("chimle", "cimle")


@dataclass(frozen=True)
class Method:
    """A search, as `choose` makes it from a run's names: `hierarchical` with m_l = `counts` and its two
    switches, or `flat` (`flat=True`) with m = counts[0]; `zero`: no search, the all-zero code (cIMLE's
    pretraining rounds)."""

    counts: tuple[int, ...]
    flat: bool = False
    iterative: bool = True
    partial: bool = True
    zero: bool = False


def choose(
    method: str = "chimle",
    ablation: str = "full",
    samples_per_level: Sequence[int] = (),
    num_samples: int | None = None,
    zero: bool = False,
) -> Method:
    """The one place a search is chosen (training, resume's replay, the ablation ladder).

    "cimle": cIMLE's flat search with `num_samples` whole codes. "chimle": Algorithm 1 with
    `samples_per_level`, or a rung of the ablation ladder (`ABLATIONS`): "no_ic", "no_ic_pe", or
    "no_ic_pe_cd", the flat search with m = sum(m_l), as many generated samples as the hierarchical
    search draws. `zero`: the all-zero code instead of a search (cIMLE's pretraining with z = 0)."""
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose from {METHODS}")
    if ablation != "no_ic_pe_cd" and ablation not in ABLATION_SWITCHES:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}")
    if method == "cimle":
        return Method((num_samples,), flat=True, zero=zero)
    if ablation == "no_ic_pe_cd":
        return Method((sum(samples_per_level),), flat=True, zero=zero)
    iterative, partial = ABLATION_SWITCHES[ablation]
    return Method(tuple(samples_per_level), iterative=iterative, partial=partial, zero=zero)


def run(
    method: Method,
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    generator: torch.Generator | None = None,
    *,
    to_rgb: ToRGB | None = None,
    options: SearchOptions = SearchOptions(),
) -> Selection:
    """Search with `method` (see `choose`): `flat` or `hierarchical`."""
    if method.flat:
        m = method.counts[0]
        return flat(model, x, y, distance, m, generator, to_rgb=to_rgb, zero=method.zero, options=options)
    if method.zero:
        return flat(model, x, y, distance, 1, generator, to_rgb=to_rgb, zero=True, options=options)
    return hierarchical(
        model,
        x,
        y,
        distance,
        method.counts,
        generator,
        iterative=method.iterative,
        partial=method.partial,
        to_rgb=to_rgb,
        options=options,
    )


def ablation(
    name: str,
    model: TowerModel,
    x: Tensor,
    y: Tensor,
    distance: Distance,
    samples_per_level: Sequence[int],
    generator: torch.Generator | None = None,
    **kw,
) -> Selection:
    """Search with one rung of the ablation ladder (`ABLATIONS`; keywords as `run`'s). "no_ic_pe_cd"
    is cIMLE with m = sum(m_l), the same number of generated samples as the hierarchical search draws."""
    return run(choose("chimle", name, samples_per_level), model, x, y, distance, generator, **kw)


def _detach(codes: Codes) -> Codes:
    # Inference tensors cannot be saved for backward; the training step will use these codes.
    return [latent.Component(c.style.clone(), c.noise.clone()) for c in codes]


_COMPILED: weakref.WeakKeyDictionary[TowerModel, Callable] = weakref.WeakKeyDictionary()


def compiled_step(model: TowerModel) -> Callable[..., LevelState]:
    """`model.step` through torch.compile, built once per model. Static shapes: a search sees a few
    batch sizes per level (full chunks, the last chunk, the N chosen prefixes), the same every round,
    and inductor's dynamic-shape path fails on this model (torch 2.13: "Exponent must be non-negative")."""
    if model not in _COMPILED:
        # Dynamo keeps every graph of `step` under one code object (per level and shape, and per model
        # in the process); past its recompile limit it silently falls back to eager.
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16 * model.cfg.levels)
        _COMPILED[model] = torch.compile(model.step, dynamic=False)
    return _COMPILED[model]


class Scorer:
    """Runs candidate codes through some levels and measures them against the targets, in memory-bounded
    chunks: the engine of every search (and of `chimle.evaluation.efficiency`). Use its methods inside
    `with scorer.context():` (inference mode, cached weight norm, bf16 on CUDA)."""

    def __init__(
        self,
        model: TowerModel,
        x: Tensor,
        y: Tensor,
        distance: Distance,
        to_rgb: ToRGB | None,
        memory_budget: int | str | None,
        compile: bool = False,
    ):
        self.model, self.distance, self.to_rgb = model, distance, to_rgb
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        x, y = x.to(self.device), y.to(self.device)
        # One host-device synchronisation for the whole call (not one per bound, nor per chunk).
        lo = torch.stack([x.min(), y.min()]).min()
        hi = torch.stack([x.max(), y.max()]).max()
        if bool((lo < 0) | (hi > 1)):
            raise ValueError("search inputs and targets must be images in [0, 1]")
        self.layout = model.latent_layout(x.shape[-2:])
        self.input_hw = tuple(x.shape[-2:])
        self.y = y
        self.budget = parse_bytes(memory_budget) if memory_budget is not None else default_budget(self.device)
        self.step = compiled_step(model) if compile else model.step
        self._targets: dict[int, object] = {}
        with self.context():
            # clone: an inference tensor like every later state, so a compiled step sees one kind of input
            self.initial = model.initial_state(self.fmt(x).clone())

    def fmt(self, t):
        """On CUDA, channels-last (NHWC) activations: cuDNN's bf16 convolutions run fastest on them, and
        every conv output inherits the layout from its input. A tensor or a latent Component."""
        if not self.cuda:
            return t
        if isinstance(t, latent.Component):
            return latent.channels_last([t])[0]
        return t.contiguous(memory_format=torch.channels_last)

    @contextlib.contextmanager
    def context(self):
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        was_training, was_bench = self.model.training, torch.backends.cudnn.benchmark
        self.model.eval()
        if self.cuda:  # few distinct chunk shapes per search: autotuning the convs once pays off
            torch.backends.cudnn.benchmark = True
        try:
            # Weight norm recomputes every conv weight on each access; cache them for the whole search.
            with torch.inference_mode(), parametrize.cached(), amp:
                yield
        finally:
            self.model.train(was_training)
            torch.backends.cudnn.benchmark = was_bench

    def _target(self, level: int):
        """The level's target (or its distance features), computed once and reused for every chunk."""
        if level not in self._targets:
            t = resize(self.y, self.model.cfg.output_sizes(*self.input_hw)[level - 1])
            features = isinstance(self.distance, FeatureDistance)
            self._targets[level] = self.distance.features(self.fmt(t)) if features else t
        return self._targets[level]

    def _measure(self, state: LevelState, level: int, rows: Tensor) -> Tensor:
        out = state.output
        if self.to_rgb is not None:  # state.inputs[-1] is these rows' input at full resolution
            out = self.to_rgb(out, state.inputs[-1])
        target = self._target(level)
        if isinstance(self.distance, FeatureDistance):
            feats = [f.index_select(0, rows) for f in target]
            return self.distance.distance_from_features(self.distance.features(out.float()), feats)
        return self.distance(out.float(), target.index_select(0, rows))

    def score(self, state: LevelState, start: int, comps: Codes, m: int) -> Tensor:
        """Distances (N, m) of candidate rows (input i, candidate j) = row i*m + j, running levels
        start..start+len(comps)-1 on top of `state` (a state of the N inputs) and judging the last."""
        n = state.inputs[0].shape[0]
        stop = start + len(comps) - 1
        step = chunk_rows(self.model, range(start, stop + 1), self.input_hw, self.budget)
        out = torch.empty(n * m, device=self.device)
        for lo in range(0, n * m, step):
            hi = min(lo + step, n * m)
            # Candidates and results are contiguous row ranges: slices are views, no index kernels.
            # Only the input of each row needs a gather; its index is made on the device directly.
            inputs = torch.div(torch.arange(lo, hi, device=self.device), m, rounding_mode="floor")
            s = state.index(inputs)
            for k, comp in enumerate(comps):
                s = self.step(start + k, s, self.fmt(latent.Component(comp.style[lo:hi], comp.noise[lo:hi])))
            out[lo:hi] = self._measure(s, stop, inputs)
        return out.view(n, m)
