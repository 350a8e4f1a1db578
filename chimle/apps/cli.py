"""The `chimle` command line: a thin wrapper over the Python API.

    chimle demo [--task sr|layout] [--out DIR] [--steps N] [--resume]
    chimle train --task sr --scale 8 --data DIR --preset tiny --out runs/NAME [--steps N] [--method chimle|cimle]
                 [--resume] [--config FILE] [--set key=value ...]
    chimle sample CHECKPOINT INPUT --num N --out DIR [--seed S] [--from-level K] [--same-code] [--interpolate]
                  [--tile N|auto] [--project]
    chimle export MODEL OUT.safetensors|DIR [--card CARD.json]     (DIR: a model folder)
    chimle export MODEL OUT.onnx --size H W [--static [--batch N]]     (needs `pip install "chimle[onnx]"`)
    chimle convert AUTHORS_CHECKPOINT OUT.safetensors --task sr|colorize|jpeg|night
    chimle eval CHECKPOINT --data DIR [--num N] --out DIR
    chimle bench speed|gpu|efficiency|ablation ...
    chimle mnist [--out DIR] [--steps N]
    chimle reproduce --out DIR [--quick] [--resume] [--parts mnist,efficiency,ablation,table1]
    chimle presets
    chimle models
    chimle explore [WEIGHTS | --demo] [--host H] [--port P]     (needs `pip install "chimle[app]"`)

Bad input ends with one line on stderr naming the file or key and the problem (exit code 2),
never a traceback from deep inside torch; CHIMLE_DEBUG=1 shows the traceback.

The parser builds without importing torch or the library (a few seconds): every command imports what it
needs when it runs, so `chimle --help` and argument errors answer at once (benchmarks/cli_startup.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..threads import add_threads_argument, use_threads  # torch-free: imports torch when a count is set

__all__ = ["main"]

COMPUTING = ("train", "sample", "eval", "demo")  # the commands of this parser that take --threads


class _LibraryNames:
    """The names a library constant holds (TASKS, PRESETS, METHODS, ABLATIONS), as argparse `choices`,
    imported when argparse first looks at them: a subcommand's --help or a value to check. Give the
    argument a metavar, or argparse lists the choices in every usage line and so imports them at once."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self._names: list[str] | None = None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = list(getattr(importlib.import_module(self.module, __package__), self.name))
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def export(*args: Any, **kw: Any) -> Path:
    """`chimle.inference.weights.export`, imported when `chimle export` runs (not when the parser builds)."""
    from ..inference.weights import export as export_weights

    return export_weights(*args, **kw)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a tower on a folder of photos")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--task", choices=_LibraryNames("..data.tasks", "TASKS"), metavar="TASK", help="%(choices)s")
    p.add_argument("--data", help="folder of training photos ('builtin' = scikit-image's); paired: the inputs")
    p.add_argument("--target", help="paired and layout tasks: folder of target images matched by file name")
    p.add_argument("--val-data", help="folder of held-out photos for sample grids")
    p.add_argument("--scale", type=int, help="sr: upscaling factor 2^levels")
    p.add_argument("--quality", type=int, help="jpeg: JPEG quality of the inputs")
    p.add_argument("--crop", type=int, help="training crop side at the target resolution")
    p.add_argument("--preset", choices=_LibraryNames("..model", "PRESETS"), metavar="PRESET", help="%(choices)s")
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.add_argument("--name", help="run name")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument(
        "--method", choices=_LibraryNames("..training.config", "METHODS"), metavar="METHOD", help="%(choices)s"
    )
    p.add_argument("--ablation", choices=_LibraryNames("..search", "ABLATIONS"), metavar="NAME", help="%(choices)s")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    add_threads_argument(p)


def _train_base(a) -> dict:
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


def cmd_train(a) -> int:
    from ..training.config import load_config
    from ..training.trainer import train

    cfg = load_config(a.config, a.set, base=_train_base(a))
    t = train(cfg, resume=a.resume)
    if t.last:
        print(f"trained {t.step} steps, last loss {t.last['loss']:.4f}; checkpoint: {t.checkpoint_path}")
    return 0


def cmd_sample(a) -> int:
    from ..inference.files import sample_paths

    written = sample_paths(
        a.checkpoint,
        a.input,
        a.num,
        a.out,
        seed=a.seed,
        from_level=a.from_level,
        same_code=a.same_code,
        interpolate_steps=a.steps if a.interpolate else 0,
        degrade=a.degrade,
        device=a.device,
        tile=a.tile,
        overlap=a.overlap,
        memory_budget=a.memory_budget,
        code=a.code,
        project=a.project,
        notice=lambda msg: print(f"chimle sample: {msg}", file=sys.stderr),
    )
    grids = [p for p in written if p.name.endswith("_grid.png")]
    print(f"wrote {len(written) - len(grids)} samples and {len(grids)} grid(s) to {a.out}")
    return 0


