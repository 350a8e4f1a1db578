"""The training / evaluation dataset: cropped (input, target) pairs from a folder of photos.

    ds = ImageDataset("photos/", make_task("sr", scale=8), crop=64, train=True)
    ds.set_epoch(epoch)                    # train crops are a function of (seed, epoch, index)
    item = ds[0]                           # {"input": (Cin, h, w), "target": (3, crop, crop), "index", "name"}

`TensorPairs` serves in-memory (input, target) tensors the same way (the MNIST illustration).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..resample import resize
from ..rng import seeded
from .imageio import ImageError, list_images, load_image
from .tasks import Task, make_task

__all__ = ["ImageDataset", "TensorPairs"]

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


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
    bad_files: every file is fully decoded once at construction (so a broken
        file fails now, not hours into training). "raise": raise the ImageError
        of the first bad file. "skip": drop bad files, list them in
        ``self.skipped`` as (path, problem) and warn once with the count.
        "unchecked": no decode-everything check (errors then surface in __getitem__).
    cache: keep the decoded, prescaled images in memory (float32, 12 bytes a
        pixel; each DataLoader worker holds its own copy) -- for small datasets.
    input_root: the folder of inputs for the paired task, matched to targets by name.
    levels: tower levels, only checked here (the crop must make an exact pyramid);
        for "upscale" it defaults to, and must equal, log2(task.scale).
    """

    def __init__(
        self,
        root: PathOrPaths,
        task: Task | str,
        crop: int = 256,
        levels: int | None = None,
        train: bool = True,
        *,
        bad_files: str = "raise",
        seed: int = 0,
        input_root: PathOrPaths | None = None,
        prescale: float | None = None,
        cache: bool = False,
    ):
        self.task = make_task(task) if isinstance(task, str) else task
        self.crop, self.train, self.seed, self.epoch = int(crop), bool(train), int(seed), 0
        self.prescale, self.cache = prescale, ({} if cache else None)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if prescale is not None and prescale < 1:
            raise ValueError(f"prescale is a downscale factor >= 1, got {prescale}")
        if bad_files not in ("raise", "skip", "unchecked"):
            raise ValueError(f"bad_files is 'raise', 'skip' or 'unchecked', got {bad_files!r}")
        self.levels = self._check_levels(levels)

        targets = _keyed(root)
        if self.task.paired:
            if input_root is None:
                raise ValueError("the paired task needs input_root (the folder of input images)")
            inputs = _keyed(input_root)
            unmatched = sorted(
                [f"{k} (target only)" for k in targets.keys() - inputs.keys()]
                + [f"{k} (input only)" for k in inputs.keys() - targets.keys()]
            )
            if unmatched:
                raise ValueError(
                    f"paired: {len(unmatched)} image(s) have no partner with the same name "
                    f"in '{root}' / '{input_root}': {_name_list(unmatched)}"
                )
        elif input_root is not None:
            raise ValueError(f"input_root is only used by the paired task, not {self.task.name!r}")
        self.names = list(targets)
        self.paths = [targets[k] for k in self.names]
        self.input_paths = [inputs[k] for k in self.names] if self.task.paired else None
        self.skipped: list[tuple[str, str]] = []
        if bad_files != "unchecked":
            self._verify(skip_bad=bad_files == "skip")

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
            warnings.warn(
                f"skipped {len(bad)} of {n} unreadable image(s); first: {errors[bad[0]]} (see dataset.skipped)",
                stacklevel=3,
            )

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
            x = self.task.read_input(self.input_paths[i])  # an image, or a scene layout's label map
            if x.shape[-2:] != y.shape[-2:]:
                raise ImageError(
                    self.input_paths[i],
                    f"input is {x.shape[1]}x{x.shape[2]} but its target '{self.paths[i]}' is {y.shape[1]}x{y.shape[2]}",
                )
            x = self._prepare(x)
        item = self._prepare(y), x
        if self.cache is not None:
            self.cache[i] = item
        return item

    def whole(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image `index` uncropped: (target, input), input None where the task makes it from the target."""
        return self._load(index)

    def generator(self, index: int) -> torch.Generator:
        """The per-item generator: seeded by (seed, epoch, index) in train, (seed, index) in eval."""
        return seeded(self.seed, 1, self.epoch, index) if self.train else seeded(self.seed, 0, index)

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
            t = t[:, top : top + c, left : left + c]
            return t.flip(-1) if flip else t

        y = cut(y)
        x = cut(x) if x is not None else self.task.degrade(y, g)
        return {"input": x.contiguous(), "target": y.contiguous(), "index": index, "name": self.names[index]}


class TensorPairs(Dataset):
    """In-memory (input, target) pairs, (N, Cin, h, w) and (N, C, H, W) in [0, 1], served like
    `ImageDataset` items (whole images: no crops, so `set_epoch` changes nothing)."""

    train = True

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if len(inputs) != len(targets) or not len(inputs):
            raise ValueError(f"need as many inputs as targets (and some), got {len(inputs)} and {len(targets)}")
        self.inputs, self.targets = inputs, targets

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict:
        return {"input": self.inputs[index], "target": self.targets[index], "index": index, "name": str(index)}
