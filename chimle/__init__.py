"""chimle: multimodal conditional image synthesis with Implicit Maximum Likelihood Estimation.

The Tower Implicit Model (TIM), the cIMLE and CHIMLE latent searches, LPIPS with real weights,
training, sampling and the papers' metrics.

    import chimle
    model = chimle.TowerModel(chimle.TowerConfig.preset("tiny"))
    codes = model.sample_codes(4)
    outs = model(x, codes)                      # one image in [0, 1] per level
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

from . import latent, search
from .distances.lpips import LPIPS
from .inference.weights import load
from .model import TowerConfig, TowerModel

__version__ = "0.1.0"
__all__ = ["TowerConfig", "TowerModel", "LPIPS", "latent", "search", "load", "__version__"]