def cmd_export(a) -> int:
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
    print(f"exported {export(a.checkpoint, a.out, card=card)}")
    return 0


def _export_onnx(a, out: Path) -> int:
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


def cmd_models(a) -> int:
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


def cmd_demo(a) -> int:
    from .demo import run_demo, run_layout_demo  # the apps are imported only by the command that runs them

    try:
        if a.task == "layout":
            grid = run_layout_demo(a.out or "runs/demo_layout", steps=a.steps, device=a.device, resume=a.resume)
            print(f"demo grid: {grid}")
            return 0
        grid, c = run_demo(a.out or "runs/demo", steps=a.steps, device=a.device, resume=a.resume)
    except KeyboardInterrupt as e:  # the trainer saved its steps and says "go on with --resume": say the command
        raise KeyboardInterrupt(_demo_resume_note(str(e), a)) from None
    print(f"demo grid: {grid}")
    shift = ", ".join(f"{v:+.3f}" for v in c["shift"])
    print(f"consistency with the inputs: mean abs error {c['mae']:.3f}, mean shift per channel (R, G, B) {shift}")
    return 0


def _demo_resume_note(msg: str, a: argparse.Namespace) -> str:
    """The trainer's Ctrl-C message with the `chimle demo` command that goes on from its checkpoint (the
    same --task, --out, --steps and --device: the run's folder and config must match)."""
    if not msg or "no checkpoint was written yet" in msg:
        return msg
    again = ["chimle demo", *(["--task", a.task] if a.task != "sr" else [])]
    again += [*(["--out", a.out] if a.out else []), *(["--steps", str(a.steps)] if a.steps else [])]
    again += [*(["--device", a.device] if a.device != "auto" else []), "--resume"]
    return msg.replace("go on with --resume (any number of processes)", "go on with: " + " ".join(again))


def cmd_eval(a) -> int:
    from ..data.tasks import make_task
    from ..evaluation.evaluate import evaluate  # heavy (scipy, the Inception loader): only when asked
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
        **ivo,
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


def cmd_convert(rest: list[str]) -> int:
    """`chimle convert`, parsed by the parser that chimle/apps/convert_cli.py registers."""
    from .convert_cli import add_convert_parser
    from .convert_cli import cmd_convert as run_convert

    parser = argparse.ArgumentParser(prog="chimle")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    return run_convert(parser.parse_args(["convert", *rest]))


def cmd_bench(a, rest: list[str]) -> int:
    if a.which == "speed":
        from .bench_speed import main as speed_main

        return speed_main(rest)
    if a.which == "gpu":
        from .bench_gpu import main as gpu_main

        return gpu_main(rest)
    from .bench_quality import main as quality_main

    return quality_main([a.which, *rest])


