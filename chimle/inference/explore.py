"""Exploring the modes of a model: samples that keep their codes, variations from a level, walks
between two codes, each output reproducible from its code.

The functions behind `chimle explore` (the page is `chimle.apps.explore_server`), usable from Python:

    inp = prepare(model, task, load_image("photo.png"), degrade=True)
    images, codes = draw_samples(model, inp.x, 8, seeded(0), task=task)           # (8, 3, H, W), 8 codes
    var_images, var_codes = vary(model, inp.x, latent.index(codes, [3]), level=2, num=8, generator=g, task=task)
    walk = latent.interpolate(latent.index(codes, [0]), latent.index(codes, [1]), 16)   # slerp, 16 codes
    frames = render(model, inp.x, latent.cat(walk), task)
    save_code("sample.npz", latent.index(codes, [3]), code_meta(model, task, inp))      # chimle.inference.codefile
    sample_with_code("weights.safetensors", "photo.png", "sample.npz", "out/")   # `chimle sample --code`

The guided search toward a user's hint is `chimle.inference.guide`; code files are `chimle.inference.codefile`.

Every image here is RGB in [0, 1] at the model's output size for the (padded) input `x`; `Input.crop`
cuts the padding off. Outputs are rendered one code at a time (`render`), in the page and on the
command line alike, so that a downloaded code reproduces its PNG bit for bit: a batched forward may
round differently from a single one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import latent
from ..data.imageio import load_image, save_image
from ..data.tasks import Task, degrade_and_crop, make_task
from ..latent import Codes
from ..model import TowerModel
from ..resample import resize
from .codefile import check_code, load_code
from .sample import eval_mode, redraw_from
from .tiling import pad_to_tower
from .weights import load_with_task

__all__ = [
    "Input",
    "Progress",
    "fit_size",
    "prepare",
    "render",
    "draw_samples",
    "vary",
    "consistency",
    "code_meta",
    "sample_with_code",
    "to_png_bytes",
]


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

    def pad(self, image: Tensor, edge: bool = False) -> Tensor:
        """An image at `output_hw` (..., H, W) -> the padded output size: zeros in the padding (a mask
        padded this way ignores the padding), or with edge=True the edge repeated (a reference image, which
        a whole-image distance then sees without a black border)."""
        h, w = self.output_hw
        ph, pw = self.x.shape[-2] * self.scale - h, self.x.shape[-1] * self.scale - w
        if not (ph or pw):
            return image
        return torch.nn.functional.pad(image, (0, pw, 0, ph), mode="replicate" if edge else "constant")


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
        x, target = degrade_and_crop(task, image, seed)
    else:
        x = image if task is None else task.prepare_input(image)
    if x.shape[0] != model.cfg.in_channels:
        raise ValueError(f"the model takes {model.cfg.in_channels}-channel inputs, the task made {x.shape[0]}")
    xp, hw = pad_to_tower(x[None], model)
    return Input(xp, hw, model.cfg.scale, degrade, target)


# ---------------------------------------------------------------------------------------------
# Samples, variations, rendering codes


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
# Codes: what a saved one records, and its output again (`chimle sample --code`)


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
        **({"style_grid": model.cfg.style_grid} if model.cfg.style_grid > 1 else {}),
        **extra,
    }


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
