"""chimle: multimodal conditional image synthesis with Implicit Maximum Likelihood Estimation.

The Tower Implicit Model (TIM), the cIMLE and CHIMLE latent searches, LPIPS with real weights,
training, sampling and the papers' metrics. Heavy or optional parts are imported on first use.

    import chimle
    model = chimle.TowerModel(chimle.TowerConfig.preset("tiny"))
    codes = model.sample_codes(4)
    outs = model(x, codes)                      # one image in [0, 1] per level
    codes, dists = chimle.search.hierarchical(model, x, y, chimle.LPIPS("alex"), [20, 10, 5])
"""

from __future__ import annotations

import importlib
from typing import Any

from . import latent, search
from .model import TowerConfig, TowerModel

__version__ = "0.1.0"
__all__ = ["TowerConfig", "TowerModel", "LPIPS", "latent", "search", "metrics", "load", "__version__"]

_LAZY = {"LPIPS": ("chimle.distance", "LPIPS"), "load": ("chimle.checkpoint", "load"),
         "metrics": ("chimle.metrics", None), "data": ("chimle.data", None)}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'chimle' has no attribute {name!r}")
