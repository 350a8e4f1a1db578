"""ONNX export of a tower: one graph that draws any sample, the latent code being among its inputs.

    model = chimle.load("sr8-small")
    export_onnx(model, "sr8.onnx", size=(48, 48), task={"name": "sr", "scale": 8})   # `chimle export`
    session = onnxruntime.InferenceSession("sr8.onnx")
    codes = model.sample_codes(4, torch.Generator().manual_seed(0), input_hw=(48, 48))
    y = session.run(None, onnx_feed(x, codes))[0]      # == model(x, codes)[-1], within float rounding

Graph inputs, the layout of `chimle.latent` (`TowerModel.latent_layout`), coarsest level first:
    input     (N, in_channels, H, W)               the conditioning image in [0, 1]
    style{l}  (N, code_dim)                        level l's global code, l = 1..L
              (N, code_dim, G, G)                  for a model with `style_grid` G > 1
    noise{l}  (N, noise_channels, h_l, w_l)        level l's noise map (`LatentLayout.sizes`)
and one output, `output` (N, out_channels, H * scale, W * scale): the last level's image in [0, 1]
(colourisation: the chroma ab01 that the task composes with the input's lightness). A sample is whatever
code is fed in: N(0, I) draws, a code saved by `chimle explore`, an interpolation.

By default the batch and the image size are dynamic: one file takes any N and any H x W the tower takes
("upscale": any size; "same": sides divisible by 2^(L-1)); `dynamic=False` fixes both to the example's.
The model and task configs and the latent layout are stored in the file's metadata (`chimle.*` keys).
Needs the `onnx` extra (`pip install "chimle[onnx]"`: onnx, onnxscript for torch's exporter, onnxruntime
to run it); `import chimle` never does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..latent import Codes, Component
from ..model import LevelState, TowerModel

__all__ = ["export_onnx", "onnx_feed", "input_names", "OPSET"]

OPSET = 18  # the first with Resize's antialias, which the "same" layout's input pyramid needs


def input_names(levels: int) -> list[str]:
    """The graph's input names: "input", then "style1", "noise1", ..., "style{L}", "noise{L}"."""
    return ["input"] + [f"{k}{l}" for l in range(1, levels + 1) for k in ("style", "noise")]


def onnx_feed(x: Tensor, codes: Codes) -> dict[str, np.ndarray]:
    """The inputs of an exported graph for an input batch `x` and whole codes (one component per level)."""
    arrays = [x] + [t for c in codes for t in c]
    return {
        n: a.detach().to("cpu", torch.float32).contiguous().numpy() for n, a in zip(input_names(len(codes)), arrays)
    }


class _Sampler(nn.Module):
    """forward(x, style1, noise1, ...) -> the last level's output: the tower with its code as plain tensors."""

    def __init__(self, model: TowerModel):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, *z: Tensor) -> Tensor:
        cfg = self.model.cfg
        codes = [Component(z[2 * i], z[2 * i + 1]) for i in range(cfg.levels)]
        if cfg.layout == "upscale":
            return self.model(x, codes)[-1]
        state = LevelState(self._pyramid(x), None, [], None)
        for level, z_l in enumerate(codes, 1):
            state = self.model.step(level, state, z_l)
        return state.output

    def _pyramid(self, x: Tensor) -> list[Tensor]:
        """The "same" layout's input at every level, as `TowerModel.initial_state` makes it with
        `chimle.resample.resize` (antialiased bicubic, clamped; the full size is the input itself). Written
        out here because resize turns the sizes into Python ints, which would fix a dynamic size to the
        example's; the test compares the two at several sizes."""
        levels = self.model.cfg.levels
        out = []
        for l in range(levels):
            f = 2 ** (levels - 1 - l)
            if f == 1:
                out.append(x)
            else:
                size = (x.shape[-2] // f, x.shape[-1] // f)
                out.append(F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1))
        return out


