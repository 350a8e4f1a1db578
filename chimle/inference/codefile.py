"""Latent codes as files: one code (batch 1) saved as .npz, read back, and checked against a model and an input.

The explorer page (`chimle explore`) offers every result's code for download; `chimle sample --code` redraws
that exact output from it (`chimle.inference.explore.sample_with_code`), and the page takes it back as a result
(its "code" upload). The format:

    format    "chimle-code-1"
    meta      JSON: what the code belongs to (`chimle.inference.explore.code_meta`: the input's size, the task,
              the model's levels and code sizes, the page's threads...)
    style_l   (code_dim,) float32, for l = 1..L; (code_dim, G, G) for a model with `style_grid` G > 1
    noise_l   (noise_channels, h_l, w_l) float32

    save_code("pick.npz", latent.index(codes, [3]), meta)
    codes, meta = load_code("pick.npz")
    check_code(model, codes, x)        # ValueError (one line) unless it fits this model and input
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from ..data.imageio import atomic_write
from ..latent import Codes, Component
from ..model import TowerModel

__all__ = ["CODE_FORMAT", "save_code", "load_code", "check_code"]

CODE_FORMAT = "chimle-code-1"


def save_code(dest: str | Path | BinaryIO, codes: Codes, meta: dict | None = None) -> None:
    """One code (batch 1) as .npz: `style_l` (code_dim,) and `noise_l` (C, h_l, w_l) for l = 1..L, float32,
    plus `format` and `meta` (JSON). A path or a binary file object."""
    if codes[0].style.shape[0] != 1:
        raise ValueError(f"save_code saves one code, got a batch of {codes[0].style.shape[0]}")
    arrays = {"format": np.array(CODE_FORMAT), "meta": np.array(json.dumps(meta or {}))}
    for l, c in enumerate(codes, 1):
        arrays[f"style_{l}"] = c.style[0].detach().float().cpu().numpy()
        arrays[f"noise_{l}"] = c.noise[0].detach().float().cpu().numpy()
    if isinstance(dest, (str, Path)):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(dest, lambda f: f.write(buf.getvalue()))
    else:
        np.savez(dest, **arrays)


def load_code(src: str | Path | BinaryIO, name: str | None = None) -> tuple[Codes, dict]:
    """(code (batch 1), meta) from a file written by `save_code`; a bad file raises ValueError naming it
    (`name`, default the path)."""
    name = name or (str(src) if isinstance(src, (str, Path)) else "code")
    try:
        f = np.load(src, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"code file '{name}' does not exist") from None
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types for a bad file
        raise ValueError(f"code file '{name}' cannot be read: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"'{name}' is not a chimle code (.npz written by chimle explore)")
    with f:
        if "format" not in f or str(f["format"]) != CODE_FORMAT:
            raise ValueError(f"'{name}' is not a chimle code (.npz written by chimle explore)")
        try:
            meta = json.loads(str(f["meta"]))
            codes, l = [], 1
            while f"style_{l}" in f:
                codes.append(
                    Component(
                        torch.from_numpy(f[f"style_{l}"]).float()[None], torch.from_numpy(f[f"noise_{l}"]).float()[None]
                    )
                )
                l += 1
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"code file '{name}' cannot be read: {' '.join(str(e).split())[:200]}") from None
    if not codes:
        raise ValueError(f"'{name}' holds no code")
    return codes, meta


def check_code(model: TowerModel, codes: Codes, x: Tensor, name: str = "the code") -> None:
    """ValueError (one line) unless `codes` fits the model and the input x."""
    layout = model.latent_layout(tuple(x.shape[-2:]))
    if len(codes) != layout.levels:
        raise ValueError(f"{name} has {len(codes)} levels, the model {layout.levels}")
    for l, (c, (h, w)) in enumerate(zip(codes, layout.sizes), 1):
        want = (layout.noise_channels, h, w)
        if tuple(c.style.shape[1:]) != layout.style_shape or tuple(c.noise.shape[1:]) != want:
            raise ValueError(
                f"{name} does not fit this model and input: level {l} has style {tuple(c.style.shape[1:])} and "
                f"noise {tuple(c.noise.shape[1:])}, this input needs {layout.style_shape} and {want} "
                "(another input size or model?)"
            )
