"""Sampling: many different outputs per input, sample grids, and the papers' latent-code tricks.

At test time every level's component is drawn independently (CHIMLE Sect. 2.2). Options:
  from_level=k   keep the components of levels < k fixed and redraw levels >= k, so coarse content
                 stays and finer detail varies (CHIMLE appendix Fig. 9: local vs global variation);
  same_code      one code for every input: a consistent "style" across inputs (cIMLE Fig. 12); in
                 `sample_paths` every file replays the same draws, so sample k shares its code;
  interpolate    a sequence of outputs between two codes (cIMLE Fig. 11).

    samples = generate(model, x, num=8, generator=torch.Generator().manual_seed(0), task=task)
    save_grid("grid.png", x, samples, targets, task=task)
    sample_paths("runs/demo/checkpoints/last.pt", "photo.png", num=8, out="samples/")   # `chimle sample`

Inputs of any size are padded (reflect) to what the tower needs and the outputs cropped back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import latent
from .imageio import list_images, load_image, pyplot, save_figure, save_image
from .latent import Codes
from .model import TowerModel, downsample

__all__ = ["generate", "interpolate", "redraw_from", "save_grid", "make_grid", "plot_curve", "sample_paths",
           "pad_to_tower"]


def redraw_from(model: TowerModel, codes: Codes, level: int, generator: torch.Generator | None,
                input_hw: tuple[int, int]) -> Codes:
    """`codes` with the components of levels >= `level` redrawn (levels < `level` unchanged)."""
    layout = model.latent_layout(input_hw)
    n = codes[0].style.shape[0]
    out = list(codes)
    for l in range(level, model.cfg.levels + 1):
        out = latent.replace(out, l, layout.sample_level(l, n, generator, model.device))
    return out


@torch.inference_mode()
def generate(model: TowerModel, x: Tensor, num: int, generator: torch.Generator | None = None, *, task=None,
             from_level: int | None = None, base_codes: Codes | None = None, same_code: bool = False,
             all_levels: bool = False, tile: int | None = None, overlap: int | None = None) -> Tensor:
    """`num` samples per input: (num, N, 3, H, W) RGB in [0, 1] (or every level's, if all_levels).

    from_level with base_codes: redraw only levels >= from_level of base_codes (default: one fresh
    code per input, shared by all samples). same_code: sample k uses one code for every input.
    tile: run the tower tile by tile (`chimle.tiling`, tiles of `tile` input px overlapping by
    `overlap`, default tile // 4) so that large images fit in memory; last level only. The codes are
    the same as untiled, so a tiled sample matches its untiled twin away from the seams.
    """
    model.eval()
    n, hw = x.shape[0], tuple(x.shape[-2:])
    x = x.to(model.device)
    if from_level is not None and not 1 <= from_level <= model.cfg.levels:
        raise ValueError(f"from_level must be in 1..{model.cfg.levels}, got {from_level}")
    if tile is not None and all_levels:
        raise ValueError("tiled sampling returns the last level only (all_levels=False)")
    if from_level is not None and base_codes is None:
        base_codes = model.sample_codes(n, generator, input_hw=hw)
    results = []
    for _ in range(num):
        if from_level is not None:
            codes = redraw_from(model, base_codes, from_level, generator, hw)
        elif same_code:
            codes = latent.repeat(model.sample_codes(1, generator, input_hw=hw), n)
        else:
            codes = model.sample_codes(n, generator, input_hw=hw)
        if tile is not None:
            from .tiling import tiled_forward

            outs = [tiled_forward(model, x, codes, tile, tile // 4 if overlap is None else overlap)]
        else:
            outs = model(x, codes)
        outs = [_rgb(task, o, x, model) for o in outs]
        results.append(outs if all_levels else outs[-1])
    if all_levels:
        return [torch.stack([r[l] for r in results]) for l in range(len(results[0]))]
    return torch.stack(results)


def _rgb(task, out: Tensor, x: Tensor, model: TowerModel) -> Tensor:
    if task is None or task.name != "colorize":
        return out
    return task.to_rgb(out, downsample(x, tuple(out.shape[-2:])))


@torch.inference_mode()
def interpolate(model: TowerModel, x: Tensor, steps: int, generator: torch.Generator | None = None, *,
                task=None, codes: tuple[Codes, Codes] | None = None) -> Tensor:
    """Outputs along the straight line between two codes: (steps, N, 3, H, W)."""
    hw = tuple(x.shape[-2:])
    a, b = codes if codes is not None else (model.sample_codes(x.shape[0], generator, input_hw=hw),
                                            model.sample_codes(x.shape[0], generator, input_hw=hw))
    za, zb = latent.flatten(a), latent.flatten(b)
    layout = model.latent_layout(hw)
    frames = []
    for t in torch.linspace(0, 1, steps).tolist():
        z = latent.unflatten((1 - t) * za + t * zb, layout)
        frames.append(_rgb(task, model(x.to(model.device), z)[-1], x.to(model.device), model))
    return torch.stack(frames)


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


# -- pictures -------------------------------------------------------------------------------------


def make_grid(rows: Sequence[Sequence[Tensor]], pad: int = 2) -> Tensor:
    """Rows of (3, h, w) images (any sizes, resized to the largest) -> one (3, H, W) image in [0, 1]."""
    h = max(im.shape[-2] for r in rows for im in r)
    w = max(im.shape[-1] for r in rows for im in r)
    cols = max(len(r) for r in rows)
    grid = torch.ones(3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            im = im.float().clamp(0, 1)
            if im.shape[0] == 1:
                im = im.expand(3, -1, -1)
            if tuple(im.shape[-2:]) != (h, w):  # show small inputs blown up, pixels visible
                im = F.interpolate(im[None], size=(h, w), mode="nearest")[0]
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = im
    return grid


def save_grid(path: str | Path, x: Tensor, samples: Tensor, targets: Tensor | None = None, task=None) -> Tensor:
    """One row per input: input | sample 1..K | target (when known). Returns the grid tensor."""
    rows = []
    for i in range(x.shape[0]):
        row = [_show_input(x[i], task)] + [samples[k, i] for k in range(samples.shape[0])]
        if targets is not None:
            row.append(targets[i])
        rows.append(row)
    grid = make_grid(rows)
    save_image(grid, path)
    return grid


def _show_input(x: Tensor, task) -> Tensor:
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]


def plot_curve(steps: Sequence[float], series: dict[str, Sequence[float]], path: str | Path,
               ylabel: str = "loss") -> Path:
    """A line plot PNG (training curves)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(steps, ys, label=name, lw=1.2 if name == "loss" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


# -- files in, files out (`chimle sample`) --------------------------------------------------------


def sample_paths(weights: str | Path, inputs: str | Path, num: int, out: str | Path, *, seed: int = 0,
                 from_level: int | None = None, same_code: bool = False, interpolate_steps: int = 0,
                 degrade: bool = False, device: str = "cpu", progress: bool = True, tile: int | str | None = None,
                 overlap: int | None = None, memory_budget: int | str | None = None) -> list[Path]:
    """Sample `num` outputs for an image or a folder of images; write each output and a grid.

    tile: tiled inference for images too large to run at once: a tile side in input pixels, or
    "auto" for the largest tile that fits `memory_budget` (default: half the free GPU memory, 2 GB
    on the CPU); images that fit whole are not tiled.

    degrade=True treats the files as targets: the task makes the input from each one (so the grid
    shows input | samples | target). Otherwise the files are the inputs themselves (a low-resolution
    image for sr, a grey or colour photo for colorize, a JPEG for jpeg, a night photo for night/paired).
    """
    from .checkpoint import load_with_task
    from .data import make_task, rgb_to_l01

    model, task_cfg = load_with_task(weights, device)
    task = make_task(**task_cfg) if task_cfg else None
    paths = [Path(inputs)] if Path(inputs).is_file() else list_images(inputs)
    out = Path(out)
    g = torch.Generator(device=model.device).manual_seed(seed)
    written: list[Path] = []
    from tqdm.auto import tqdm

    for p in tqdm(paths, desc="sample", disable=not progress or len(paths) < 2):
        img = load_image(p)
        target = None
        if degrade:
            if task is None or task.paired:
                raise ValueError("--degrade needs a task that makes inputs from photos (sr, colorize, jpeg, night)")
            target = img
            if task.name == "sr":  # crop so the target divides by the scale
                h, w = (s - s % task.scale for s in img.shape[-2:])
                target = img[:, :h, :w]
            x = task.degrade(target, seed)
        else:
            x = rgb_to_l01(img) if (task is not None and task.name == "colorize") else img
        x, (h, w) = pad_to_tower(x[None], model)
        if same_code:  # the same draws for every input: sample k shares its code across the inputs
            g = torch.Generator(device=model.device).manual_seed(seed)
        side = _tile_side(model, tuple(x.shape[-2:]), tile, memory_budget)
        if interpolate_steps:
            if side is not None:
                raise ValueError("--interpolate does not support --tile")
            samples = interpolate(model, x, interpolate_steps, g, task=task)
        else:
            samples = generate(model, x, num, g, task=task, from_level=from_level, tile=side, overlap=overlap)
        s = model.cfg.scale
        samples = samples[..., : h * s, : w * s].cpu()
        stem = out / p.stem
        for k in range(samples.shape[0]):
            written.append(save_image(samples[k, 0], stem.with_name(f"{p.stem}_{k:03d}.png")))
        shown_x = x[..., :h, :w].cpu()
        grid_path = out / f"{p.stem}_grid.png"
        save_grid(grid_path, shown_x, samples, None if target is None else target[None], task=task)
        written.append(grid_path)
    return written


def _tile_side(model: TowerModel, hw: tuple[int, int], tile: int | str | None,
               memory_budget: int | str | None) -> int | None:
    """The tile side for an input of `hw`, or None when the image is run whole."""
    if tile is None:
        return None
    if tile == "auto":
        from .search import default_budget
        from .tiling import auto_tile

        side = auto_tile(model, hw, memory_budget if memory_budget is not None else default_budget(model.device))
    else:
        side = int(tile) if str(tile).isdigit() else 0
        if side < 1:
            raise ValueError(f"--tile must be a positive number of input pixels or 'auto', got {tile!r}")
    return None if side >= max(hw) else side
