"""Data for chimle: tasks (how an input is made from a target), resampling,
Lab colour, and the training/eval dataset.

A *task* turns a clean target photo into the model's input and back:

    task = make_task("sr", scale=16)       # or "colorize", "jpeg", "night", "paired"
    x = task.degrade(y, rng)               # y: (3, H, W) in [0, 1] -> input (Cin, h, w)
    rgb = task.to_rgb(model_output, x)     # what the loss and the viewer see

The dataset yields cropped (input, target) pairs; the per-level pyramids the
Tower Implicit Model needs are made on the fly from a batch:

    ds = ImageDataset("photos/", task, crop=256, levels=4, train=True)
    ds.set_epoch(epoch)                    # train crops are a function of (seed, epoch, index)
    batch = next(iter(DataLoader(ds, batch_size=8)))
    ys = level_targets(batch["target"], 4, task.layout)   # coarsest first
    xs = level_inputs(batch["input"], 4, task.layout)

Layouts. "same": output size == input size; level l of L works at
full / 2^(L-l), so inputs and targets are both pyramids. "upscale": the input is
the low-resolution image at s and level l outputs s * 2^l, so the task's scale
must be 2^L and every level is conditioned on the same input.

All image tensors are float32 in [0, 1]; chimle.imageio is where that is checked.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .imageio import (  # noqa: F401  (re-exported: data.load_image etc. is the usual entry point)
    IMAGE_EXTENSIONS, ImageError, builtin_photo_dir, builtin_photos, check_image,
    list_images, load_image, save_image, to_uint8,
)

LAYOUTS = ("same", "upscale")
Size = tuple[int, int]
PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]

# ---------------------------------------------------------------------------
# Resampling


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Antialiased bicubic resize of (C, H, W) or (N, C, H, W) to ``size`` = (h, w).

    Clamped to [0, 1] because bicubic overshoots at edges.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(x[None] if x.ndim == 3 else x, size=size, mode="bicubic",
                      antialias=True, align_corners=False)
    return (y[0] if x.ndim == 3 else y).clamp_(0, 1)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """Snap [0, 1] values to the 256 levels of an 8-bit file, rounding to nearest."""
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


def downsample(x: torch.Tensor, factor: int | None = None, *, size: Size | None = None,
               quantize: bool = False) -> torch.Tensor:
    """Shrink by an integer ``factor`` (H and W must divide exactly) or to ``size``.

    Antialiased bicubic, clamped to [0, 1]; ``quantize=True`` rounds to 8-bit
    levels as if the result had been saved as a PNG.
    """
    if (factor is None) == (size is None):
        raise ValueError("downsample: give exactly one of factor or size")
    if factor is not None:
        h, w = x.shape[-2:]
        if factor < 1 or h % factor or w % factor:
            raise ValueError(f"downsample: size {h}x{w} is not divisible by factor {factor}")
        size = (h // factor, w // factor)
    y = resize(x, size)
    return quantize8(y) if quantize else y


def pyramid(img: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` copies of img, coarsest first, each half the size of the next;
    the last is ``img`` itself. H and W must be divisible by 2^(levels-1)."""
    k = 2 ** (levels - 1)
    h, w = img.shape[-2:]
    if levels < 1 or h % k or w % k:
        raise ValueError(f"pyramid: {h}x{w} image cannot make {levels} exact levels "
                         f"(needs H and W divisible by {k})")
    return [downsample(img, 2 ** (levels - 1 - l)) if l < levels - 1 else img for l in range(levels)]


def level_targets(target: torch.Tensor, levels: int, layout: str) -> list[torch.Tensor]:
    """Per-level targets for a batch (N, 3, H, W), coarsest first. The same for
    both layouts: level l's output is H / 2^(L-l) in either."""
    _check_layout(layout)
    return pyramid(target, levels)


def level_inputs(inp: torch.Tensor, levels: int, layout: str) -> list[torch.Tensor]:
    """Per-level inputs for a batch, coarsest first: a pyramid for "same"; for
    "upscale" the low-resolution input itself at every level (the same tensor)."""
    _check_layout(layout)
    return pyramid(inp, levels) if layout == "same" else [inp] * levels


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# ---------------------------------------------------------------------------
# Lab colour (sRGB, D65, 2-degree observer): the formulas of skimage.color,
# in torch so they are batched and differentiable. Channels are dim -3.

_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
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
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787) * _white(lab)
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


