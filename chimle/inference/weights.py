"""Weights: reading training checkpoints, and safetensors + config for released weights.

    state = load_state(path)                     # a training checkpoint (chimle.training.checkpoint writes them)
    export("runs/x/checkpoints/last.pt", "sr8.safetensors")
    model = chimle.load("sr8.safetensors")       # or a training checkpoint, or a name:
    model = chimle.load("sr8-small")             # shipped (`chimle models`), else in ~/.cache/chimle/weights

A training checkpoint is a torch pickle of plain tensors and numbers (model, optimizer, step, round,
the pool's codes, RNG state, the resolved config); it is read with weights_only=True. Exported
weights are a safetensors file whose metadata holds the model and task configuration as JSON, so
one file is enough to sample.

A model folder is the same for people and tools that expect one (offline, no hub):

    save_pretrained("sr8-small", "my-sr8")          # or a TowerModel (task=, card=), a checkpoint, a folder
    model = chimle.load("my-sr8")                   # chimle.from_pretrained("my-sr8") is the same

    my-sr8/config.json        {"format", "model": TowerConfig, "task", "step", "card"}: what is read
    my-sr8/model.safetensors  the weights, with the same metadata as an exported file (usable alone)
    my-sr8/README.md          the model card for people: summary, use, training, metrics

Every command that takes a model takes a folder; a folder in `weights_dir()` loads by its name.
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
    "save_pretrained",
    "from_pretrained",
    "FOLDER_FILES",
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
    `card` (a model card: data, steps, wall time, metrics) is stored beside them as JSON. A model folder,
    a weights file or a name works too (a folder's file is written alone), keeping its card unless
    `card` replaces it."""
    p = Path(checkpoint)
    if p.is_dir() or p.suffix == ".safetensors" or (not p.suffix and not p.exists()):  # not a training checkpoint
        tensors, model_cfg, task_cfg, step, own_card = _read(_resolve(p))
        card = own_card if card is None else card
    else:
        state = load_state(checkpoint)
        tensors, model_cfg, task_cfg, step = state["model"], state["model_config"], state["task_config"], state["step"]
    meta = {"model": json.dumps(model_cfg), "task": json.dumps(task_cfg), "step": str(step), "format": "chimle-1"}
    if card is not None:
        meta["card"] = json.dumps(card)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
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
            for q in sorted(d.iterdir()):
                if q.suffix == ".safetensors" and q.is_file():
                    found.setdefault(q.stem, q)
                elif q.is_dir() and (q / "config.json").is_file():  # a model folder (save_pretrained)
                    found.setdefault(q.name, q)
    return found


def model_card(path: str | Path) -> dict[str, Any]:
    """What a weights file (or name) says of itself without building the model: its task, its model
    config, the training step, the file size, and its model card (`export(card=...)`) if it has one."""
    p = _resolve(path)
    if p.is_dir():
        config = _folder_config(p)
        model_cfg, task_cfg, step, card = (
            config["model"],
            config.get("task", {}),
            config.get("step", 0),
            config.get("card"),
        )
        size = _folder_weights(p).stat().st_size
    else:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        model_cfg, task_cfg = json.loads(meta.get("model", "{}")), json.loads(meta.get("task", "{}"))
        step, card, size = int(meta.get("step", 0)), json.loads(meta.get("card", "{}")), p.stat().st_size
    return {
        "file": str(p),
        "megabytes": round(size / 2**20, 2),
        "task": task_cfg,
        "model": model_cfg,
        "step": int(step),
        **(card or {}),
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


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"weights file '{p}' cannot be read: {str(e).splitlines()[0]}") from None
    return tensors, meta


def _read(p: Path) -> tuple[dict[str, torch.Tensor], dict, dict, int, dict | None]:
    """(tensors, model config, task config, step, card or None) of a resolved weights file, checkpoint or folder."""
    if p.is_dir():
        config = _folder_config(p)
        tensors, _ = _read_safetensors(_folder_weights(p))
        return tensors, config["model"], config.get("task", {}), int(config.get("step", 0)), config.get("card")
    if p.suffix == ".safetensors":
        tensors, meta = _read_safetensors(p)
        if "model" not in meta:
            raise CheckpointError(f"weights file '{p}' has no chimle model config in its metadata")
        card = json.loads(meta["card"]) if "card" in meta else None
        return tensors, json.loads(meta["model"]), json.loads(meta.get("task", "{}")), int(meta.get("step", 0)), card
    state = load_state(p)
    if "model" not in state or "model_config" not in state:
        raise CheckpointError(f"checkpoint '{p}' is not a chimle training checkpoint")
    return state["model"], state["model_config"], state.get("task_config", {}), int(state.get("step", 0)), None


def load_with_task(path: str | Path, device: str | torch.device = "cpu") -> tuple[TowerModel, dict]:
    """(model in eval mode, task config dict) from exported weights, a training checkpoint, a model folder
    or a name."""
    p = _resolve(path)
    tensors, model_cfg, task_cfg, _, _ = _read(p)
    try:
        model = TowerModel(TowerConfig.from_dict(model_cfg))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"'{p}' holds a model config chimle cannot build: {str(e).splitlines()[0]}") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"'{p}' does not match its model config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), task_cfg


