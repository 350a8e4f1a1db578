"""Tasks: how a model's input is made from a clean target photo, and how its output becomes RGB.

    task = make_task("sr", scale=16)       # or "colorize", "jpeg", "night", "paired", "layout", "digit_sr", ...
    x = task.degrade(y, rng)               # y: (3, H, W) in [0, 1] -> input (Cin, h, w)
    rgb = task.rgb(model_output, x)        # what the loss, the search and the viewer see

Layouts. "same": output size == input size; level l of L works at full / 2^(L-l). "upscale": the
input is the low-resolution image and level l outputs it x 2^l, so the task's scale must be 2^L.

Colourisation works in Lab: the formulas of skimage.color in torch (batched, differentiable).
All image tensors are float32 in [0, 1].
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ..resample import downsample, quantize8, resize
from ..rng import generator_from
from .imageio import ImageError, load_image, read_label_map, read_palette, to_uint8

Size = tuple[int, int]

__all__ = [
    "Task",
    "TASKS",
    "make_task",
    "degrade_and_crop",
    "SuperResolution",
    "Colorize",
    "JpegDecompression",
    "SyntheticNight",
    "Paired",
    "SceneLayout",
    "DigitTask",
    "DigitSuperResolution",
    "DigitCompletion",
    "rgb_to_lab",
    "lab_to_rgb",
    "rgb_to_l01",
    "rgb_to_ab01",
    "compose_lab",
]


# ---------------------------------------------------------------------------
# Lab colour (sRGB, D65, 2-degree observer): the formulas of skimage.color,
# in torch so they are batched and differentiable. Channels are dim -3.

_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_D65 = (0.95047, 1.0, 1.08883)


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", m.to(x.dtype), x)


def _white(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_D65, dtype=x.dtype, device=x.device).view(3, 1, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (..., 3, H, W) -> Lab with L in [0, 100], a, b roughly in [-128, 127]."""
    # torch.where evaluates both branches; the clamps keep the unused one finite
    # so gradients do not turn into NaN.
    lin = torch.where(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _mix(_XYZ_FROM_RGB.to(rgb.device), lin) / _white(rgb)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1 / 3), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab (..., 3, H, W) -> sRGB clipped to [0, 1] (out-of-gamut colours are clipped,
    as in skimage.color.lab2rgb, which also clips negative Z to 0)."""
    L, a, b = lab.unbind(-3)
    fy = (L + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp(min=0)], dim=-3)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _white(lab)
    lin = _mix(_RGB_FROM_XYZ.to(lab.device), xyz)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, lin * 12.92)
    return rgb.clamp(0, 1)


# Normalisation used by the colorize task: L in [0, 100] -> [0, 1] for the
# input; ab -> (ab + 128) / 255 in [0, 1] for the model's 2-channel output.
def rgb_to_l01(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> (..., 1, H, W) lightness in [0, 1]."""
    return (rgb_to_lab(rgb)[..., :1, :, :] / 100.0).clamp(0, 1)