def cmd_presets(a: argparse.Namespace) -> int:
    """Every preset's parameter count, in total and per level."""
    from ..model import PRESETS, TowerConfig, TowerModel

    for name in PRESETS:
        model = TowerModel(TowerConfig.preset(name))
        per_level = ", ".join(f"{model.num_parameters(l) / 1e6:.2f}" for l in range(1, model.cfg.levels + 1))
        print(f"{name:6s} {model.num_parameters() / 1e6:8.2f} M parameters (per level: {per_level} M)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimle", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    p = sub.add_parser("sample", help="draw N different outputs per input image")
    p.add_argument("checkpoint", help="training checkpoint, exported .safetensors, or a released name")
    p.add_argument("input", help="an image or a folder of images")
    p.add_argument("--num", type=int, default=8, help="samples per input")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-level", type=int, help="keep levels < K of one code, redraw levels >= K")
    p.add_argument("--same-code", action="store_true", help="sample k uses one code for every input")
    p.add_argument("--interpolate", action="store_true", help="a sequence between two codes (--steps frames)")
    p.add_argument("--steps", type=int, default=8, help="frames for --interpolate")
    p.add_argument("--degrade", action="store_true", help="inputs are targets: make the task's input from them")
    p.add_argument("--tile", help="tiled inference for large images: tile side in input px, or 'auto' (fit the budget)")
    p.add_argument("--overlap", type=int, help="tile overlap in input px (default: a quarter of the tile)")
    p.add_argument("--memory-budget", help="memory for --tile auto, e.g. 4GB (default: half the free GPU / 2 GB)")
    p.add_argument("--code", help="a code .npz downloaded from chimle explore: redraw that exact output")
    p.add_argument(
        "--project", action="store_true", help="sr: back-project samples onto the input (post-processing, off)"
    )
    p.add_argument("--device", default="cpu")
    add_threads_argument(p)

    p = sub.add_parser("export", help="checkpoint -> safetensors weights, a model folder (DIR) or ONNX (OUT.onnx)")
    p.add_argument("checkpoint", help="training checkpoint, exported .safetensors, model folder, or a name")
    p.add_argument("out", help="OUT.safetensors, OUT.onnx, or a folder: config.json, model.safetensors, README.md")
    p.add_argument("--card", help="a model card (JSON) to store in the file's metadata (`chimle models` shows it)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="ONNX: the input size to export for")
    p.add_argument("--static", action="store_true", help="ONNX: fix the batch and size (default: both dynamic)")
    p.add_argument("--batch", type=int, help="ONNX with --static: the batch (default 1)")

    # `convert` builds its own parser (chimle/apps/convert_cli.py, which imports torch) when it runs.
    sub.add_parser(
        "convert", add_help=False, help="the authors' CHIMLE checkpoint -> safetensors weights with their config"
    )

    p = sub.add_parser("demo", help="train a small tower on bundled photos and write a sample grid")
    p.add_argument("--task", choices=["sr", "layout"], default="sr", help="8x SR, or scene layouts (stand-ins)")
    p.add_argument("--out", help="run folder (default runs/demo, runs/demo_layout)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="go on from OUT/checkpoints/last.pt (after Ctrl-C)")
    add_threads_argument(p)

    p = sub.add_parser("eval", help="the papers' metrics on held-out images")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="folder of held-out photos (targets)")
    p.add_argument("--num", type=int, default=10, help="samples per input")
    p.add_argument("--out", required=True)
    p.add_argument("--crop", type=int, default=None, help="centre-crop side (default: the model's training size)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ivo-runs", type=int, help="IvO runs (default 5, as the papers; 0 = skip IvO, slow on a CPU)")
    p.add_argument("--ivo-steps", type=int, help="Adam steps per IvO run (default 200)")
    p.add_argument("--ivo-images", type=int, help="images used for IvO (default: all)")
    add_threads_argument(p)

    sub.add_parser("presets", help="print the model presets' parameter counts")
    sub.add_parser("models", help="list the models a name loads (shipped, and yours in ~/.cache/chimle/weights)")
    sub.add_parser("mnist", add_help=False, help="the MNIST illustration of the TIM paper (Fig. 1); see --help")
    sub.add_parser("explore", add_help=False, help="a web page to explore a model's outputs (chimle[app]); see --help")
    sub.add_parser("reproduce", add_help=False, help="the papers' experiments at CPU scale, as one report; see --help")

    # `bench` hands everything after its name (--help included) to the benchmark's own parser.
    p = sub.add_parser(
        "bench", add_help=False, help="benchmarks: speed | gpu | efficiency | ablation (see --help of each)"
    )
    p.add_argument("which", choices=["speed", "gpu", "efficiency", "ablation"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a, rest = parser.parse_known_args(argv)
    if rest and a.command not in ("bench", "mnist", "explore", "reproduce", "convert"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from ..memory import keep_freed_host_memory  # imports torch: only once the arguments parsed

    keep_freed_host_memory()  # CPU steps stop page-faulting their activations in again (see its docstring)
    commands = {
        "train": cmd_train,
        "sample": cmd_sample,
        "export": cmd_export,
        "demo": cmd_demo,
        "eval": cmd_eval,
        "presets": cmd_presets,
        "models": cmd_models,
    }
    try:
        if a.command == "bench":
            return cmd_bench(a, rest)
        if a.command == "convert":
            return cmd_convert(rest)
        if a.command == "mnist":
            from .mnist import main as mnist_main

            mnist_main(rest)
            return 0
        if a.command == "reproduce":
            from .reproduce import main as reproduce_main

            return reproduce_main(rest)
        if a.command == "explore":
            from .explore_server import main as explore_main  # FastAPI is imported only here

            return explore_main(rest)
        if a.command in COMPUTING:
            with use_threads(a.threads):
                return commands[a.command](a)
        return commands[a.command](a)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        if os.environ.get("CHIMLE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"chimle {a.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the trainer has saved its checkpoint first
        print(f"chimle {a.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
