"""One optimisation step of IMLE training, and the optimizer's parameter groups.

opt = torch.optim.Adam(param_groups(model, lr=1e-4, mapping_lr_mult=0.01))
losses = optimize_step(model, opt, x, y, codes, distance, to_rgb=task.rgb, loss_scale=1 / batch)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from .. import latent
from ..loss import Distance, ToRGB, level_losses
from ..model import TowerModel

__all__ = ["param_groups", "optimize_step"]


def param_groups(model: TowerModel, lr: float, mapping_lr_mult: float) -> list[dict[str, Any]]:
    """Adam's parameter groups: everything at `lr`, the mapping networks (the global stream) at
    lr x `mapping_lr_mult` (0.01 in the authors' code)."""
    mapping = {id(p) for p in model.mapping_parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in mapping], "lr": lr},
        {"params": model.mapping_parameters(), "lr": lr * mapping_lr_mult},
    ]


def optimize_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    codes: latent.Codes,
    distance: Distance,
    *,
    to_rgb: ToRGB | None = None,
    loss_scale: float = 1.0,
    amp: bool = True,
    pixel_weight: float = 0.0,
) -> Tensor:
    """One optimizer step: forward all levels, loss = loss_scale * sum of the per-level losses
    (`chimle.loss.level_losses`), backward, step. `model` is the tower (or its DDP / torch.compile
    wrapper). Returns the detached (N, L) losses.

    On CUDA the forward runs under bf16 autocast (if `amp`) on channels-last inputs (conv outputs and
    their gradients inherit the layout, which cuDNN's bf16 kernels prefer); the CPU path is plain
    float32, so CPU runs stay bit-for-bit reproducible.
    """
    cuda = x.device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
        codes = latent.channels_last(codes)
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else contextlib.nullcontext():
        outs = model(x, codes)
    losses = level_losses(outs, x, y, distance, to_rgb, pixel_weight)  # (n, L)
    opt.zero_grad(set_to_none=True)
    (losses.sum() * loss_scale).backward()
    opt.step()
    return losses.detach()
