"""Typed configuration: dataclasses, loaded from YAML, checked strictly.

Every field has a comment; unknown keys and wrong types are rejected with the key's dotted name.

    cfg = load_config("configs/sr16_paper.yaml", overrides=["train.steps=100", "search.method=cimle"])
    print(dump_config(cfg))         # the resolved YAML, as written to runs/NAME/config.yaml

`chimle train --config FILE --set key=value` wraps this. Defaults follow the authors' schedule
(docs/design.md) scaled down where the paper's value would not run on a CPU: the
"paper" example configs in configs/ restore the full values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.tasks import TASKS
from ..distances import DISTANCES
from ..model import PRESETS, TowerConfig
from ..search import ABLATIONS

__all__ = [
    "METHODS",
    "ON_NONFINITE",
    "Config",
    "DataConfig",
    "SearchConfig",
    "TrainConfig",
    "ConfigError",
    "load_config",
    "dump_config",
    "from_dict",
    "apply_overrides",
    "resolve_model",
]


METHODS = ("chimle", "cimle")  # hierarchical (Algorithm 1) | flat (Eq. 1)
ON_NONFINITE = ("stop", "skip", "rollback")  # train.on_nonfinite


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class DataConfig:
    task: str = "sr"  # sr | colorize | jpeg | paired | night (synthetic night-to-day) | layout (label maps)
    # folder of training photos (targets), or a keyword: "builtin" = scikit-image's photos (held out from the
    # shipped models), "wallpapers" = the 28 Debian photos of the -small models, "photos" = the photo corpus
    data: str = ""
    target: str = ""  # paired and layout tasks: folder of target images (then `data` holds the inputs)
    val_data: str = ""  # optional folder of held-out photos for sample grids ("" = none)
    scale: int = 8  # sr only: upscaling factor, 2^levels (16 in CHIMLE, 8 in cIMLE)
    quality: int = 1  # jpeg only: JPEG quality of the inputs (1 in the paper)
    crop: int = 64  # side of the training crops, at the target resolution
    prescale: float = 0.0  # downscale photos by this factor after loading (0 = off); >= 2 for camera JPEGs
    skip_bad: bool = False  # skip unreadable images with a warning instead of stopping
    cache: bool = True  # keep decoded images in memory (small datasets; set false for large ones)
    verify: bool = True  # decode every file once at start-up so a bad file fails now, not mid-run
    # layout only (scene layouts, cIMLE Sect. 4.2)
    num_classes: int = 0  # classes of the label maps (0 = the largest id found in `data` + 1)
    ignore_index: int = 255  # the void id: no class, zero loss weight
    palette: str = ""  # palette file (`id r g b` per line) for colour label maps; "" = maps of class ids
    rebalance: bool = False  # dataset rebalancing (Sect. 4.2.3): pool images drawn in proportion to rarity


@dataclass
class SearchConfig:
    method: str = "chimle"  # chimle (hierarchical, Algorithm 1) | cimle (flat, Eq. 1)
    samples_per_level: list[int] = field(default_factory=lambda: [20, 10, 5])  # CHIMLE m_l (paper 200,200,20,10)
    num_samples: int = 35  # cIMLE m, whole codes per image (cIMLE SR used 100)
    ablation: str = "full"  # CHIMLE Fig. 7: full | no_ic | no_ic_pe | no_ic_pe_cd
    distance: str = "vgg"  # search and loss: LPIPS vgg (authors) | alex | cIMLE's pixel_vgg | vgg_l1 | l2 (pixels)
    memory_budget: str = ""  # bytes for a chunk of candidates, e.g. "4GB" ("" = half the free GPU / 2 GB)
    batch: int = 16  # inputs searched together (rows of candidates = batch * m)
    zero_code_rounds: int = 0  # cIMLE pretraining: the first rounds train with z = 0 instead of searching
    compile: bool = False  # torch.compile the search's levels (pays off only in long runs: benchmarks/compile.py)


@dataclass
class TrainConfig:
    steps: int = 2000  # total optimizer steps
    pool_size: int = 400  # images (random crops) whose codes are searched per round (paper 400)
    steps_per_round: int = 10000  # steps trained on one pool's codes before the next search (paper 10,000)
    batch_size: int = 1  # images per step (paper 1)
    lr: float = 1e-4  # Adam learning rate (paper 1e-4)
    mapping_lr_mult: float = 0.01  # the mapping networks train at lr x this (authors: 0.01)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    pixel_weight: float = 0.0  # weight of an extra per-level L1 loss (0 = LPIPS only, as the paper)
    loss_rebalance: bool = False  # layout: per-pixel loss weights from each category's rarity (cIMLE 4.2.3)
    seed: int = 0  # seeds the crops, the searches and the batch order
    # Fine-tuning: the tower's weights start from this model (what `chimle.load` takes: a shipped name, a
    # .safetensors file, a run's checkpoint or a model folder) instead of a random init; the optimizer and
    # the step count start fresh. The config must build the same tower for the same task ("" = random init).
    init_from: str = ""
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    checkpoint_every: int = 500  # steps between full-state checkpoints (also written at exit / Ctrl-C)
    log_every: int = 25  # steps between loss logs (TensorBoard and the progress bar)
    sample_every: int = 500  # steps between sample grids (0 = only at the end)
    grid_inputs: int = 4  # held-out inputs in a sample grid
    grid_samples: int = 4  # samples per input in a sample grid
    # What a non-finite (NaN/inf) loss or weight does: stop (one line naming the step, the loss, the learning
    # rate and the last good checkpoint) | skip (drop that step's update and go on; stops after
    # faults.MAX_SKIPS in a row) | rollback (reload the last good checkpoint at half the learning rate).
    on_nonfinite: str = "stop"
    check_weights_every: int = 100  # steps between NaN/inf checks of the weights (the loss: every step; 0 = at saves)
    # Seconds a rank waits for the others in a collective before it gives up with a message (a dead or
    # stuck rank); must exceed the longest time one rank can run ahead (a chunk of the search, a checkpoint).
    dist_timeout: float = 600.0


@dataclass
class Config:
    name: str = "chimle"  # run name; outputs go to runs/NAME unless `out` is set
    out: str = ""  # output folder ("" = runs/NAME)
    preset: str = "tiny"  # model preset: tiny | small | paper; `model` fields override it
    model: dict = field(default_factory=dict)  # TowerConfig overrides, e.g. {blocks: 2}; resolved in config.yaml
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")


# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key + ".")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _check(value, alt, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is Any or tp is type(None) and value is None:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown key '{prefix}{k}' (known: {', '.join(names)})")
    return cls(**{k: _check(v, hints[k], prefix + k) for k, v in d.items()})


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Config from an optional YAML file, then `base` (e.g. CLI flags), then `--set` overrides."""
    d: dict = {}
    if path:
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    for k, v in (base or {}).items():
        apply_overrides(d, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"])
    apply_overrides(d, overrides or [])
    cfg = from_dict(Config, d)
    validate(cfg)
    return cfg


# distances whose differences take per-pixel weights (`mask=`): the loss rebalancing of scene layouts
MASKED_DISTANCES = ("vgg_l1", "pixel_vgg")


def validate(cfg: Config) -> None:
    choices = {
        "data.task": (cfg.data.task, tuple(TASKS)),
        "search.method": (cfg.search.method, METHODS),
        "search.ablation": (cfg.search.ablation, ABLATIONS),
        "search.distance": (cfg.search.distance, tuple(DISTANCES)),
        "preset": (cfg.preset, tuple(PRESETS)),
        "train.on_nonfinite": (cfg.train.on_nonfinite, ON_NONFINITE),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    positive = {
        "train.steps": cfg.train.steps,
        "train.pool_size": cfg.train.pool_size,
        "train.steps_per_round": cfg.train.steps_per_round,
        "train.batch_size": cfg.train.batch_size,
        "data.crop": cfg.data.crop,
        "search.num_samples": cfg.search.num_samples,
        "search.batch": cfg.search.batch,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.train.check_weights_every < 0:
        raise ConfigError(f"train.check_weights_every: must be >= 0, got {cfg.train.check_weights_every}")
    if not cfg.train.dist_timeout > 0:
        raise ConfigError(f"train.dist_timeout: must be > 0 seconds, got {cfg.train.dist_timeout}")
    if any(m < 1 for m in cfg.search.samples_per_level):
        raise ConfigError(f"search.samples_per_level: counts must be >= 1, got {cfg.search.samples_per_level}")
    if cfg.data.task == "sr" and (cfg.data.scale < 2 or cfg.data.scale & (cfg.data.scale - 1)):
        raise ConfigError(f"data.scale: must be a power of two >= 2, got {cfg.data.scale}")
    if cfg.data.task != "layout" and (cfg.data.rebalance or cfg.train.loss_rebalance):
        raise ConfigError("data.rebalance and train.loss_rebalance are for the layout task (category rarity)")
    if cfg.train.loss_rebalance and cfg.search.distance not in MASKED_DISTANCES:
        raise ConfigError(
            f"train.loss_rebalance weights the feature differences of {' or '.join(MASKED_DISTANCES)} "
            f"(search.distance), not of {cfg.search.distance!r}"
        )
    if cfg.data.task != "layout" or cfg.data.num_classes:  # else the trainer counts the classes first
        resolve_model(cfg)


def resolve_model(cfg: Config) -> TowerConfig:
    """The TowerConfig of a run: preset, then the task's requirements, then `model` overrides."""
    task = {
        "sr": dict(layout="upscale"),
        "colorize": dict(in_channels=1, out_channels=2),
        "layout": dict(in_channels=cfg.data.num_classes),
    }.get(cfg.data.task, {})
    if cfg.data.task == "sr":
        task["levels"] = cfg.data.scale.bit_length() - 1
        task["input_size"] = cfg.data.crop // cfg.data.scale
    else:
        task["input_size"] = cfg.data.crop
    try:
        known = {f.name for f in dataclasses.fields(TowerConfig)}
        bad = sorted(set(cfg.model) - known)
        if bad:
            raise ConfigError(f"unknown key 'model.{bad[0]}' (known: {', '.join(sorted(known))})")
        for k, v in task.items():
            if k in cfg.model and cfg.model[k] != v:
                raise ConfigError(f"model.{k}: {cfg.data.task} needs {v}, got {cfg.model[k]}")
        return TowerConfig.preset(cfg.preset, **{**task, **cfg.model})
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from None


def dump_config(cfg: Config) -> str:
    """The config as YAML, with the model overrides resolved into every TowerConfig field."""
    d = dataclasses.asdict(cfg)
    d["model"] = resolve_model(cfg).to_dict()
    return yaml.safe_dump(d, sort_keys=False)