def rgb_to_ab01(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> (..., 2, H, W) chroma in [0, 1] (sRGB's gamut fits inside)."""
    return ((rgb_to_lab(rgb)[..., 1:, :, :] + 128.0) / 255.0).clamp(0, 1)


def compose_lab(l01: torch.Tensor, ab01: torch.Tensor) -> torch.Tensor:
    """Lightness (..., 1, H, W) and chroma (..., 2, H, W), both in [0, 1] -> RGB in [0, 1]."""
    return lab_to_rgb(torch.cat([l01 * 100.0, ab01 * 255.0 - 128.0], dim=-3))


# ---------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """Base class. Subclasses set the class attributes and implement degrade().

    ``degrade`` accepts (3, H, W) or a batch (N, 3, H, W) in [0, 1] and is
    deterministic given ``rng`` (a torch.Generator or an int seed).
    """

    name: ClassVar[str] = ""
    in_channels: ClassVar[int] = 3
    out_channels: ClassVar[int] = 3
    layout: ClassVar[str] = "same"
    paired: ClassVar[bool] = False  # True: inputs are real files, not degrade()d

    @property
    def scale(self) -> int:
        """Target size / input size (1 for the "same" layout)."""
        return 1

    def input_size(self, target_size: Size) -> Size:
        h, w = target_size
        if h % self.scale or w % self.scale:
            raise ValueError(f"{self.name}: target {h}x{w} is not divisible by scale {self.scale}")
        return h // self.scale, w // self.scale

    def degrade(self, target: torch.Tensor, rng: torch.Generator | int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prepare_input(self, image: torch.Tensor) -> torch.Tensor:
        """An image read from a file (3, H, W) -> the model's input (`chimle sample` without --degrade)."""
        return image

    def read_input(self, path: str | Path) -> torch.Tensor:
        """An input file -> the model's input (C, h, w): a paired dataset's inputs, `chimle sample`'s files.
        Scene layouts read label maps here; every other task reads an image and `prepare_input`s it."""
        return self.prepare_input(load_image(path))

    def rgb(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A model output (N, out_channels, h, w) at any level -> RGB (N, 3, h, w) in [0, 1], given the
        input x (N, in_channels, H, W) at full resolution: the one colour path of the loss, the search,
        sampling and the metrics. RGB outputs pass through; grey ones are replicated to 3 channels."""
        return output.expand(-1, 3, -1, -1) if output.shape[1] == 1 else output

    def show_input(self, x: torch.Tensor) -> torch.Tensor:
        """An input (C, h, w) as an RGB picture for grids: grey replicated, extra channels dropped."""
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]

    def observe(self, sample: torch.Tensor) -> torch.Tensor | None:
        """The input this task makes from an RGB `sample` (N, 3, H, W), without its random noise and
        8-bit rounding, or None where the task has no such map (paired data, synthetic night's noise).
        A consistent output observes back to its input: `chimle.evaluation.metrics.consistency`."""
        return None

    def config(self) -> dict:
        """``make_task(**task.config())`` rebuilds this task."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass
class SuperResolution(Task):
    """Super-resolution by ``scale`` = 2^L (16 as in CHIMLE, 8 as in cIMLE). The input
    is the antialiased bicubic downsample, rounded to 8-bit levels so it looks like
    a real low-resolution file."""

    name: ClassVar[str] = "sr"
    layout: ClassVar[str] = "upscale"
    scale: int = 16

    def __post_init__(self):
        if self.scale < 2 or self.scale & (self.scale - 1):
            raise ValueError(f"sr: scale must be a power of two >= 2, got {self.scale}")

    def degrade(self, target, rng=None):
        return downsample(target, self.scale, quantize=True)

    def observe(self, sample):
        return downsample(sample, self.scale)


@dataclass
class Colorize(Task):
    """Colourisation. Input: Lab lightness L/100 (1 channel). Output: ab as
    (ab + 128)/255 (2 channels); to_rgb composes it with the input's L, so the
    loss compares RGB."""

    name: ClassVar[str] = "colorize"
    in_channels: ClassVar[int] = 1
    out_channels: ClassVar[int] = 2

    def degrade(self, target, rng=None):
        return rgb_to_l01(target)

    def rgb(self, output, x):
        return compose_lab(resize(x, tuple(output.shape[-2:])), output)

    def prepare_input(self, image: torch.Tensor) -> torch.Tensor:
        return rgb_to_l01(image)

    def observe(self, sample):
        return rgb_to_l01(sample)


@dataclass
class JpegDecompression(Task):
    """JPEG artefact removal. Input: the target encoded and decoded by Pillow in
    memory at ``quality`` (1 as in the paper; Pillow's default 4:2:0 chroma)."""

    name: ClassVar[str] = "jpeg"
    quality: int = 1

    def __post_init__(self):
        if not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg: quality must be in 1..100, got {self.quality}")

    def degrade(self, target, rng=None):
        if target.ndim == 4:
            return torch.stack([self.degrade(t) for t in target])
        buf = io.BytesIO()
        Image.fromarray(to_uint8(target).permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        with Image.open(buf) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255.0

    def observe(self, sample):
        return self.degrade(sample)  # re-encoding at the task's quality is deterministic


@dataclass
class SyntheticNight(Task):
    """SYNTHETIC night-to-day: night inputs faked from day photos, for tests and
    for demoing the night-to-day path without real pairs (use "paired" for real
    ones). Darken (x^gamma * brightness), tint blue, add Poisson-like shot noise
    (std sqrt(x / photons)) and Gaussian read noise, round to 8 bit. Noise is
    drawn from ``rng``, so it is deterministic given it."""

    name: ClassVar[str] = "night"
    gamma: float = 2.2
    brightness: float = 0.25
    tint: tuple[float, float, float] = (0.75, 0.9, 1.2)
    photons: float = 400.0
    read_noise: float = 0.01

    def degrade(self, target, rng=None):
        g = generator_from(rng)
        # float64: float32 pow/sqrt differ in the last bit between the vectorised and scalar kernels
        # (which one runs depends on threading), and that can flip the 8-bit rounding of a pixel.
        tint = torch.tensor(self.tint, dtype=torch.float64).view(3, 1, 1)
        x = target.double().clamp(0, 1) ** self.gamma * self.brightness * tint
        shot = torch.randn(x.shape, generator=g).double() * (x / self.photons).sqrt()
        read = torch.randn(x.shape, generator=g).double() * self.read_noise
        return quantize8(x + shot + read).to(target.dtype)


@dataclass
class Paired(Task):
    """Real pairs (e.g. night/day): inputs come from a second folder matched to the targets by file
    name (see ImageDataset's input_root); both must be the same size. The channel counts may differ
    from RGB for pairs made in memory (the MNIST illustration: grey in, grey out)."""

    name: ClassVar[str] = "paired"
    paired: ClassVar[bool] = True
    in_channels: int = 3
    out_channels: int = 3

    def degrade(self, target, rng=None):
        raise TypeError("the paired task reads its inputs from files; pass input_root to ImageDataset")


@dataclass
class SceneLayout(Task):
    """Scene layouts to photos (cIMLE Sect. 4.2): the input is a label map (a PNG of class ids, or a
    colour PNG read through a palette file), one-hot encoded to `num_classes` channels, the target the
    photo of the same name. Pixels of class `ignore_index` (void, e.g. 255) are all-zero columns.
    Label maps are resized like images (antialiased bicubic) for the tower's coarser levels, which
    turns them into per-pixel class fractions there (an area average, clamped to [0, 1])."""

    name: ClassVar[str] = "layout"
    paired: ClassVar[bool] = True
    num_classes: int = 20
    ignore_index: int = 255
    palette: str = ""  # palette file for colour label maps (`imageio.read_palette`); "" = id PNGs

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"layout: num_classes must be >= 1, got {self.num_classes}")
        self._palette = read_palette(self.palette) if self.palette else None

    @property
    def in_channels(self) -> int:  # one channel per class
        return self.num_classes

    def read_labels(self, path: str | Path) -> torch.Tensor:
        """(H, W) class ids of a label map, checked: an id outside 0..num_classes-1 that is not the ignore
        id is an error naming the file, the id and a pixel."""
        ids = read_label_map(path, self._palette)
        bad = (ids >= self.num_classes) & (ids != self.ignore_index) | (ids < 0)
        if bad.any():
            y, x = (int(v) for v in bad.nonzero()[0])
            raise ImageError(
                path,
                f"class id {int(ids[y, x])} at pixel (x={x}, y={y}) is outside 0..{self.num_classes - 1} "
                f"and is not the ignore id {self.ignore_index} (data.num_classes, data.ignore_index)",
            )
        return ids

    def one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        """(H, W) ids -> (num_classes, H, W) float32 one-hot; ignored pixels are all zero."""
        valid = (ids >= 0) & (ids < self.num_classes)
        x = torch.zeros(self.num_classes, *ids.shape)
        x.scatter_(0, ids.clamp(0, self.num_classes - 1)[None], valid[None].float())
        return x

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot (…, C, H, W) -> ids (…, H, W), -1 where no class is set (void)."""
        return torch.where(x.sum(-3) > 0, x.argmax(-3), torch.full_like(x[..., 0, :, :], -1, dtype=torch.long))

    def read_input(self, path: str | Path) -> torch.Tensor:
        return self.one_hot(self.read_labels(path))

    def prepare_input(self, image: torch.Tensor) -> torch.Tensor:
        raise ValueError("layout inputs are label maps: read them with task.read_input(path), not as photos")

    def degrade(self, target, rng=None):
        raise TypeError("the layout task reads label maps from files; pass input_root to ImageDataset")

    def colours(self) -> torch.Tensor:
        """(num_classes, 3) display colours: the palette's where one is given, else evenly spread hues."""
        table = torch.zeros(self.num_classes, 3)
        if self._palette is not None:
            for (r, g, b), k in self._palette.items():
                if k < self.num_classes:
                    table[k] = torch.tensor([r, g, b]) / 255.0
            return table
        for k in range(self.num_classes):  # golden-ratio hues: neighbours differ, any count works
            h = (k * 0.618034) % 1.0
            rgb = torch.tensor([abs(h * 6 - 3) - 1, 2 - abs(h * 6 - 2), 2 - abs(h * 6 - 4)]).clamp(0, 1)
            table[k] = rgb * (0.55 + 0.45 * (k % 2))
        return table

    def show_input(self, x: torch.Tensor) -> torch.Tensor:
        """A one-hot (or, at a coarse level, fractional) layout (C, h, w) as colours; void black."""
        return torch.einsum("chw,cd->dhw", x.float(), self.colours()).clamp(0, 1)


class DigitTask(Task):
    """Base of the digit tasks: 28 px grey digits (MNIST, Fashion-MNIST; `chimle.data.digits`), grey replicated
    to three channels in and out, so the tower, the trainer and every RGB path serve them as they are; the
    output is the mean of the tower's three channels (always grey). `data.data` names the digits
    ("mnist", "fashion-mnist" or their files), `data.crop` must be 28."""

    side: ClassVar[int] = 28

    def rgb(self, output, x):
        return output.mean(1, keepdim=True).expand(-1, 3, -1, -1)

    def observe(self, sample):
        return self.degrade(sample)  # deterministic: no noise, no rounding but the 8-bit input levels

    def dataset(self, data: str, train: bool, crop: int, levels: int):
        """The train (or test) digits of `data` as (input, target) pairs; one line naming what is wrong."""
        from .digits import DigitPairs, load_digits

        if crop != self.side or self.side % 2 ** (levels - 1):
            raise ValueError(
                f"{self.name}: digits are {self.side} px: needs data.crop {self.side} (--crop {self.side}) and a "
                f"tower of at most 3 levels, got crop {crop} and {levels} levels"
            )
        d = load_digits(data)
        return DigitPairs(d.train_x if train else d.test_x, self.degrade, d.train_y if train else d.test_y)


@dataclass
class DigitSuperResolution(DigitTask):
    """Super-resolution of digits by `factor` (4: 7 x 7 -> 28 x 28). The input is the digit shrunk by the
    library's antialiased bicubic (`resample.downsample`), rounded to 8-bit levels, and blown back up to
    28 px with the same filter: the "same" layout reads it at 7, 14 and 28 px, so level 1 sees the 7 x 7."""

    name: ClassVar[str] = "digit_sr"
    factor: int = 4

    def __post_init__(self):
        if self.factor < 2 or self.side % self.factor:
            raise ValueError(f"digit_sr: factor must divide {self.side} and be >= 2, got {self.factor}")

    def degrade(self, target, rng=None):
        grey = target.mean(-3, keepdim=True)
        up = resize(downsample(grey, self.factor, quantize=True), tuple(grey.shape[-2:]))
        return up.expand(*target.shape)


@dataclass
class DigitCompletion(DigitTask):
    """Completion of digits: the input is the digit with rows `rows`.. (default 14-27, the lower half) set to
    0; the output is the whole digit. The hidden rows are the same for every input, so no mask channel."""

    name: ClassVar[str] = "digit_complete"
    rows: int = 14

    def __post_init__(self):
        if not 0 < self.rows < self.side:
            raise ValueError(f"digit_complete: rows must be in 1..{self.side - 1}, got {self.rows}")

    def degrade(self, target, rng=None):
        x = target.mean(-3, keepdim=True).clone()
        x[..., self.rows :, :] = 0
        return x.expand(*target.shape)


TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (
        SuperResolution,
        Colorize,
        JpegDecompression,
        SyntheticNight,
        Paired,
        SceneLayout,
        DigitSuperResolution,
        DigitCompletion,
    )
}


def make_task(name: str, **kw) -> Task:
    """Build a task by name: sr(scale), colorize, jpeg(quality), night(...), paired."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    cls = TASKS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(kw) - set(valid))
    if bad:
        raise TypeError(f"task {name!r} has no option(s) {', '.join(bad)}; valid: {', '.join(valid) or 'none'}")
    return cls(**kw)


def degrade_and_crop(task: Task | None, photo: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real photo (3, H, W) in [0, 1] -> (the model's input made from it, the target): the photo cropped at
    the bottom and right to a multiple of the task's scale (super-resolution; 1 for the other tasks), then
    `task.degrade`d with `seed`. What `chimle sample --degrade` and the explorer's "degrade it first" do."""
    if task is None or task.paired:
        what = "weights without a task" if task is None else f"the {task.name!r} task (its inputs are files)"
        raise ValueError(f"degrading needs a task that makes inputs from photos (sr, colorize, jpeg, night): {what}")
    s = task.scale
    h, w = (d - d % s for d in photo.shape[-2:])
    if h < 1 or w < 1:
        raise ValueError(f"the image ({photo.shape[-2]}x{photo.shape[-1]}) is smaller than the scale {s}")
    target = photo[:, :h, :w]
    return task.degrade(target, seed), target
