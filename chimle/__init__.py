"""chimle: multimodal conditional image synthesis with Implicit Maximum Likelihood Estimation.

The Tower Implicit Model (TIM), the cIMLE and CHIMLE latent searches, LPIPS with real weights,
training, sampling and the papers' metrics.

    import chimle
    model = chimle.TowerModel(chimle.TowerConfig.preset("tiny"))
    codes = model.sample_codes(4)
    outs = model(x, codes)                      # one image in [0, 1] per level
    samples = chimle.sample("sr8-small", "photo.png", num=8, seed=0)   # as `chimle sample`: (8, 3, H, W)
    chimle.save_image(samples[0], "sample_0.png")
    codes, dists = chimle.search.hierarchical(model, x, y, chimle.LPIPS("alex"), [20, 10, 5])

The package is built in floors, each importing only the ones below it:
  core         latent, model, search, loss, distances, resample, memory, rng
  data         tasks, datasets, image files, scene-layout rebalancing
  inference    weights, sampling, tiling, figures, files
  training     config, pool, trainer, checkpoints, DDP
  evaluation   metrics, Inception, `chimle eval`, sample efficiency
  apps         the command line, demo, MNIST illustration, benchmarks (never imported by the library)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below are, for type checkers and editors
    from . import latent, search
    from .data.imageio import save_image
    from .distances.lpips import LPIPS
    from .inference.files import sample_image as sample
    from .inference.onnx_export import export_onnx
    from .inference.weights import from_pretrained, load, save_pretrained
    from .model import TowerConfig, TowerModel

__version__ = "0.1.0"
__all__ = [
    "TowerConfig",
    "TowerModel",
    "LPIPS",
    "latent",
    "search",
    "load",
    "__version__",
    "sample",
    "save_image",
    "save_pretrained",
    "from_pretrained",
    "export_onnx",
]

# The names load on first use (PEP 562): `import chimle` alone, and the `chimle` command's parser, which
# imports this package first, do not import torch (a few seconds); `chimle --help` answers at once.
_LAZY = {
    "TowerConfig": ".model",
    "TowerModel": ".model",
    "LPIPS": ".distances.lpips",
    "load": ".inference.weights",
    "save_pretrained": ".inference.weights",
    "from_pretrained": ".inference.weights",
    "export_onnx": ".inference.onnx_export",  # needs the onnx extra only when called
    "sample": ".inference.files:sample_image",
    "save_image": ".data.imageio",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        value = getattr(importlib.import_module(module, __name__), attr or name)
    elif name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:  # a submodule: chimle.search, chimle.latent, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
