"""Image file IO for chimle: the one place where pixels enter and leave.

Every image inside chimle is a float32 tensor (C, H, W) in [0, 1]; this module
is the boundary that guarantees it.

    from chimle.data.imageio import load_image, save_image, list_images
    x = load_image("photos/cat.jpg")          # (3, H, W) float32 in [0, 1]
    save_image(x, "out/cat.png")              # atomic, rounds to 8 bit
    paths = list_images("photos")             # sorted, recursive

Files that cannot be decoded (corrupt, truncated, not an image) raise ImageError,
a ValueError whose message is one line naming the file and the problem, e.g.
``bad image 'x/y.jpg': truncated file`` -- never a PIL traceback.

Mode handling in load_image (choices, so results do not depend on the format):
  * grey (1, L, I;16*, I, F) is replicated to 3 channels. 16-bit data is divided
    by 65535; Pillow's 32-bit "I" mode is how it hands out 16-bit PNG/TIFF, so it
    is scaled the same way and clipped; "F" is assumed to be in [0, 1] already.
  * alpha (RGBA, LA, PA, P with transparency) is composited onto WHITE, as a
    viewer would show it; dropping alpha instead would expose whatever colour
    sits under transparent pixels (often black or garbage).
  * P (palette), CMYK, YCbCr, ... go through Pillow's convert("RGB") (CMYK
    without ICC profiles: a naive conversion). 16-bit RGB files arrive as 8-bit.
  * the EXIF orientation tag is applied, so photos come out upright.

builtin_photos() / builtin_photo_dir() expose the colour photos that ship inside
the scikit-image wheel as a small offline "folder of photos" for demos and tests.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

PathLike = str | os.PathLike


class ImageError(ValueError):
    """An image file that cannot be used. ``str(err)`` is a single line."""

    def __init__(self, path: PathLike, problem: str):
        # args = (path, problem) keeps the exception picklable across DataLoader workers
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # force one line

    def __str__(self) -> str:
        return f"bad image '{self.path}': {self.problem}"


def _describe(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    low = msg.lower()
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if "cannot identify image file" in low:
        return "not an image (unrecognised format)"
    if "truncated" in low:
        return "truncated file"
    if isinstance(e, Image.DecompressionBombError):
        return "too many pixels (PIL decompression-bomb guard)"
    msg = msg[:200] or "unreadable"
    return msg if msg.lower().startswith(type(e).__name__.lower()) else f"{type(e).__name__}: {msg}"


# Pillow silently pads truncated files with grey when LOAD_TRUNCATED_IMAGES is
# True; we need the error. The flag is a Pillow global, so set it for the
# duration of our decodes only (ref-counted: decodes may run in threads).
_strict_lock = threading.Lock()
_strict_depth = 0
_strict_saved = False


@contextlib.contextmanager
def _strict_decoding():
    global _strict_depth, _strict_saved
    with _strict_lock:
        if _strict_depth == 0:
            _strict_saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def _to_float_rgb(img: Image.Image) -> torch.Tensor:
    """Decoded PIL image of any mode -> (3, H, W) float32 in [0, 1]."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = torch.from_numpy(np.asarray(img).astype(np.float32) / 65535.0).clamp_(0, 1)
        return a.expand(3, *a.shape).contiguous()
    if mode == "F":
        a = torch.from_numpy(np.array(img, dtype=np.float32)).nan_to_num_(0.0).clamp_(0, 1)
        return a.expand(3, *a.shape).contiguous()
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        a = torch.from_numpy(np.array(img.convert("RGBA"))).permute(2, 0, 1).float() / 255.0
        rgb, alpha = a[:3], a[3:]
        return (rgb * alpha + (1.0 - alpha)).contiguous()  # composite on white
    if mode in ("1", "L"):
        a = torch.from_numpy(np.array(img.convert("L"))).float() / 255.0
        return a.expand(3, *a.shape).contiguous()
    if mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0).contiguous()


def load_image(path: PathLike) -> torch.Tensor:
    """Decode an image file fully into a (3, H, W) float32 tensor in [0, 1].

    Raises ImageError (one-line message) for missing, truncated, corrupt or
    non-image files. See the module docstring for how modes are mapped.
    """
    try:
        with _strict_decoding(), Image.open(path) as img:
            img.load()  # force the full decode so truncation is detected here
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:
                pass  # a malformed EXIF block should not make a good image unusable
            return _to_float_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(path, _describe(e)) from None