def load(path: str | Path, device: str | torch.device = "cpu") -> TowerModel:
    """A ready model (eval mode) from exported weights, a training checkpoint, a model folder or a released name."""
    return load_with_task(path, device)[0]


def from_pretrained(folder_or_name: str | Path, device: str | torch.device = "cpu") -> TowerModel:
    """A ready model (eval mode) from a model folder (`save_pretrained`) or a name; `load` under the name
    other libraries use (it also takes a weights file or a training checkpoint)."""
    return load(folder_or_name, device)


# ----------------------------------------------------------------------------------------------
# Model folders

FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
_FOLDER_FORMAT = "chimle-folder-1"


def _folder_weights(folder: Path) -> Path:
    p = folder / "model.safetensors"
    if not p.is_file():
        where = f"model folder '{folder}' has" if (folder / "config.json").is_file() else f"'{folder}' is a folder with"
        raise CheckpointError(f"{where} no model.safetensors (a model folder holds {', '.join(FOLDER_FILES)})")
    return p


def _folder_config(folder: Path) -> dict[str, Any]:
    p = folder / "config.json"
    if not p.is_file():
        _folder_weights(folder)  # a folder with neither file: say that first
        raise CheckpointError(f"model folder '{folder}' has no config.json (it says which tower the weights are)")
    try:
        config = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{p}' is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"'{p}' has no \"model\" entry (the tower's config)")
    return config


def save_pretrained(
    model: TowerModel | str | Path,
    folder: str | Path,
    *,
    task: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder: config.json, model.safetensors and README.md (see the module docstring).

    `model` is a TowerModel, or anything `load` takes (a name, weights file, checkpoint or folder), whose
    task, step and card come along; `task` and `card` (a model card, as `export(card=...)` stores it)
    replace theirs. Each file is written whole or not at all. Returns the folder."""
    step = 0
    if isinstance(model, TowerModel):
        tensors, model_cfg, own_task, own_card = model.state_dict(), model.cfg.to_dict(), {}, None
    else:
        tensors, model_cfg, own_task, step, own_card = _read(_resolve(model))
        TowerConfig.from_dict(model_cfg)  # refuse a config that would not load back
    task = own_task if task is None else task
    card = own_card if card is None else card
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"'{folder}' is a file, not a folder for a model")
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"format": _FOLDER_FORMAT, "model": model_cfg, "task": task, "step": step}
    if card is not None:
        config["card"] = card
    meta = {"model": json.dumps(model_cfg), "task": json.dumps(task), "step": str(step), "format": "chimle-1"}
    if card is not None:
        meta["card"] = json.dumps(card)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(folder / "model.safetensors", lambda f: f.write(save(tensors, metadata=meta)))
    atomic_write(folder / "config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    params = sum(v.numel() for v in tensors.values())  # the parameters (weight norm's g and v)
    readme = _readme(model_cfg, task, step, card, params)
    atomic_write(folder / "README.md", lambda f: f.write(readme.encode()))
    return folder


def _readme(model_cfg: dict, task: dict, step: int, card: dict | None, params: int) -> str:
    """The model card as Markdown (README.md of a model folder)."""
    card = card or {}
    what = ", ".join(f"{k}={v}" for k, v in task.items() if k != "name")
    title = f"chimle {task.get('name', 'tower')}" + (f" ({what})" if what else "")
    lines = [f"# {title}", ""]
    if card.get("summary"):
        lines += [str(card["summary"]), ""]
    lines += [
        f"A Tower Implicit Model ({model_cfg.get('layout', 'same')} layout, {model_cfg.get('levels')} levels, "
        f"{params / 1e6:.2f} M parameters) trained with chimle's IMLE search"
        + (f" for {step} steps." if step else "."),
        "",
        "## Use",
        "",
        "```python",
        "import chimle",
        'model = chimle.load("path/to/this/folder")',
        "```",
        "",
        "or `chimle sample path/to/this/folder photo.png --num 8 --out samples/`.",
        "",
        "## Files",
        "",
        "- `config.json`: the tower's config (`model`), the task (`task`), the training step and this card",
        "- `model.safetensors`: the weights; its metadata repeats the config, so the file also loads alone",
        "- `README.md`: this card",
    ]
    facts = [(k, card[k]) for k in ("data", "held_out", "config", "wall_minutes", "hardware") if k in card]
    if facts:
        lines += ["", "## Training", ""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in facts]
    metrics = {k: v for k, v in card.get("metrics", {}).items() if isinstance(v, int | float)}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    rest = {
        k: v
        for k, v in card.items()
        if k not in {"summary", "metrics", "data", "held_out", "config", "wall_minutes", "hardware"}
    }
    if rest:
        lines += ["", "## More", "", "```json", json.dumps(rest, indent=2), "```"]
    return "\n".join(lines) + "\n"
