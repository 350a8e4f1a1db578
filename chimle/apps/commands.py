"""The commands that are one call of the library: `chimle train`, `sample`, `export`, `convert`, `eval`,
`presets` and `models`, each a function `cmd_NAME(args) -> exit status` of the arguments that
`chimle.apps.cli` parsed (and defines). Each imports what it calls when it runs: `chimle train` does not
load the evaluation's Inception network, nor `chimle models` a tower.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = [
    "cmd_train",
    "cmd_sample",
    "cmd_export",
    "cmd_convert",
    "cmd_eval",
    "cmd_presets",
    "cmd_models",
]


def _train_base(a: argparse.Namespace) -> dict:
    """The config keys that `chimle train`'s flags set (the ones given), over the config file's."""
    flags = {
        "data.task": a.task,
        "data.data": a.data,
        "data.target": a.target,
        "data.val_data": a.val_data,
        "data.scale": a.scale,
        "data.quality": a.quality,
        "data.crop": a.crop,
        "preset": a.preset,
        "out": a.out,
        "name": a.name,
        "train.steps": a.steps,
        "search.method": a.method,
        "search.ablation": a.ablation,
        "train.device": a.device,
        "train.seed": a.seed,
        "data.skip_bad": True if a.skip_bad else None,
    }
    return {k: v for k, v in flags.items() if v is not None}


def cmd_train(a: argparse.Namespace) -> int:
    from ..training.config import load_config
    from ..training.trainer import train

    cfg = load_config(a.config, a.set, base=_train_base(a))
    t = train(cfg, resume=a.resume)
    if t.last:
        print(f"trained {t.step} steps, last loss {t.last['loss']:.4f}; checkpoint: {t.checkpoint_path}")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from ..inference.files import SampleOptions, Tiling, sample_paths

    options = SampleOptions(
        seed=a.seed,
        from_level=a.from_level,
        same_code=a.same_code,
        interpolate_steps=a.steps if a.interpolate else 0,
        degrade=a.degrade,
        project=a.project,
        tiling=Tiling(a.tile, a.overlap, a.memory_budget),
    )
    written = sample_paths(
        a.checkpoint,
        a.input,
        a.num,
        a.out,
        options,
        code=a.code,
        device=a.device,
        notice=lambda msg: print(f"chimle sample: {msg}", file=sys.stderr),
    )
    grids = [p for p in written if p.name.endswith("_grid.png")]
    print(f"wrote {len(written) - len(grids)} samples and {len(grids)} grid(s) to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """By the output's name: OUT.onnx a graph (`chimle.inference.onnx_export`), a folder (an existing one, or
    a name without suffix) a model folder (`save_pretrained`), anything else a safetensors file."""
    out = Path(a.out)
    if out.suffix == ".onnx":
        return _export_onnx(a, out)
    if a.size is not None or a.static or a.batch is not None:
        raise ValueError("--size, --static and --batch are for an ONNX export (OUT.onnx)")
    card = json.loads(Path(a.card).read_text()) if a.card else None
    if out.is_dir() or (not out.suffix and not out.exists()):
        from ..inference.weights import FOLDER_FILES, save_pretrained

        print(f"exported {save_pretrained(a.checkpoint, out, card=card)} ({', '.join(FOLDER_FILES)})")
        return 0
    from ..inference.weights import export

    print(f"exported {export(a.checkpoint, a.out, card=card)}")
    return 0


def _export_onnx(a: argparse.Namespace, out: Path) -> int:
    if a.size is None:
        raise ValueError(
            "an ONNX export needs the input size: --size H W (batch and size stay dynamic unless --static)"
        )
    if a.card:
        raise ValueError("--card is for .safetensors and model folders (an ONNX file keeps the model and task configs)")
    if a.batch is not None and not a.static:
        raise ValueError("--batch fixes the batch of a --static graph (a dynamic one takes any batch)")
    from ..inference.onnx_export import export_onnx  # onnx and onnxscript (the onnx extra): only here
    from ..inference.weights import load_with_task

    model, task = load_with_task(a.checkpoint)
    try:
        path = export_onnx(model, out, tuple(a.size), task=task, dynamic=not a.static, batch=a.batch or 1)
    except ImportError as e:  # the extra is missing: one line that says how to install it
        raise ValueError(str(e)) from None
    shape = f"batch {a.batch or 1}, {a.size[0]}x{a.size[1]} only" if a.static else "any batch and size"
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MB; {shape})")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    """The authors' released CHIMLE checkpoint (niopeng/CHIMLE) -> what `chimle export` writes (safetensors
    with the model and task config in its metadata; `chimle.inference.convert` says what is inferred), then
    one line saying what was written, read back from the file as `chimle.load` will read it."""
    from safetensors import safe_open

    from ..inference.convert import TASK_VARIANTS, convert

    out = convert(a.checkpoint, a.out, a.task)
    with safe_open(str(out), framework="pt") as f:
        cfg = json.loads(f.metadata()["model"])
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in list(f.keys()))
    print(
        f"converted {a.checkpoint} ({TASK_VARIANTS[a.task]}, {cfg['levels']} levels, nf {cfg['channels']}, "
        f"{n / 1e6:.2f} M parameters) -> {out}"
    )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from ..data.tasks import make_task
    from ..evaluation.evaluate import EvalOptions, evaluate  # heavy (scipy, Inception): only when asked
    from ..inference.weights import load_with_task

    model, task_cfg = load_with_task(a.checkpoint, a.device)
    if not task_cfg:
        raise ValueError(f"'{a.checkpoint}' holds no task configuration; evaluation needs the task")
    ivo = {k: getattr(a, k) for k in ("ivo_runs", "ivo_steps", "ivo_images") if getattr(a, k) is not None}
    result = evaluate(
        model,
        make_task(**task_cfg),
        a.data,
        num_samples=a.num,
        out_dir=a.out,
        crop=a.crop,
        seed=a.seed,
        max_images=a.max_images,
        options=EvalOptions(**ivo),
    )
    print(
        f"metrics of {result['images']} images x {result['samples_per_input']} samples: {Path(a.out) / 'metrics.json'}"
    )
    for k in ("fid", "kid", "fwv_0.2", "lpips_diversity", "prd_f8", "prd_f1_8", "ivo_mean", "consistency_mae"):
        if k in result:
            print(f"  {k}: {result[k]:.6g}")
    for w in result["warnings"]:
        print(f"  warning: {w}")
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    """Every preset's parameter count, in total and per level."""
    from ..model import PRESETS, TowerConfig, TowerModel

    for name in PRESETS:
        model = TowerModel(TowerConfig.preset(name))
        per_level = ", ".join(f"{model.num_parameters(l) / 1e6:.2f}" for l in range(1, model.cfg.levels + 1))
        print(f"{name:6s} {model.num_parameters() / 1e6:8.2f} M parameters (per level: {per_level} M)")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    """The models a name loads: the shipped ones, then the user's (`chimle.load(name)`)."""
    from ..inference.weights import available_models, model_card, shipped_dir, weights_dir

    models = available_models()
    if not models:
        print(f"no models: none shipped, none in {weights_dir()}")
    for name, path in models.items():
        c = model_card(path)
        where = "shipped" if path.parent == shipped_dir() else str(path.parent)
        task = ", ".join(f"{k}={v}" for k, v in c["task"].items())
        print(f"{name:16s} {task:24s} {c['megabytes']:6.2f} MB  {c['step']} steps  {where}")
        if "summary" in c:
            print(f"{'':16s} {c['summary']}")
    return 0