def read_palette(path: PathLike) -> dict[tuple[int, int, int], int]:
    """A palette file for colour label maps: one class per line, `id r g b` (0-255; '#' comments),
    e.g. Cityscapes' colours. Returns {(r, g, b): id}."""
    table: dict[tuple[int, int, int], int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ImageError(path, _describe(e)) from None
    for n, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            k, r, g, b = (int(v) for v in parts)
        except ValueError:
            raise ImageError(path, f"line {n}: expected 'id r g b', got {line!r}") from None
        if not all(0 <= v <= 255 for v in (r, g, b)) or k < 0 or (r, g, b) in table:
            raise ImageError(path, f"line {n}: bad or repeated entry {line!r}")
        table[(r, g, b)] = k
    if not table:
        raise ImageError(path, "the palette is empty")
    return table


def read_label_map(path: PathLike, palette: dict[tuple[int, int, int], int] | None = None) -> torch.Tensor:
    """A label map file -> (H, W) int64 class ids. Grey (L, I, I;16) and palette-mode ("P") PNGs hold
    the ids themselves (a "P" PNG's pixel values are the indices, whatever colours its palette shows,
    as Cityscapes' and ADE20K's label PNGs); an RGB map needs `palette` (`read_palette`), and a colour
    it does not list is an error naming the file, the colour and a pixel."""
    try:
        with _strict_decoding(), Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return torch.from_numpy(np.asarray(img, dtype=np.int64).copy())
            if mode not in ("RGB", "RGBA"):
                raise ImageError(path, f"a label map must be grey, palette or RGB, not mode {mode}")
            rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(path, _describe(e)) from None
    if palette is None:
        raise ImageError(path, "an RGB label map needs a palette file (data.palette) mapping colours to ids")
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # one integer per colour
    lut = {(r << 16) | (g << 8) | b: k for (r, g, b), k in palette.items()}
    colours, inverse = np.unique(key, return_inverse=True)
    for c in colours:
        if int(c) not in lut:
            y, x = (int(v) for v in np.argwhere(key == c)[0])
            raise ImageError(
                path, f"colour {tuple(int(v) for v in rgb[y, x])} at pixel (x={x}, y={y}) is not in the palette"
            )
    return torch.from_numpy(np.array([lut[int(c)] for c in colours], dtype=np.int64)[inverse.reshape(key.shape)])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8, rounding to nearest (truncation would bias images darker)."""
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


def check_range01(x: torch.Tensor, what: str) -> None:
    """ValueError unless every value of `x` is in [0, 1] (NaN fails too): images inside chimle."""
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):
        raise ValueError(f"{what} must be images in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")


def save_image(x: torch.Tensor, path: PathLike, quality: int = 95) -> Path:
    """Write a (3, H, W), (1, H, W) or (H, W) tensor in [0, 1] to ``path``.

    The format follows the extension (jpg -> JPEG at ``quality``). Values are
    clamped to [0, 1] and rounded to 8 bit; a tensor that is clearly on another
    scale ([-1, 1] or [0, 255]) raises ValueError rather than saving garbage.
    The write is atomic (temp file + os.replace) so a crash never leaves a half
    file; parent folders are created.
    """
    path = Path(path)
    x = x.detach().float().cpu()
    if x.ndim == 3 and x.shape[0] in (1, 3):
        pass
    elif x.ndim == 2:
        x = x[None]
    else:
        raise ValueError(f"save_image expects (3,H,W), (1,H,W) or (H,W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"save_image: non-finite values in image for '{path}'")
    lo, hi = x.min().item(), x.max().item()
    if lo < -0.5 or hi > 1.5:
        raise ValueError(f"save_image: values in [{lo:.3g}, {hi:.3g}] for '{path}'; expected [0, 1]")
    arr = to_uint8(x).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"save_image: unknown image extension '{path.suffix}' for '{path}'")
    kw = {"quality": quality} if fmt == "JPEG" else {}
    atomic_write(path, lambda f: img.save(f, format=fmt, **kw))
    return path


def cut_tiles(image: torch.Tensor, side: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(top, left, tile) for the non-overlapping side x side tiles of (C, H, W), row by row (the remainder
    dropped)."""
    for top in range(0, image.shape[-2] - side + 1, side):
        for left in range(0, image.shape[-1] - side + 1, side):
            yield top, left, image[:, top : top + side, left : left + side]


def save_tiles(image: torch.Tensor, folder: PathLike, side: int, stem: str) -> int:
    """`cut_tiles` written as folder/STEM_TOP_LEFT.png: many held-out images from a few photos (KID needs
    more than a handful). Returns how many."""
    n = 0
    for top, left, tile in cut_tiles(image, side):
        save_image(tile, Path(folder) / f"{stem}_{top}_{left}.png")
        n += 1
    return n


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (plots are written as PNG; no display needed).
    Imported on first use so the core import does not need matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: PathLike, dpi: int = 100, **savefig_kw) -> Path:
    """Write a matplotlib figure as PNG atomically (parents created) and close it."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, **savefig_kw))
    finally:
        pyplot().close(fig)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through `write(f)` atomically: temp file in the same folder, fsync, rename.

    Readers (and a crash at any moment) see the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def list_images(root: PathLike) -> list[Path]:
    """All image files under ``root`` (recursive, symlinks followed), sorted by path.

    Matches IMAGE_EXTENSIONS case-insensitively; hidden files and folders (".x")
    are skipped. Raises FileNotFoundError / NotADirectoryError / ValueError
    (no images) with a message naming the folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"'{root}' is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    if not found:
        exts = " ".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise ValueError(f"no images ({exts}) found in '{root}'")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# ---------------------------------------------------------------------------
