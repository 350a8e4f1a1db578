"""Files in, PNGs out: `chimle sample` on an image or a folder of images; `chimle.sample` in Python.

    sample_paths("runs/demo/checkpoints/last.pt", "photo.png", num=8, out="samples/")
    sample_paths("sr8-small", "big.png", 2, "samples/", SampleOptions(seed=1, tiling=Tiling("auto")))
    samples = sample_image("sr8-small", "photo.png", num=8, seed=0)   # the same pixels, as a tensor

Inputs of any size are padded (reflect) to what the tower needs and the outputs cropped back.

With a tile (`--tile`), outputs of any size are streamed: every band of rows the tiling finishes
(`tiling.tiled_bands`) is converted to 8 bit and written into the PNG at once (pypng writes rows as they
come; Pillow wants the whole image, and would hold it at 4 bytes per pixel), so no copy of the whole
output is ever made. The grid of such a sample shows previews of at most PREVIEW_SIDE px a side, each
reduced from the same bands as they pass. Memory: the budget of the tiles, one band's accumulator, the
codes and the input, whatever the output size (docs/sampling.md, "Large images").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import png
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from .. import latent
from ..data.imageio import IMAGE_EXTENSIONS, atomic_write, list_images, load_image, save_image, to_uint8
from ..data.imageio import _to_float_rgb as pil_to_tensor  # load_image's mode mapping, for PIL images in memory
from ..data.tasks import Task, degrade_and_crop, make_task
from ..memory import available_memory, bytes_per_row, default_budget, parse_bytes
from ..model import TowerModel
from ..resample import resize
from .explore import sample_with_code
from .figures import save_grid
from .sample import back_project, draw_codes, eval_mode, generate, interpolate
from .tiling import auto_tile, pad_to_tower, tiled_bands
from .weights import load_with_task

__all__ = [
    "Tiling",
    "SampleOptions",
    "sample_paths",
    "sample_image",
    "model_input",
    "write_png_rows",
    "tile_plan",
]

PREVIEW_SIDE = 1024  # the longest side of a streamed sample's preview in its grid (px)


@dataclass(frozen=True)
class Tiling:
    """How an image too large to run at once is run: tile by tile (`chimle.inference.tiling`).

    tile: a tile side in input pixels, "auto" for the largest tile that fits `memory_budget`, or None: whole,
    unless the untiled run would not fit (`tile_plan`: then tiled as with "auto", with a line saying so).
    overlap: tile overlap in input pixels (default a quarter of the tile). memory_budget: bytes or "4GB"
    (default: half the free GPU memory, 2 GB on the CPU). Images that fit in one tile are not tiled."""

    tile: int | str | None = None
    overlap: int | None = None
    memory_budget: int | str | None = None


@dataclass(frozen=True)
class SampleOptions:
    """What `chimle sample` draws besides `num` fresh samples per input: its options, for `sample_paths`.

    seed: the generator's seed (the same seed, the same samples). from_level=k: keep levels < k of one code
    and redraw levels >= k; same_code: sample k uses one code for every input (`sample.draw_codes`).
    interpolate_steps: a sequence of that many frames between two codes instead (`sample.interpolate`).
    degrade: the files are targets and the task makes the inputs from them (the grid shows input | samples |
    target); otherwise they are the inputs themselves (a low-resolution image for sr, a grey or colour
    photo for colorize, a JPEG for jpeg, a night photo for night/paired). project: back-project
    super-resolution samples onto their input (`sample.back_project`; post-processing, untiled only)."""

    seed: int = 0
    from_level: int | None = None
    same_code: bool = False
    interpolate_steps: int = 0
    degrade: bool = False
    project: bool = False
    tiling: Tiling = field(default_factory=Tiling)


def sample_paths(
    weights: str | Path,
    inputs: str | Path,
    num: int,
    out: str | Path,
    options: SampleOptions | None = None,
    *,
    code: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    notice: Callable[[str], None] | None = None,
) -> list[Path]:
    """Sample `num` outputs for an image or a folder of images; write each output and a grid.

    options: what to draw and how (`SampleOptions`; default: `num` fresh samples of seed 0, untiled
    unless an image would not fit). An image that would not fit untiled (`tile_plan`) is tiled as with
    "auto", and `notice` (default: warnings.warn) gets one line saying so; with interpolate_steps or
    project, which do not tile, the line warns that it may not fit instead.

    code: a code .npz saved by `chimle explore` (or `chimle.inference.codefile.save_code`): redraw that
    one exact output for one input image instead of sampling (options.degrade as the page's, if set).
    """
    o = options if options is not None else SampleOptions()
    if code is not None:
        if not Path(inputs).is_file():
            raise ValueError(f"--code redraws one output: give one input image, not the folder '{inputs}'")
        return [sample_with_code(weights, inputs, code, out, degrade=True if o.degrade else None, device=device)]
    if not Path(inputs).exists():
        raise FileNotFoundError(_missing_input(Path(inputs)))
    model, task_cfg = load_with_task(weights, device)
    task = make_task(**task_cfg) if task_cfg else None
    paths = [Path(inputs)] if Path(inputs).is_file() else list_images(inputs)
    say = notice if notice is not None else (lambda msg: warnings.warn(msg, stacklevel=3))
    out = Path(out)
    g = torch.Generator(device=model.device).manual_seed(o.seed)
    written: list[Path] = []
    for p in tqdm(paths, desc="sample", disable=not progress or len(paths) < 2):
        x, target = model_input(p, task, o.degrade, o.seed)
        x, (h, w) = pad_to_tower(x[None], model)
        if o.same_code:  # the same draws for every input: sample k shares its code across the inputs
            g = torch.Generator(device=model.device).manual_seed(o.seed)
        whole = bool(o.interpolate_steps or o.project)  # they do not tile
        side, note = tile_plan(model, tuple(x.shape[-2:]), o.tiling, can_tile=not whole)
        if note:
            say(f"'{p}' {note}")
        if o.project and (task is None or task.name != "sr" or side is not None):
            raise ValueError("--project works on untiled super-resolution samples (no --tile)")
        if o.interpolate_steps:
            if side is not None:
                raise ValueError("--interpolate does not support --tile")
            samples = interpolate(model, x, o.interpolate_steps, g, task=task)
        elif side is not None:  # streamed into the files, never whole in memory
            codes = draw_codes(model, x, num, g, from_level=o.from_level, same_code=o.same_code)
            written += _sample_streamed(model, x, codes, (h, w), side, o.tiling.overlap, task, target, out, p.stem)
            continue
        else:
            samples = generate(model, x, num, g, task=task, from_level=o.from_level, same_code=o.same_code)
        s = model.cfg.scale
        samples = samples[..., : h * s, : w * s].cpu()
        if o.project:
            samples = back_project(samples, x[..., :h, :w].cpu(), task)
        stem = out / p.stem
        for k in range(samples.shape[0]):
            written.append(save_image(samples[k, 0], stem.with_name(f"{p.stem}_{k:03d}.png")))
        shown_x = x[..., :h, :w].cpu()
        grid_path = out / f"{p.stem}_grid.png"
        save_grid(grid_path, shown_x, samples, None if target is None else target[None], task=task)
        written.append(grid_path)
    return written


def model_input(
    image: str | Path | Image.Image | Tensor, task: Task | None, degrade: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor | None]:
    """An image -> (the model's input (C, h, w), the target or None), as `chimle sample` makes them.

    image: a file, a PIL image or an RGB tensor (3, H, W) or (1, 3, H, W) in [0, 1] (grey: 1 channel).
    degrade=False: the image is the input (`task.read_input` of a file, `task.prepare_input` of pixels:
    colorize keeps the lightness; a scene layout's label map must be a file). degrade=True: the image is
    the target and the task makes the input from it (`chimle.data.tasks.degrade_and_crop`: sr crops it to a
    multiple of its scale first)."""
    if isinstance(image, (str, Path)):
        if not degrade and task is not None:
            return task.read_input(image), None
        img = load_image(image)
    else:
        img = _pixels(image)
    if not degrade:
        return (img if task is None else task.prepare_input(img)), None
    return degrade_and_crop(task, img, seed)


def _pixels(image: Image.Image | Tensor) -> Tensor:
    """A PIL image or a tensor -> (3, H, W) float32 in [0, 1], checked; PIL modes as `load_image` maps them."""
    if isinstance(image, Image.Image):
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - as load_image: a malformed EXIF block does not spoil the pixels
            pass
        return pil_to_tensor(image)
    if not isinstance(image, Tensor):
        raise TypeError(f"an image is a path, a PIL image or a tensor, not {type(image).__name__}")
    x = image.detach()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"an image tensor is (3, H, W) or (1, 3, H, W) (grey: 1 channel), got {tuple(image.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"an image tensor holds floats in [0, 1], got {x.dtype} (divide 8-bit pixels by 255)")
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):  # NaN fails too
        raise ValueError(f"an image tensor holds values in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x.float().cpu().expand(3, -1, -1).contiguous()


def sample_image(
    model: TowerModel | str | Path,
    image: str | Path | Image.Image | Tensor,
    num: int = 8,
    seed: int = 0,
    *,
    task: Task | str | dict | None = None,
    degrade: bool = False,
    from_level: int | None = None,
    tiling: Tiling | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """`num` samples of one image, the ones `chimle sample` writes for the same seed: (num, 3, H', W') in
    [0, 1] on the CPU (`chimle.sample`).

        import chimle
        samples = chimle.sample("sr8-small", "photo.png", num=4, seed=0)     # 8x the photo's size
        chimle.save_image(samples[0], "photo_0.png")

    model: a shipped name, a weights file or training checkpoint (their task comes with them), or a
    TowerModel (then `task`: a Task, a task name or a task config dict; None: the image is the input and
    the outputs are returned as the tower makes them). image: a path, a PIL image or an RGB tensor (3, H, W)
    or (1, 3, H, W) in [0, 1]; the task makes the input from it as `chimle sample` does (`model_input`;
    degrade=True as `--degrade`). Any size: padded to what the tower needs, the outputs cropped back. A
    large image is tiled as `chimle sample` tiles it (`tile_plan`, with a warning when not asked for);
    tiling: `Tiling(tile, overlap, memory_budget)` as `--tile`, `--overlap`, `--memory-budget`."""
    if isinstance(model, (str, Path)):
        model, task_cfg = load_with_task(model, device or "cpu")
        if task is None and task_cfg:
            task = make_task(**task_cfg)
    elif not isinstance(model, TowerModel):
        raise TypeError(f"model is a TowerModel, a model's name or a weights file, not {type(model).__name__}")
    elif device is not None:
        model = model.to(device)
    if isinstance(task, str):
        task = make_task(task)
    elif isinstance(task, dict):
        task = make_task(**task)
    x, _ = model_input(image, task, degrade, seed)
    x, (h, w) = pad_to_tower(x[None], model)
    tiling = tiling if tiling is not None else Tiling()
    side, note = tile_plan(model, tuple(x.shape[-2:]), tiling)
    if note:
        warnings.warn(f"the image {note}", stacklevel=2)
    g = torch.Generator(device=model.device).manual_seed(seed)
    samples = generate(model, x, num, g, task=task, from_level=from_level, tile=side, overlap=tiling.overlap)
    s = model.cfg.scale
    return samples[:, 0, :, : h * s, : w * s].cpu()


def _sample_streamed(
    model: TowerModel,
    x: Tensor,
    codes: Iterator[latent.Codes],
    hw: tuple[int, int],
    tile: int,
    overlap: int | None,
    task: Task | None,
    target: Tensor | None,
    out: Path,
    stem: str,
) -> list[Path]:
    """Tiled samples of x (1, C, H, W, padded; `hw` unpadded), one per code, streamed into
    out/STEM_k.png, and the grid of their previews: input | previews | target, all at the previews' size."""
    files, previews = [], []
    for k, c in enumerate(codes):
        files.append(out / f"{stem}_{k:03d}.png")
        previews.append(_stream_sample(model, x, c, tile, overlap, task, hw, files[-1]))
    shown_x, shown_target = x[..., : hw[0], : hw[1]].cpu(), None if target is None else target[None]
    ph, pw = previews[0].shape[-2:]
    if (ph, pw) != (hw[0] * model.cfg.scale, hw[1] * model.cfg.scale):  # reduced previews
        shown_x = resize(shown_x, (ph, pw)) if shown_x.shape[-2] > ph else shown_x
        shown_target = None if shown_target is None else resize(shown_target, (ph, pw))
    grid = out / f"{stem}_grid.png"
    save_grid(grid, shown_x, torch.stack(previews)[:, None], shown_target, task=task)
    return [*files, grid]


def _stream_sample(
    model: TowerModel,
    x: Tensor,
    codes: latent.Codes,
    tile: int,
    overlap: int | None,
    task: Task | None,
    hw: tuple[int, int],
    path: Path,
) -> Tensor:
    """Run one tiled sample of x (1, C, H, W, padded) and write it to `path` band by band, cropped to
    `hw` x scale; returns its preview (3, h', w') in [0, 1], at most PREVIEW_SIDE px a side."""
    s = model.cfg.scale
    height, width = hw[0] * s, hw[1] * s
    preview = _Preview(max(1, -(-max(height, width) // PREVIEW_SIDE)))
    xd = x.to(model.device)

    def rows() -> Iterator[np.ndarray]:
        bands = tiled_bands(model, xd, codes, tile, tile // 4 if overlap is None else overlap)
        for top, band in bands:
            if top >= height:
                break
            # the input rows under the band, for tasks whose colour needs the input (colorize: s = 1)
            band = band if task is None else task.rgb(band, xd[..., top // s : top // s + band.shape[-2] // s, :])
            band = band[0, :, : height - top, :width]
            if not bool(band.isfinite().all()):
                raise ValueError(f"sample: non-finite values in the output for '{path}' (the weights produce NaN/inf)")
            band8 = to_uint8(band).cpu()
            preview.add(band8)
            yield band8.permute(1, 2, 0).numpy()

    with eval_mode(model):
        atomic_write(
            path, lambda f: write_png_rows(f, width, height, 3 if task is not None else _channels(model), rows())
        )
    return preview.image()


def _channels(model: TowerModel) -> int:
    c = model.cfg.out_channels
    if c not in (1, 3):
        raise ValueError(f"outputs of {c} channels need the task to become an image (weights without a task?)")
    return c


class _Preview:
    """A reduced copy of an image that arrives band by band: means of `factor` x `factor` blocks (the
    last partial blocks dropped), as the rows pass."""

    def __init__(self, factor: int):
        self.f, self.pending, self.rows = factor, None, []

    def add(self, band8: Tensor) -> None:
        t = band8 if self.pending is None else torch.cat([self.pending, band8], dim=-2)
        n = t.shape[-2] // self.f * self.f
        if n:
            self.rows.append(F.avg_pool2d(t[None, :, :n].float(), self.f)[0] / 255.0)
        self.pending = t[:, n:]

    def image(self) -> Tensor:
        img = torch.cat(self.rows, dim=-2)
        return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def write_png_rows(f: BinaryIO, width: int, height: int, channels: int, rows: Iterable[np.ndarray]) -> None:
    """Write an 8-bit PNG (grey or RGB) to `f` from bands of rows, uint8 arrays (r, width, channels), with
    pypng, which compresses the rows as they come (zlib level 6, as Pillow's default): memory is one band
    and about 1 MB of pending rows, whatever the image size. pypng leaves the rows unfiltered (PNG filter
    type 0): the files are larger than Pillow's (docs/measurements.md)."""
    done = 0

    def each_row() -> Iterator[np.ndarray]:
        nonlocal done
        for band in rows:
            yield from np.ascontiguousarray(band, dtype=np.uint8).reshape(band.shape[0], width * channels)
            done += band.shape[0]

    writer = png.Writer(width, height, greyscale=channels == 1, bitdepth=8, compression=6)
    try:
        writer.write(f, each_row())
    except png.ProtocolError:
        raise ValueError(f"write_png_rows: got {done} rows for a {height}-row image") from None


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


def _missing_input(path: Path) -> str:
    """What a missing input is called: a path with a suffix names a file, one without may be either."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return f"image file '{path}' does not exist"
    if path.suffix:
        return f"file '{path}' does not exist"
    return f"no image file or folder '{path}' exists"


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def tile_plan(
    model: TowerModel, hw: tuple[int, int], tiling: Tiling, can_tile: bool = True
) -> tuple[int | None, str | None]:
    """The tile side for an input of `hw` (padded; None: run it whole), and a line for the user when the
    image is tiled without being asked, or cannot be and may not fit.

    Without `tiling.tile`, the untiled run's estimate (`chimle.memory.bytes_per_row`, the one `auto_tile` fits
    tiles with; it errs high) is compared with `memory_budget` when given, else with the memory available
    (a first sample of a large photo must not end in an out-of-memory kill; the CPU's default budget,
    2 GB, would tile photos that fit). Above it, the tiles are those of `--tile auto`, within the budget
    (default: `default_budget`, at most half the memory available)."""
    tile, memory_budget = tiling.tile, tiling.memory_budget
    if tile is not None:
        return _tile_side(model, hw, tile, memory_budget), None
    need = bytes_per_row(model, range(1, model.cfg.levels + 1), hw)
    free = available_memory(model.device)
    limit = parse_bytes(memory_budget) if memory_budget is not None else free
    if limit is None or need <= limit:
        return None, None
    what = "the memory budget" if memory_budget is not None else "the memory available"
    said = f"({hw[1]}x{hw[0]} px) needs about {_gb(need)} untiled, more than {what} ({_gb(limit)})"
    if not can_tile:
        return None, f"{said}; --interpolate and --project run it whole (it may not fit): --tile auto, without them"
    budget = memory_budget
    if budget is None:
        budget = default_budget(model.device) if free is None else min(default_budget(model.device), free // 2)
    side = _tile_side(model, hw, "auto", budget)
    if side is None:
        return None, None
    return side, f"{said}: tiled automatically, as --tile auto does ({side} px tiles; --tile N to choose)"
