"""`chimle convert`: the authors' released CHIMLE checkpoints (niopeng/CHIMLE) -> chimle weights.

    chimle convert AUTHORS_CHECKPOINT OUT.safetensors --task sr|colorize|jpeg|night

The output is what `chimle export` writes (safetensors with the model and task config in its metadata), so
`chimle sample`, `chimle eval` and `chimle.load` take it as they take chimle's own weights. What is inferred
and which conventions the converted tower follows: `chimle.inference.convert`.
"""

from __future__ import annotations

import argparse
import json
import math

from safetensors import safe_open

from ..inference.convert import TASK_VARIANTS, convert

__all__ = ["add_convert_parser", "cmd_convert"]


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert` on the `chimle` command line's subparsers."""
    p = subparsers.add_parser("convert", help="the authors' CHIMLE checkpoint -> safetensors weights with their config")
    p.add_argument("checkpoint", help="their .pth state dict, or latest.tar (model_state_dict + optimizer_state_dict)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument(
        "--task",
        required=True,
        choices=list(TASK_VARIANTS),
        help="which of their forwards the weights were trained with: sr (16x super-resolution), "
        "colorize, jpeg (decompression) or night (night-to-day): the shapes cannot tell sr from "
        "jpeg/night, nor the input channels from the noise channels",
    )
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert, then print one line saying what was written."""
    out = convert(args.checkpoint, args.out, args.task)
    with safe_open(str(out), framework="pt") as f:  # report from the file itself, as `chimle.load` will read it
        cfg = json.loads(f.metadata()["model"])
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in list(f.keys()))
    print(
        f"converted {args.checkpoint} ({TASK_VARIANTS[args.task]}, {cfg['levels']} levels, nf {cfg['channels']}, "
        f"{n / 1e6:.2f} M parameters) -> {out}"
    )
    return 0
