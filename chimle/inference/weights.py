"""Weights: reading training checkpoints, and safetensors + config for released weights.

    state = load_state(path)                     # a training checkpoint (chimle.training.checkpoint writes them)
    export("runs/x/checkpoints/last.pt", "sr8.safetensors")
    model = chimle.load("sr8.safetensors")       # or a training checkpoint, or a name:
    model = chimle.load("sr8-small")             # shipped (`chimle models`), else in ~/.cache/chimle/weights

A training checkpoint is a torch pickle of plain tensors and numbers (model, optimizer, step, round,
the pool's codes, RNG state, the resolved config); it is read with weights_only=True. Exported
weights are a safetensors file whose metadata holds the model and task configuration as JSON, so
one file is enough to sample.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..data.imageio import atomic_write
from ..model import TowerConfig, TowerModel

__all__ = [
    "CheckpointError",
    "load_state",
    "export",
    "load",
    "load_with_task",
    "weights_dir",
    "shipped_dir",
    "available_models",
    "model_card",
]


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint's state dict. A file that cannot be used raises CheckpointError with one of
    three one-line messages: it does not exist; it is damaged (empty, truncated, corrupted: a PyTorch
    archive that does not read back); it is not a chimle checkpoint (another kind of file, or a PyTorch
    file holding something else). torch's own first line ("Weights only load failed...") would suggest
    an unsafe reload, which is never the fix here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"checkpoint '{path}' is damaged: the file is empty")
    if not head.startswith(_ZIP_MAGIC):  # torch.save writes a zip archive; anything else is another file
        raise CheckpointError(f"'{path}' is not a chimle checkpoint: {_describe_file(head)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        text = " ".join(str(e).split())
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:  # a whole archive, but of pickled Python objects: someone else's file
            raise CheckpointError(
                f"'{path}' is not a chimle checkpoint: it holds Python objects ({unsafe.group(1)}) that chimle "
                f"checkpoints never contain (not loaded, for safety)"
            ) from None
        raise CheckpointError(f"checkpoint '{path}' is damaged (truncated or corrupted): {_reason(text)}") from None
    if not isinstance(state, dict) or not (
        str(state.get("format", "")).startswith("chimle-") or {"model", "model_config"} <= set(state)
    ):
        what = type(state).__name__
        if isinstance(state, dict):
            what = f"a dict with keys {', '.join(map(str, list(state)[:4]))}"
        raise CheckpointError(f"'{path}' is not a chimle checkpoint: a PyTorch file holding {what}")
    return state


_ZIP_MAGIC = b"PK\x03\x04"


def _describe_file(head: bytes) -> str:
    """What a file that is not a PyTorch archive looks like, from its first bytes."""
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "it is an image"
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then a JSON header
        return "it looks like safetensors weights (sample from them; training resumes from a .pt checkpoint)"
    if head[:1] == b"\x80":
        return "it is a bare Python pickle, not the PyTorch archive chimle writes"
    return "not a PyTorch file"


def _reason(text: str) -> str:
    """torch's message for an unreadable archive, without its boilerplate."""
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if m:
        return f"its pickled index does not decode ({m.group(1).strip()})"
    return text.split(". This is an internal")[0].split(". ")[0][:200]


def export(checkpoint: str | Path, out: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Training checkpoint -> safetensors with {"model": TowerConfig, "task": task config} metadata;
    `card` (a model card: data, steps, wall time, metrics) is stored beside them as JSON."""
    state = load_state(checkpoint)
    meta = {
        "model": json.dumps(state["model_config"]),
        "task": json.dumps(state["task_config"]),
        "step": str(state["step"]),
        "format": "chimle-1",
    }
    if card is not None:
        meta["card"] = json.dumps(card)
    tensors = {k: v.contiguous() for k, v in state["model"].items()}
    return atomic_write(out, lambda f: f.write(save(tensors, metadata=meta)))


def weights_dir() -> Path:
    """Where released weights are looked up by name: $CHIMLE_HOME/weights (default ~/.cache/chimle/weights)."""
    return Path(os.environ.get("CHIMLE_HOME", Path.home() / ".cache" / "chimle")) / "weights"


def shipped_dir() -> Path:
    """The models that ship inside the package (chimle/weights/*.safetensors, README "Shipped models")."""
    return Path(__file__).resolve().parent.parent / "weights"


def available_models() -> dict[str, Path]:
    """{name: file} of the weights a name can load: the shipped ones, then the user's in `weights_dir()`
    (a user's file does not shadow a shipped name)."""
    found: dict[str, Path] = {}
    for d in (shipped_dir(), weights_dir()):
        if d.is_dir():
            for q in sorted(d.glob("*.safetensors")):
                found.setdefault(q.stem, q)
    return found


def model_card(path: str | Path) -> dict[str, Any]:
    """What a weights file (or name) says of itself without building the model: its task, its model
    config, the training step, the file size, and its model card (`export(card=...)`) if it has one."""
    p = _resolve(path)
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    return {
        "file": str(p),
        "megabytes": round(p.stat().st_size / 2**20, 2),
        "task": json.loads(meta.get("task", "{}")),
        "model": json.loads(meta.get("model", "{}")),
        "step": int(meta.get("step", 0)),
        **json.loads(meta.get("card", "{}")),
    }


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    if not p.suffix:  # a name: the shipped models, then the user's released weights
        models = available_models()
        if p.name in models:
            return models[p.name]
        raise CheckpointError(
            f"no weights named '{path}' (shipped, or in {weights_dir()}); available: {', '.join(models) or 'none'}"
        )
    raise CheckpointError(f"weights file '{path}' does not exist")


def load_with_task(path: str | Path, device: str | torch.device = "cpu") -> tuple[TowerModel, dict]:
    """(model in eval mode, task config dict) from exported weights, a training checkpoint, or a name."""
    p = _resolve(path)
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"weights file '{p}' cannot be read: {str(e).splitlines()[0]}") from None
        if "model" not in meta:
            raise CheckpointError(f"weights file '{p}' has no chimle model config in its metadata")
        model_cfg, task_cfg = json.loads(meta["model"]), json.loads(meta.get("task", "{}"))
    else:
        state = load_state(p)
        if "model" not in state or "model_config" not in state:
            raise CheckpointError(f"checkpoint '{p}' is not a chimle training checkpoint")
        tensors, model_cfg, task_cfg = state["model"], state["model_config"], state.get("task_config", {})
    model = TowerModel(TowerConfig.from_dict(model_cfg))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"'{p}' does not match its model config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), task_cfg


def load(path: str | Path, device: str | torch.device = "cpu") -> TowerModel:
    """A ready model (eval mode) from exported weights, a training checkpoint, or a released name."""
    return load_with_task(path, device)[0]
