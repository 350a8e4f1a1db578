"""Files in, PNGs out: `chimle sample` on an image or a folder of images.

    sample_paths("runs/demo/checkpoints/last.pt", "photo.png", num=8, out="samples/")

Inputs of any size are padded (reflect) to what the tower needs and the outputs cropped back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.imageio import list_images, load_image, save_image
from ..data.tasks import make_task
from ..memory import default_budget
from ..model import TowerModel
from .figures import save_grid
from .sample import generate, interpolate
from .tiling import auto_tile, pad_to_tower
from .weights import load_with_task

__all__ = ["sample_paths"]


def sample_paths(
    weights: str | Path,
    inputs: str | Path,
    num: int,
    out: str | Path,
    *,
    seed: int = 0,
    from_level: int | None = None,
    same_code: bool = False,
    interpolate_steps: int = 0,
    degrade: bool = False,
    device: str = "cpu",
    progress: bool = True,
    tile: int | str | None = None,
    overlap: int | None = None,
    memory_budget: int | str | None = None,
) -> list[Path]:
    """Sample `num` outputs for an image or a folder of images; write each output and a grid.

    tile: tiled inference for images too large to run at once: a tile side in input pixels, or
    "auto" for the largest tile that fits `memory_budget` (default: half the free GPU memory, 2 GB
    on the CPU); images that fit whole are not tiled.

    degrade=True treats the files as targets: the task makes the input from each one (so the grid
    shows input | samples | target). Otherwise the files are the inputs themselves (a low-resolution
    image for sr, a grey or colour photo for colorize, a JPEG for jpeg, a night photo for night/paired).
    """
    model, task_cfg = load_with_task(weights, device)
    task = make_task(**task_cfg) if task_cfg else None
    paths = [Path(inputs)] if Path(inputs).is_file() else list_images(inputs)
    out = Path(out)
    g = torch.Generator(device=model.device).manual_seed(seed)
    written: list[Path] = []
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
            x = img if task is None else task.prepare_input(img)
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


def _tile_side(
    model: TowerModel, hw: tuple[int, int], tile: int | str | None, memory_budget: int | str | None
) -> int | None:
    """The tile side for an input of `hw`, or None when the image is run whole."""
    if tile is None:
        return None
    if tile == "auto":
        side = auto_tile(model, hw, memory_budget if memory_budget is not None else default_budget(model.device))
    else:
        side = int(tile) if str(tile).isdigit() else 0
        if side < 1:
            raise ValueError(f"--tile must be a positive number of input pixels or 'auto', got {tile!r}")
    return None if side >= max(hw) else side