# Built-in photos: the colour photographs bundled in the scikit-image wheel.

# name -> file in skimage/data. Read straight from the installed package so no
# code path can reach for the network (skimage.data.* may try to download files
# that are not bundled); anything missing locally is simply left out.
BUILTIN_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
}


def _builtin_sources() -> list[tuple[str, Path]]:
    import skimage.data  # lazy: only needed for the built-in photos

    data_dir = Path(skimage.data.__file__).parent
    found = [(n, data_dir / f) for n, f in BUILTIN_PHOTOS.items() if (data_dir / f).is_file()]
    if not found:
        raise RuntimeError(f"no bundled scikit-image photos found in '{data_dir}'")
    return found


def builtin_photos() -> list[torch.Tensor]:
    """The bundled scikit-image colour photos (astronaut 512x512, chelsea 300x451,
    coffee 400x600, rocket 427x640, motorcycle_left/right 500x741) as (3, H, W)
    tensors in [0, 1], in BUILTIN_PHOTOS order."""
    return [load_image(p) for _, p in _builtin_sources()]


def default_cache_dir() -> Path:
    """Base cache folder: $CHIMLE_CACHE, else ~/.cache/chimle."""
    return Path(os.environ.get("CHIMLE_CACHE") or "~/.cache/chimle").expanduser()


def builtin_photo_dir(cache_dir: PathLike | None = None) -> Path:
    """A folder holding the built-in photos as ``<name>.png``; returns its path.

    ``cache_dir`` is the folder itself; by default ``default_cache_dir()/photos``.
    Files already present are kept (writes are atomic, so a present file is whole).
    """
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "photos"
    for name, src in _builtin_sources():
        dst = out / f"{name}.png"
        if not dst.is_file():
            save_image(load_image(src), dst)
    return out


WALLPAPERS = "wallpapers"  # `data.data` keyword: the shipped models' training photos


def wallpaper_photo_dir(cache_dir: PathLike | None = None) -> Path:
    """The folder of photos the shipped models train on (``data.data: wallpapers``): the photographs
    of Debian's mate-backgrounds and lomiri-wallpapers-16.04, downscaled to 640 px on the long side,
    as `scripts/fetch_training_photos.sh` writes them (default ``default_cache_dir()/wallpapers``)."""
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir() / WALLPAPERS
    if not out.is_dir() or not any(out.glob("*.png")):
        raise FileNotFoundError(f"no training photos in {out}: run scripts/fetch_training_photos.sh first")
    return out


PHOTOS = "photos"  # `data.data` keyword: the photo corpus (docs/data.md)


def photo_corpus_dir(cache_dir: PathLike | None = None) -> Path:
    """The folder of the photo corpus (``data.data: photos``): the real photographs that Debian packages
    ship, de-duplicated and downscaled to 640 px on the long side, as `scripts/fetch_photos.sh` writes
    them (default ``default_cache_dir()/photo_corpus``: ``default_cache_dir()/photos`` holds the held-out
    scikit-image photos of builtin_photo_dir)."""
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "photo_corpus"
    if not out.is_dir() or not any(out.glob("*.png")):
        raise FileNotFoundError(f"no photo corpus in {out}: run scripts/fetch_photos.sh first")
    return out


def read_csv_columns(path: PathLike) -> dict[str, list[float]]:
    """A CSV of numbers with a header row (a run's log.csv) as {column: values}; {} if it is missing."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    return {k: [float(r[i]) for r in rows[1:] if len(r) > i and r[i] != ""] for i, k in enumerate(rows[0])}
