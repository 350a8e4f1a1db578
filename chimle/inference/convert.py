"""Run the authors' released CHIMLE models: their checkpoints (niopeng/CHIMLE) -> chimle towers and weights.

    model = from_authors(torch.load("sr.pth", weights_only=True), "sr")  # a TowerModel with their tower's function
    convert("latest.tar", "sr16.safetensors", task="sr")                 # = chimle convert latest.tar ... --task sr
    model = chimle.load("sr16.safetensors")                              # then chimle sample / chimle eval as usual

The written file is what `chimle.inference.weights.export` writes (safetensors, the TowerConfig and the
task config as JSON in the metadata), so `chimle.load`, `chimle sample` and `chimle eval` take it unchanged.

Checkpoint layouts accepted (what their code writes): a plain state dict (`{iter}_G.pth`); the training
state `latest.tar` = {'model_state_dict', 'optimizer_state_dict', 'data_idx', 'iteration'}; either with
keys prefixed `module.` (nn.DataParallel). Everything else is rejected with one line naming the first key
that does not fit (`CheckpointError`, a ValueError).

Inferred from the tensor shapes (`infer_config`): levels (`level_i_feat.0` keys), channels nf_i
(`level_i_feat.0.weight_v` rows), growth gc_i (`level_i_style.sub.0.RDB1.conv1.0.weight_v` rows), RRDBs
(`level_1_style.sub.{k}` count), code size and mapping width (`level_1_map_0.0.weight`, (width, code)),
mapping layers (1 + the `level_1_map.{0,2,..}` count), output channels (`level_1_out.0.weight_v` rows) and
the noise channels: `level_1_feat.0` reads in_nc + noise channels, where in_nc comes from the task (3, or
1 for colourisation's L); the shapes alone cannot split that sum. Then every key and shape must be exactly
those of `authors_shapes(cfg, variant)`, which for the paper configuration reproduces
tests/data/authors_tim_state_dict_shapes.json key for key, in order.

The computation assumed for each key (their released code's conventions, docs/design.md, and the
module layout those keys imply). LReLU = LeakyReLU(0.2); every conv is 3x3, stride 1, zero padding 1, under
the legacy weight norm, weight = g * v / ||v|| (norm over (in, kh, kw) of each output channel, dim 0).
Level i = 1..L, chimle module `levels.{i-1}`:

  authors' key                           chimle                          computation
  level_i_map_0.0                        mapping.first                   h = LReLU(Linear(code_i[:, :code_dim]))
  level_i_map.0                          mapping.mix                     h = LReLU(Linear(cat(h, w_1, .., w_{i-1})))
                                                                         (the first layer takes width * i inputs)
  level_i_map.{2j}, j = 1..6             mapping.rest.{j-1}              h = LReLU(Linear(h)); w_i = the last h
  level_i_feat.0                         conv_in                         f = conv(cat(image_i, noise_i, 0.1 F_{i-1}))
                                                                         no activation; no F_0 at level 1
  level_i_style.sub.{k}.RDB{d}.conv{c}.0 rrdbs.{k}.body.{d-1}.convs.{c-1} dense block d: x_c = LReLU(conv_c(cat(x,
                                                                         x_1..x_{c-1}))) for c = 1..4, returns
                                                                         x + 0.2 conv_5(cat(x, x_1..x_4)); RRDB k:
                                                                         y = x + 0.2 RDB3(RDB2(RDB1(x)))
  level_i_style.sub.transform_{k}        styles.{k}                      after RRDB k: [gamma | beta] = Linear(w_i),
                                                                         x = (1 + gamma) IN(y) + beta; IN: instance
                                                                         norm, no affine, biased var, eps 1e-5
  level_i_style.sub.lr_conv.0            conv_trunk                      f = f + conv(x)   (shortcut around it all)
  level_i_up.{1,3}                       up.{1,3}                        F_i = LReLU(conv3(LReLU(conv1(near_x2(f)))))
  level_L_up.{0,2} (colourisation)       refine.{0,2}                    f = LReLU(conv2(LReLU(conv0(f)))), no x2
  level_i_out.0                          head                            t_i = tanh(conv(.))

Forward of each variant (the `task` option of their code) and what the converted TowerConfig sets:
  Super_Resolution (--task sr): image_1 = the low-resolution input in [0, 1]; image_i = t_{i-1}, the
      previous level's raw tanh in [-1, 1]; F_i = up(f), t_i = head(F_i); outputs (t_i + 1) / 2.
      -> layout "upscale", feedback "tanh" (chimle recovers t_{i-1} = 2 * output - 1, exact to ~1e-7).
  generic (--task jpeg | night): image_i = the input downsampled to level i, in [0, 1]; t_i = head(f);
      F_i = up(f) for i < L; outputs (t_i + 1) / 2.  -> layout "same": chimle's own forward.
  Colourization (--task colorize): image_i = L_i / 100 at level i; as generic, except that the last
      level's `up` is two convs without upsampling and its head reads their output; the outputs are
      cat(L_i, t_i), t_i predicting (a / 127) * L and (b / 127) * L, L floored at 0.01, and no (x + 1) / 2.
      -> layout "same", final_convs, output_mode "ab_times_l": the level returns chimle's chroma
      ab01 = (127 t / max(L, 0.01) + 128) / 255, which `Colorize.rgb` composes with L into RGB. Their RGB
      also floors L itself at 0.01 (L* = 1) where chimle keeps L: the two differ only where L* < 1 (black),
      by at most 0.014 in sRGB.
Not in the checkpoint, so assumed from their code's defaults: the feature scale 0.1 (`feat_scales`), LReLU
slope 0.2, nearest upsampling, residual scales 0.2.

Keys a layout never uses, dropped: in the generic variant `level_L_up.{1,3}` (their code builds the last
level's upsampler but `forward_generic` never calls it: the last level hands nothing on, and chimle's "same"
layout has no module there); from `latest.tar`, `optimizer_state_dict`, `data_idx` and `iteration` (training
state; the iteration is kept as the `step` metadata).

Codes: their per-level flat code `code[:, :code_dim]` (global) + `code[:, code_dim:]` reshaped to
(noise_channels, h, w) is `chimle.latent.to_authors` / `from_authors`; noise sizes agree.

What differs outside the checkpoint, in the inputs: the authors make the level inputs and targets with
PIL bicubic on 8-bit images (sizes truncated) and colourisation's L_i from the RGB image downsampled to
each level; chimle resizes the [0, 1] input (antialiased bicubic in torch) and colourisation's L channel
itself. On the same level inputs and codes the converted tower computes their function
(tests/test_convert.py checks it against a plain-torch re-implementation of their forward).
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor

from ..data.imageio import atomic_write
from ..data.tasks import make_task
from ..model import TowerConfig, TowerModel
from .weights import CheckpointError

__all__ = [
    "TASK_VARIANTS",
    "authors_shapes",
    "convert",
    "from_authors",
    "infer_config",
    "key_map",
    "read_checkpoint",
    "task_config",
    "unwrap",
]

# chimle task -> the authors' forward variant (their `task` option; the keys of the shapes JSON).
TASK_VARIANTS: dict[str, str] = {
    "sr": "Super_Resolution",
    "colorize": "Colourization",
    "jpeg": "generic",
    "night": "generic",
}
_IN_CHANNELS = {"sr": 3, "colorize": 1, "jpeg": 3, "night": 3}
_OUT_CHANNELS = {"sr": 3, "colorize": 2, "jpeg": 3, "night": 3}


def _variant(task: str) -> str:
    if task not in TASK_VARIANTS:
        raise ValueError(f"unknown task {task!r} for the authors' models; choose from {', '.join(TASK_VARIANTS)}")
    return TASK_VARIANTS[task]


def _layout(cfg: TowerConfig, variant: str) -> list[tuple[str, tuple[int, ...], str | None]]:
    """(authors' key, its shape, chimle's key or None where dropped), in the order of their state dict."""
    rows: list[tuple[str, tuple[int, ...], str | None]] = []

    def linear(a: str, c: str, cin: int, cout: int) -> None:
        rows.extend([(f"{a}.weight", (cout, cin), f"{c}.weight"), (f"{a}.bias", (cout,), f"{c}.bias")])

    def conv(a: str, c: str | None, cin: int, cout: int) -> None:
        # Legacy weight norm registers g and v after the bias; the parametrisation keeps g as original0, v as
        # original1 and computes the same torch._weight_norm(v, g, 0).
        rows.extend(
            [
                (f"{a}.bias", (cout,), c and f"{c}.bias"),
                (f"{a}.weight_g", (cout, 1, 1, 1), c and f"{c}.parametrizations.weight.original0"),
                (f"{a}.weight_v", (cout, cin, 3, 3), c and f"{c}.parametrizations.weight.original1"),
            ]
        )

    width, last = cfg.mapping_width, cfg.levels - 1
    for i in range(cfg.levels):
        a, c = f"level_{i + 1}", f"levels.{i}"
        nf, gc = cfg.channels[i], cfg.growth[i]
        linear(f"{a}_map_0.0", f"{c}.mapping.first", cfg.code_dim, width)
        linear(f"{a}_map.0", f"{c}.mapping.mix", width * (i + 1), width)
        for j in range(1, cfg.mapping_layers - 1):
            linear(f"{a}_map.{2 * j}", f"{c}.mapping.rest.{j - 1}", width, width)
        prev = cfg.channels[i - 1] if i else 0
        conv(f"{a}_feat.0", f"{c}.conv_in", cfg.in_channels + cfg.noise_channels + prev, nf)
        for k in range(cfg.blocks):
            for d in range(3):
                for j in range(5):
                    conv(
                        f"{a}_style.sub.{k}.RDB{d + 1}.conv{j + 1}.0",
                        f"{c}.rrdbs.{k}.body.{d}.convs.{j}",
                        nf + j * gc,
                        gc if j < 4 else nf,
                    )
            linear(f"{a}_style.sub.transform_{k}", f"{c}.styles.{k}", width, 2 * nf)
        conv(f"{a}_style.sub.lr_conv.0", f"{c}.conv_trunk", nf, nf)
        if variant == "Colourization" and i == last:  # conv, LReLU, conv, LReLU: no Upsample at index 0
            conv(f"{a}_up.0", f"{c}.refine.0", nf, nf)
            conv(f"{a}_up.2", f"{c}.refine.2", nf, nf)
        else:  # Upsample (index 0), conv, LReLU, conv, LReLU; generic: never run on the last level, dropped
            dropped = variant == "generic" and i == last
            conv(f"{a}_up.1", None if dropped else f"{c}.up.1", nf, nf)
            conv(f"{a}_up.3", None if dropped else f"{c}.up.3", nf, nf)
        conv(f"{a}_out.0", f"{c}.head", nf, cfg.out_channels)
    return rows


def authors_shapes(cfg: TowerConfig, variant: str) -> dict[str, tuple[int, ...]]:
    """Every key of the authors' state dict for a tower of `cfg` in forward `variant` ("Super_Resolution",
    "Colourization", "generic"), with its shape, in their order."""
    return {a: shape for a, shape, _ in _layout(cfg, variant)}


def key_map(cfg: TowerConfig, variant: str) -> dict[str, str | None]:
    """The authors' key -> chimle's state-dict key (None: a key the variant never uses, dropped)."""
    return {a: c for a, _, c in _layout(cfg, variant)}


def unwrap(obj: Any) -> tuple[dict[str, Tensor], int | None]:
    """(state dict with the `module.` prefixes removed, training iteration or None) from what their code
    saves: a plain state dict, or {'model_state_dict', 'optimizer_state_dict', 'data_idx', 'iteration'}."""
    step = None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        step = obj.get("iteration") if isinstance(obj.get("iteration"), int) else None
        obj = obj["model_state_dict"]  # the optimizer state and data index are training state only
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"holds no state dict (a {type(obj).__name__}): the authors' checkpoints are a state "
            "dict or a dict with 'model_state_dict'"
        )
    if "model_config" in obj:
        raise CheckpointError("this is a chimle training checkpoint, not the authors': use `chimle export`")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"key '{key}' holds a {type(value).__name__}, not a tensor: not a state dict")
        name = key[len("module.") :] if isinstance(key, str) and key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"key '{key}' appears both with and without the 'module.' prefix")
        out[name] = value
    return out, step


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], int | None]:
    """`unwrap` of the authors' checkpoint file, read with weights_only=True (no code runs) and memory-mapped
    where the format allows (the training state holds the optimizer's moments too: 3x the weights)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise CheckpointError(f"'{p}' is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: name it, not torch's advice
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"an object of {found.group(1)}" if found else "objects other than tensors"
        raise CheckpointError(
            f"'{p}' holds {what}; the authors' checkpoints hold only tensors and plain "
            "containers (it is not run to find out)"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"'{p}' is not a readable PyTorch checkpoint: {str(e).strip().splitlines()[0]}") from None
    try:
        return unwrap(obj)
    except CheckpointError as e:
        raise CheckpointError(f"'{p}': {e}") from None


def _shape(sd: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing key '{key}'")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"key '{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def _count(sd: Mapping[str, Tensor], pattern: str, start: int = 0, step: int = 1) -> int:
    n = 0
    while pattern.format(start + n * step) in sd:
        n += 1
    return n


def infer_config(state_dict: Mapping[str, Tensor], task: str) -> TowerConfig:
    """The TowerConfig (with the authors' conventions for `task`) of an unwrapped state dict of theirs, checked
    key by key against `authors_shapes`; a CheckpointError names the first key that does not fit."""
    variant = _variant(task)
    sd = state_dict
    if "level_1_feat.0.weight_v" not in sd:
        first = next(iter(sd), None)
        raise CheckpointError(f"missing key 'level_1_feat.0.weight_v' (first key: '{first}'): not a CHIMLE tower")
    levels = _count(sd, "level_{}_feat.0.weight_v", start=1)
    channels = tuple(_shape(sd, f"level_{i}_feat.0.weight_v", 4)[0] for i in range(1, levels + 1))
    growth = tuple(_shape(sd, f"level_{i}_style.sub.0.RDB1.conv1.0.weight_v", 4)[0] for i in range(1, levels + 1))
    width, code_dim = _shape(sd, "level_1_map_0.0.weight", 2)
    out_ch = _shape(sd, "level_1_out.0.weight_v", 4)[0]
    in_ch, feat_in = _IN_CHANNELS[task], _shape(sd, "level_1_feat.0.weight_v", 4)[1]
    if out_ch != _OUT_CHANNELS[task]:
        raise CheckpointError(
            f"key 'level_1_out.0.weight_v' has {out_ch} output channels; --task {task} needs "
            f"{_OUT_CHANNELS[task]} (is this a checkpoint of another task?)"
        )
    if feat_in < in_ch:
        raise CheckpointError(
            f"key 'level_1_feat.0.weight_v' reads {feat_in} channels, fewer than the {in_ch} "
            f"input channel(s) of --task {task}"
        )
    _shape(sd, "level_1_map.0.weight", 2)  # the mapping network needs its first layer after map_0
    # The variant shows in the last level's `up` block: an upsampler (up.1, up.3) or colourisation's two convs.
    colour = variant == "Colourization"
    up, other = (f"level_{levels}_up.{n}.weight_v" for n in ((0, 1) if colour else (1, 0)))
    if up not in sd:
        why = (
            (
                f"; it has '{other}', the last level of {'an upsampler' if colour else 'colourisation'}: "
                "a checkpoint of another task?"
            )
            if other in sd
            else ""
        )
        raise CheckpointError(f"missing key '{up}' (--task {task}){why}")
    try:
        cfg = TowerConfig(
            levels=levels,
            layout="upscale" if task == "sr" else "same",
            in_channels=in_ch,
            out_channels=out_ch,
            channels=channels,
            growth=growth,
            blocks=_count(sd, "level_1_style.sub.{}.RDB1.conv1.0.weight_v"),
            code_dim=code_dim,
            noise_channels=feat_in - in_ch,
            mapping_width=width,
            mapping_layers=1 + _count(sd, "level_1_map.{}.weight", step=2),
            feature_scale=0.1,
            residual_scale=0.2,
            input_size=32 if task == "sr" else 256,  # the authors' 16x SR reads 32 px; the other tasks 256 px crops
            feedback="tanh" if task == "sr" else "image",
            final_convs=task == "colorize",
            output_mode="ab_times_l" if task == "colorize" else "tanh01",
        )
    except ValueError as e:
        raise CheckpointError(f"inferred an impossible tower ({e})") from None
    expected = authors_shapes(cfg, variant)
    for key, t in sd.items():
        if key not in expected:
            raise CheckpointError(f"unexpected key '{key}' {tuple(t.shape)} for the inferred {_describe(cfg, variant)}")
        if tuple(t.shape) != expected[key]:
            raise CheckpointError(
                f"key '{key}' has shape {tuple(t.shape)}, expected {expected[key]} for the inferred "
                f"{_describe(cfg, variant)}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"key '{key}' holds {t.dtype}, not floating-point weights")
    for key in expected:
        if key not in sd:
            raise CheckpointError(f"missing key '{key}' for the inferred {_describe(cfg, variant)}")
    return cfg


def _describe(cfg: TowerConfig, variant: str) -> str:
    return (
        f"{variant} tower (levels {cfg.levels}, nf {list(cfg.channels)}, gc {list(cfg.growth)}, "
        f"{cfg.blocks} RRDBs, code {cfg.code_dim}, noise {cfg.noise_channels}, mapping {cfg.mapping_layers} x "
        f"{cfg.mapping_width})"
    )


def task_config(task: str, cfg: TowerConfig) -> dict:
    """The chimle task config stored with converted weights (what `make_task(**config)` rebuilds)."""
    _variant(task)
    # sr: the scale is the tower's, 2^L (16 for the released models). jpeg: quality 1, the paper's. night: the
    # synthetic night task (none of the authors' night-to-day models was released; `eval` needs a degrade()).
    return make_task(task, **({"scale": 2**cfg.levels} if task == "sr" else {})).config()


def from_authors(state_dict: Mapping[str, Any], task: str) -> TowerModel:
    """A TowerModel (eval mode, CPU, float32) computing the authors' tower of `task` (sr | colorize | jpeg |
    night) with their weights. `state_dict` is what torch.load returns for any of their checkpoint layouts.

    The model's parameters are the given tensors themselves where those are contiguous float32 CPU tensors
    (no second copy of 842 MB for the paper size; a memory-mapped file stays mapped, copy-on-write)."""
    sd, _ = unwrap(state_dict)
    cfg = infer_config(sd, task)
    ours = {
        c: sd[a].detach().to("cpu", torch.float32).contiguous()
        for a, c in key_map(cfg, _variant(task)).items()
        if c is not None
    }
    with torch.device("meta"):  # no initialisation of 210 M parameters only to overwrite them
        model = TowerModel(cfg)
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval()


def convert(checkpoint: str | Path, out: str | Path, task: str) -> Path:
    """The authors' checkpoint file -> chimle safetensors weights with the model and task config in the
    metadata, as `chimle.inference.weights.export` writes them (`chimle convert`)."""
    _variant(task)
    sd, step = read_checkpoint(checkpoint)
    try:
        model = from_authors(sd, task)
    except CheckpointError as e:
        raise CheckpointError(f"'{checkpoint}': {e}") from None
    meta = {
        "model": json.dumps(model.cfg.to_dict()),
        "task": json.dumps(task_config(task, model.cfg)),
        "step": str(step or 0),
        "format": "chimle-1",
        "source": f"niopeng/CHIMLE checkpoint '{Path(checkpoint).name}', {TASK_VARIANTS[task]} forward",
    }
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    return atomic_write(out, lambda f: f.write(save(tensors, metadata=meta)))