def as_generator(rng: torch.Generator | int | None) -> torch.Generator:
    """A torch.Generator from a generator (used as is), a seed, or None (seed 0)."""
    if isinstance(rng, torch.Generator):
        return rng
    return torch.Generator().manual_seed(0 if rng is None else int(rng))


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

    def to_rgb(self, output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """Model output -> RGB in [0, 1]; ``input`` is the input at the output's resolution."""
        return output

    @property
    def output_to_rgb(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """``to_rgb`` where the model's output is not RGB (colourisation), else None: the ``to_rgb``
        argument of the search, the efficiency curve and IvO."""
        return self.to_rgb if self.out_channels != 3 else None

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

    def to_rgb(self, output, input):
        return compose_lab(input, output)


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
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(to_uint8(target).permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        with Image.open(buf) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255.0


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
        g = as_generator(rng)
        # float64: float32 pow/sqrt differ in the last bit between the vectorised and scalar kernels
        # (which one runs depends on threading), and that can flip the 8-bit rounding of a pixel.
        tint = torch.tensor(self.tint, dtype=torch.float64).view(3, 1, 1)
        x = target.double().clamp(0, 1) ** self.gamma * self.brightness * tint
        shot = torch.randn(x.shape, generator=g).double() * (x / self.photons).sqrt()
        read = torch.randn(x.shape, generator=g).double() * self.read_noise
        return quantize8(x + shot + read).to(target.dtype)


@dataclass
class Paired(Task):
    """Real pairs (e.g. night/day): inputs come from a second folder matched to the
    targets by file name (see ImageDataset's input_root); both must be the same size."""

    name: ClassVar[str] = "paired"
    paired: ClassVar[bool] = True

    def degrade(self, target, rng=None):
        raise TypeError("the paired task reads its inputs from files; pass input_root to ImageDataset")


TASKS: dict[str, type[Task]] = {t.name: t for t in (SuperResolution, Colorize, JpegDecompression, SyntheticNight, Paired)}


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


# ---------------------------------------------------------------------------
# Dataset


def _keyed(src: PathOrPaths) -> dict[str, Path]:
    """name -> path: relative path without extension for a folder, stem for a list."""
    if isinstance(src, (str, os.PathLike)):
        root = Path(src)
        items = [(p.relative_to(root).with_suffix("").as_posix(), p) for p in list_images(root)]
    else:
        items = [(Path(p).stem, Path(p)) for p in src]
        if not items:
            raise ValueError("empty list of image paths")
    out: dict[str, Path] = {}
    for k, p in items:
        if k in out:
            raise ValueError(f"two images share the name '{k}': '{out[k]}' and '{p}'")
        out[k] = p
    return out


def _name_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageDataset(Dataset):
    """Cropped (input, target) pairs from a folder (or list) of photos.

    Items: ``{"input": (Cin, h, w), "target": (3, crop, crop), "index": int, "name": str}``
    with h = w = crop for the "same" layout and crop / scale for "upscale".
    ``name`` is the path relative to ``root`` without extension (the stem for a list).

    Per item: load (optionally from the in-memory cache) -> optional prescale ->
    if the short side is below ``crop``, bicubic upscale so it equals ``crop``
    (aspect kept) -> crop (train: random position + random horizontal flip;
    eval: centre, no flip) -> degrade the *cropped* target so the input matches
    it exactly. Randomness comes from a generator seeded by (seed, epoch, index)
    in training (call set_epoch each epoch; varies across epochs, reproducible
    for a seed) and by (seed, index) in eval, so it does not depend on the
    DataLoader's workers or order. Use persistent_workers=False so workers see
    the new epoch.

    prescale: downscale every image by this factor (antialiased) right after
        loading, but never below ``crop`` on the short side. Meant for photos
        much larger than the crop (say > 2x on the short side): camera/phone
        JPEGs carry 8x8 block artefacts and subsampled chroma, and downscaling
        at least 2x averages them out, so the model does not learn to imitate
        them; it also makes crops cover more of the scene.
    skip_bad: every file is fully decoded once at construction (so a broken
        file fails now, not hours into training). False: raise the ImageError
        of the first bad file. True: drop bad files, list them in
        ``self.skipped`` as (path, problem) and warn once with the count.
    cache: keep the decoded, prescaled images in memory (float32, 12 bytes a
        pixel; each DataLoader worker holds its own copy) -- for small datasets.
    input_root: the folder of inputs for the paired task, matched to targets by name.
    levels: tower levels, only checked here (the crop must make an exact pyramid);
        for "upscale" it defaults to, and must equal, log2(task.scale).
    verify: False skips the decode-everything check (errors then surface in __getitem__).
    """

    def __init__(self, root: PathOrPaths, task: Task | str, crop: int = 256, levels: int | None = None,
                 train: bool = True, *, skip_bad: bool = False, seed: int = 0,
                 input_root: PathOrPaths | None = None, prescale: float | None = None,
                 cache: bool = False, verify: bool = True):
        self.task = make_task(task) if isinstance(task, str) else task
        self.crop, self.train, self.seed, self.epoch = int(crop), bool(train), int(seed), 0
        self.prescale, self.cache = prescale, ({} if cache else None)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if prescale is not None and prescale < 1:
            raise ValueError(f"prescale is a downscale factor >= 1, got {prescale}")
        self.levels = self._check_levels(levels)

        targets = _keyed(root)
        if self.task.paired:
            if input_root is None:
                raise ValueError("the paired task needs input_root (the folder of input images)")
            inputs = _keyed(input_root)
            unmatched = sorted([f"{k} (target only)" for k in targets.keys() - inputs.keys()]
                               + [f"{k} (input only)" for k in inputs.keys() - targets.keys()])
            if unmatched:
                raise ValueError(f"paired: {len(unmatched)} image(s) have no partner with the same name "
                                 f"in '{root}' / '{input_root}': {_name_list(unmatched)}")
        elif input_root is not None:
            raise ValueError(f"input_root is only used by the paired task, not {self.task.name!r}")
        self.names = list(targets)
        self.paths = [targets[k] for k in self.names]
        self.input_paths = [inputs[k] for k in self.names] if self.task.paired else None
        self.skipped: list[tuple[str, str]] = []
        if verify:
            self._verify(skip_bad)

    def _check_levels(self, levels: int | None) -> int:
        t, crop = self.task, self.crop
        if t.layout == "upscale":
            auto = int(math.log2(t.scale))
            if levels is not None and levels != auto:
                raise ValueError(f"{t.name} with scale {t.scale} needs levels={auto} (2^levels = scale), got {levels}")
            levels, k = auto, t.scale
        else:
            levels = 1 if levels is None else int(levels)
            k = 2 ** (levels - 1)
        if levels < 1 or crop < 1 or crop % k:
            raise ValueError(f"crop {crop} must be a positive multiple of {k} for {t.name} with {levels} levels")
        return levels

    def _verify(self, skip_bad: bool) -> None:
        def check(i):
            try:
                self._load(i)  # fills the cache when it is on
            except ImageError as e:
                return e
            return None

        n = len(self.paths)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
            errors = list(ex.map(check, range(n)))  # PIL decodes without the GIL
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad and not skip_bad:
            raise errors[bad[0]]
        if bad:
            self.skipped = [(errors[i].path, errors[i].problem) for i in bad]
            keep = [i for i in range(n) if errors[i] is None]
            if not keep:
                raise ValueError(f"all {n} images are unreadable; first: {errors[bad[0]]}")
            if self.cache is not None:
                self.cache = {j: self.cache[i] for j, i in enumerate(keep)}
            self.names = [self.names[i] for i in keep]
            self.paths = [self.paths[i] for i in keep]
            if self.input_paths is not None:
                self.input_paths = [self.input_paths[i] for i in keep]
            warnings.warn(f"skipped {len(bad)} of {n} unreadable image(s); first: {errors[bad[0]]} "
                          f"(see dataset.skipped)", stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        short = min(h, w)
        if self.prescale is not None:
            f = min(self.prescale, short / self.crop)
            if f > 1:
                x = resize(x, (max(self.crop, round(h / f)), max(self.crop, round(w / f))))
        if short < self.crop:  # upscale small images rather than refusing them
            s = self.crop / short
            x = resize(x, (max(self.crop, round(h * s)), max(self.crop, round(w * s))))
        return x

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        y = load_image(self.paths[i])
        x = None
        if self.input_paths is not None:
            x = load_image(self.input_paths[i])
            if x.shape != y.shape:
                raise ValueError(f"paired: input '{self.input_paths[i]}' is {x.shape[1]}x{x.shape[2]} "
                                 f"but target '{self.paths[i]}' is {y.shape[1]}x{y.shape[2]}")
            x = self._prepare(x)
        item = self._prepare(y), x
        if self.cache is not None:
            self.cache[i] = item
        return item

    def generator(self, index: int) -> torch.Generator:
        """The per-item generator: seeded by (seed, epoch, index) in train, (seed, index) in eval."""
        key = [self.seed, 1, self.epoch, index] if self.train else [self.seed, 0, index]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # IndexError past the end; negative indices allowed
        y, x = self._load(index)
        g = self.generator(index)
        c = self.crop
        h, w = y.shape[-2:]
        if self.train:
            top = int(torch.randint(0, h - c + 1, (1,), generator=g))
            left = int(torch.randint(0, w - c + 1, (1,), generator=g))
            flip = bool(torch.rand((), generator=g) < 0.5)
        else:
            top, left, flip = (h - c) // 2, (w - c) // 2, False

        def cut(t):
            t = t[:, top:top + c, left:left + c]
            return t.flip(-1) if flip else t

        y = cut(y)
        x = cut(x) if x is not None else self.task.degrade(y, g)
        return {"input": x.contiguous(), "target": y.contiguous(), "index": index, "name": self.names[index]}
