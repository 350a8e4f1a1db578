"""Speed and memory benchmarks: latent search, training step and sampling of the model presets.

    chimle bench speed                       # tiny + small presets (+ paper on CUDA): a table on stdout
    chimle bench speed --quick               # a < 30 s smoke run (tiny preset, few candidates)
    chimle bench speed --presets paper       # the authors' size; on a CPU with tiny counts (~30 min)
    chimle bench speed --compile             # also time the torch.compile'd search and training step
    chimle bench speed --json results.json   # save every figure
    python benchmarks/speed.py ...           # the same; benchmarks/search_vs_naive.py: the comparison only

What each row measures (candidates, images or samples per second, GFLOP/s and their fraction of this
machine's measured matmul peak, peak tensor memory): `chimle.evaluation.speed`. The JSON also holds the
process's peak RSS (getrusage). On a busy CPU pass --threads 1: OpenMP workers spin while they wait, and
with more threads than free cores a run slows down by orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..evaluation.speed import BENCHMARKS, run_benchmarks
from ..model import TowerConfig

__all__ = ["cmd_bench_speed", "format_table", "BENCHMARKS", "COLUMNS"]

COLUMNS = ("preset", "case", "metric", "value", "unit", "GFLOP/s", "% peak", "peak MiB", "note")


# -- reporting -------------------------------------------------------------------------------------


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key == "peak_fraction":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """An aligned text table of the result rows (numbers right-aligned)."""
    keys = ("preset", "case", "metric", "value", "unit", "gflops", "peak_fraction", "peak_mib", "note")
    cells = [list(COLUMNS)] + [[_fmt(r.get(k), k) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    right = {3, 5, 6, 7}
    lines = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_bench_speed(a: argparse.Namespace) -> int:
    """`chimle bench speed` (its options: `chimle.apps.cli`): run the benchmarks, print their table."""
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device
    )
    notes = []
    if a.presets:
        presets = a.presets.split(",")
    elif a.quick:
        presets = ["tiny"]
    else:
        presets = ["tiny", "small"] + (["paper"] if device.type == "cuda" else [])
        if device.type != "cuda":
            notes.append(
                "paper preset skipped on a CPU (a forward at 512 px takes tens of seconds): pass --presets paper "
                "to run it with tiny candidate counts"
            )
    for p in presets:
        TowerConfig.preset(p)  # an unknown name fails here, before anything runs
    if "paper" in presets and device.type != "cuda":
        notes.append("paper preset on a CPU: tiny candidate counts (m=[2, 2, 1, 1], flat 6) and batch 1")
    bad = sorted(set(a.only.split(",")) - set(BENCHMARKS)) + sorted(set(a.cases.split(",")) - {"sr", "same"})
    if bad:
        raise ValueError(f"unknown benchmark or case {bad[0]!r}: --only takes {','.join(BENCHMARKS)}, --cases sr,same")
    result = run_benchmarks(
        presets,
        device,
        quick=a.quick,
        reps=a.reps,
        distance=a.distance or ("alex" if a.quick else "vgg"),
        cases=a.cases.split(","),
        only=a.only.split(","),
        compile=a.compile,
    )
    result["notes"] += notes
    print(format_table(result["rows"]))
    for note in result["notes"]:
        print(f"note: {note}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    return 0
