"""One optimisation step of IMLE training, and the optimizer's parameter groups.

opt = torch.optim.Adam(param_groups(model, lr=1e-4, mapping_lr_mult=0.01))
losses = optimize_step(model, opt, x, y, codes, distance, to_rgb=task.rgb, loss_scale=1 / batch)
losses = optimize_step(model, opt, x, pool.loss_targets(rows, sizes, distance, dev), codes, distance)

A step is the tower's forward and backward, the distance's forward and backward on every level's output,
and Adam. What is not repeated: the targets' distance features, which do not change during a round
(`Pool.loss_targets` embeds each pool entry once per round); Adam runs as one fused kernel rather than a
loop over the ~350 tensors of a tower. `benchmarks/train_step.py` measures a step and its parts; the
figures are in docs/measurements.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import latent
from ..loss import Distance, LevelTarget, ToRGB, level_losses
from ..model import TowerModel

__all__ = ["param_groups", "optimize_step"]


def param_groups(model: TowerModel, lr: float, mapping_lr_mult: float) -> list[dict[str, Any]]:
    """Adam's parameter groups: everything at `lr`, the mapping networks (the global stream) at
    lr x `mapping_lr_mult` (0.01 in the authors' code).

    The groups ask for Adam's fused kernel where this torch has one for the model's device: the
    default loops over the ~350 tensors of a tower (weight norm splits every conv weight in two), a
    few small kernels each, and fused it takes a fraction of that. The same update up to float rounding."""
    mapping = {id(p) for p in model.mapping_parameters()}
    fused = {"fused": True} if _fused_adam(next(model.parameters()).device) else {}
    return [
        {"params": [p for p in model.parameters() if id(p) not in mapping], "lr": lr, **fused},
        {"params": model.mapping_parameters(), "lr": lr * mapping_lr_mult, **fused},
    ]


def _fused_adam(device: torch.device) -> bool:
    # CUDA since torch 2.0, the CPU since 2.4 (a group's "fused" skips the constructor's device check)
    return device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")


def optimize_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor | Sequence[LevelTarget],
    codes: latent.Codes,
    distance: Distance,
    *,
    to_rgb: ToRGB | None = None,
    loss_scale: float = 1.0,
    amp: bool | None = None,
    pixel_weight: float = 0.0,
) -> Tensor:
    """One optimizer step: forward all levels, loss = loss_scale * sum of the per-level losses
    (`chimle.loss.level_losses`), backward, step. `model` is the tower (or its DDP / torch.compile
    wrapper). Returns the detached (N, L) losses.

    `y`: the targets (N, 3, H, W), or their `chimle.loss.level_targets` (e.g. `Pool.loss_targets`): the
    same loss without resizing and embedding the targets on every step.

    The tower runs on channels-last inputs, its forward under bf16 autocast as `amp` says, the loss in
    float32. `amp=None` (the default): on CUDA only, so the CPU path is plain float32 and CPU runs stay
    bit-for-bit reproducible; True: on either device (the CPU's bf16 for `chimle bench gpu`'s precision
    checks); False: float32 everywhere.
    """
    cuda = x.device.type == "cuda"
    # Channels-last activations: cuDNN's bf16 kernels prefer them, and oneDNN runs the tower's narrow
    # convolutions a little faster on them too (benchmarks/train_step.py). Conv outputs and their
    # gradients inherit the layout from the input.
    x = x.contiguous(memory_format=torch.channels_last)
    codes = latent.channels_last(codes)
    if amp or (amp is None and cuda):
        autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()
    with autocast:
        outs = model(x, codes)
    if not cuda:  # but oneDNN runs LPIPS's VGG slower on channels-last: hand it the usual layout
        outs = [o.contiguous() for o in outs]
    if isinstance(y, Tensor):
        losses = level_losses(outs, x, y, distance, to_rgb, pixel_weight)  # (n, L)
    else:
        losses = level_losses(outs, x, None, distance, to_rgb, pixel_weight, targets=y)
    opt.zero_grad(set_to_none=True)
    (losses.sum() * loss_scale).backward()
    opt.step()
    return losses.detach()