def _plain(model: TowerModel) -> TowerModel:
    """A copy in eval mode whose weight-normalised convs hold their weights g * v / ||v|| as plain tensors:
    computed once here rather than stored as g and v for the graph to combine (a smaller file, the same
    outputs)."""
    from torch.nn.utils import parametrize

    plain = TowerModel(model.cfg)  # not a deepcopy: a copy of a parametrized module shares its parametrizations
    plain.load_state_dict(model.state_dict())
    plain = plain.to(model.device).eval()
    for m in plain.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return plain


def _dynamic_shapes(model: TowerModel) -> dict[str, Any]:
    """torch.export's dynamic dimensions: the batch, and the size in units of the coarsest noise map, which
    every other side is a multiple of (so one graph keeps the level sizes consistent)."""
    from torch.export import Dim

    cfg = model.cfg
    batch, h, w = Dim("batch", min=1), Dim("height", min=1), Dim("width", min=1)
    f = 1 if cfg.layout == "upscale" else 2 ** (cfg.levels - 1)
    x = {0: batch, 2: f * h, 3: f * w} if f > 1 else {0: batch, 2: h, 3: w}
    z = []
    for l in range(cfg.levels):
        k = 2**l
        z += [{0: batch}, {0: batch, 2: k * h, 3: k * w} if k > 1 else {0: batch, 2: h, 3: w}]
    return {"x": x, "z": tuple(z)}


def export_onnx(
    model: TowerModel,
    out: str | Path,
    size: tuple[int, int],
    *,
    task: dict[str, Any] | None = None,
    dynamic: bool = True,
    batch: int = 1,
    opset: int = OPSET,
) -> Path:
    """Write `model` as an ONNX graph (see the module docstring) for inputs of `size` = (H, W), dynamic in
    batch and size unless `dynamic=False` (then for `batch` inputs of that size); `task` (a task config, as
    `load_with_task` returns it) is stored in the metadata beside the model config. Returns the file's path."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter is built on it)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'chimle[onnx]'"
        ) from None
    out = Path(out)
    h, w = (int(s) for s in size)
    if min(h, w, batch) < 1:
        raise ValueError(f"input size and batch must be positive, got {h}x{w} and {batch}")
    sizes = model.cfg.level_sizes(h, w)  # a ValueError names the size a "same" tower refuses
    model = _plain(model)
    dev = model.device
    ex_h, ex_w = h, w
    if dynamic and min(sizes[0]) < 2:  # torch.export fixes a dimension of 1 (it may broadcast): a larger example
        ex_h, ex_w = 2 * h, 2 * w
    n = max(batch, 2) if dynamic else batch  # a dynamic batch needs an example of two rows, for the same reason
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, model.cfg.in_channels, ex_h, ex_w, generator=g).to(dev)
    codes = model.sample_codes(n, g, input_hw=(ex_h, ex_w), device=dev)
    args = (x, *[t for c in codes for t in c])
    names = input_names(model.cfg.levels)
    with _quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(
                _Sampler(model).eval(),
                args,
                input_names=names,
                output_names=["output"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(model) if dynamic else None,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; one line says which
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = " (try a fixed size: dynamic=False, `chimle export --static`)" if dynamic else ""
            raise ValueError(f"cannot export the tower to ONNX{hint}: {first}") from None
    layout = model.latent_layout((h, w))
    program.model.metadata_props.update(
        {
            "chimle.model": json.dumps(model.cfg.to_dict()),
            "chimle.task": json.dumps(task or {}),
            "chimle.latent": json.dumps(
                {
                    "code_dim": layout.code_dim,
                    "noise_channels": layout.noise_channels,
                    "sizes": layout.sizes,
                    **({"style_grid": layout.style_grid} if layout.style_grid > 1 else {}),
                }
            ),
            "chimle.inputs": json.dumps(names),
            "chimle.dynamic": json.dumps(dynamic),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.new")  # a failed write leaves no half file at `out`
    try:
        program.save(staged, external_data=False)
        os.replace(staged, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    return out


@contextlib.contextmanager
def _quiet():
    """The exporter's chatter, which says nothing about the tower: optional torchvision ops it skips, torch's
    own deprecations, and dynamic axes renamed because they are multiples of one another."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            yield
    finally:
        logger.setLevel(level)
