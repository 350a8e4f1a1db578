"""`chimle bench gpu`: the CUDA path checked and measured in one run.

    chimle bench gpu                        # on a CUDA machine: every check; estimated 4-6 minutes on an H100 / H200
    chimle bench gpu --quick                # fewer candidates, steps and repetitions: ~2 minutes (estimated)
    chimle bench gpu --budget 300           # seconds: a check that would start later is skipped, and says so
    chimle bench gpu --json gpu.json --only search,train
    python benchmarks/gpu_check.py ...      # the same

Checks (each prints rows of the table; the JSON holds every figure, and the raw picks and curves):
  search  bf16 + channels-last scoring (the search's CUDA path) against float32 (TF32 off, NCHW) on the
          same candidates, level by level on the float32 search's prefix, small preset (8 -> 64 px) and
          paper preset (16x SR, 32 -> 512 px): the fraction of identical picks, the distance error of
          bf16, and, where the picks differ, how much farther (in float32) bf16's pick is. Verdict: bf16
          keeps >= 95% of what the search gains over a typical candidate (median minus best, float32).
  train   200 steps of the training step from the same seed and batches, bf16 autocast against float32
          (small preset, batch 4, LPIPS-VGG, Adam at 1e-4): loss curves in windows of 20 steps. Verdict:
          the bf16 curve stays closer to the float32 one than a second float32 run with another batch
          order does (a precision change must move training less than reshuffling the same data).
  memory  peak torch.cuda.max_memory_allocated / max_memory_reserved of one paper-preset training step at
          512 px, batch 1 (bf16 as trained, and float32 as the authors), against their stated 32 GB.
  speed   `chimle bench speed`'s search (cand/s), flat search, sampling and training step at the paper and
          small presets, each with its fraction of this GPU's bf16 dense matmul peak measured in this run.
  ddp     2 processes on one GPU (torchrun's DDP, as `chimle train` uses it) against 1 process on the same
          global batch: the losses of every step and the weights after 5 steps (float32). NCCL refuses two
          ranks on one GPU (NCCL >= 2.5, "Duplicate GPU detected"): with one GPU the check tries NCCL,
          reports the refusal, and runs the ranks with gloo over the same CUDA tensors; with two GPUs it
          uses NCCL, one GPU per rank.
  tiling  a 4096 x 4096 sample (paper preset, 16x SR of 256 x 256) tiled with `--tile auto` for
          --memory-budget: the tile chosen, the time, and the peak memory above the start, within budget.

Without CUDA the command runs what a CPU can, the bf16 agreement checks (`search`, `train`) under
torch.autocast("cpu", dtype=torch.bfloat16) on the tiny and small presets (channels-last is a CUDA-only
setting of the search), and names every check it skipped. Exit status 1 if a check that ran failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..distances.lpips import LPIPS
from ..evaluation.ddp_check import ddp_check
from ..evaluation.precision import (
    float32,
    photo_crops,
    search_agreement,
    tower,
    train_agreement,
)
from ..evaluation.speed import Case, bench_case, matmul_peak
from ..inference.sample import generate
from ..inference.tiling import auto_tile, padded_hw, tile_starts
from ..loss import level_targets
from ..memory import parse_bytes
from ..model import TowerModel
from ..training.step import optimize_step, param_groups

__all__ = ["cmd_bench_gpu", "run", "CHECKS", "format_table", "failed"]

CHECKS = ("search", "train", "memory", "speed", "ddp", "tiling")
CPU_CHECKS = ("search", "train")  # what runs without CUDA (bf16 autocast on the CPU)
AUTHORS_GB = 32  # "a 32 GB GPU" for 16x SR (CHIMLE's appendix; 24 GB for the other tasks)
GiB = 2**30


# -- CUDA-only checks ---------------------------------------------------------------------------------


def memory_check(model: TowerModel, distance, device: torch.device) -> list[dict[str, Any]]:
    """Peak memory of one paper-preset training step at 512 px, batch 1, as the Trainer runs it (the
    target's features prepared beforehand, as the pool keeps them; Adam's state already allocated)."""
    x, y, _ = photo_crops(1, 512, 16, seed=2)
    x, y = x.to(device), y.to(device)
    codes = model.sample_codes(1, torch.Generator(device=device).manual_seed(0), input_hw=(32, 32))
    with torch.no_grad():
        targets = level_targets(y, model.cfg.output_sizes(32, 32), distance)
    out = []
    for name, amp in (("bf16 (as chimle trains)", True), ("float32 (as the authors)", False)):
        # earlier checks' cached blocks would count as this step's reserved memory (seen on an H200: 27 GiB)
        torch.cuda.empty_cache()
        opt = torch.optim.Adam(param_groups(model, 1e-4, 0.01))
        with contextlib.nullcontext() if amp else float32(device):
            for _ in range(2):  # the first: Adam's state, cuDNN's algorithm choice; the second is measured
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                optimize_step(model, opt, x, targets, codes, distance, amp=amp)
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        alloc, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        out.append(
            {
                "precision": name,
                "max_allocated_gib": alloc / GiB,
                "max_reserved_gib": reserved / GiB,
                "step_seconds": seconds,
                "authors_gb": AUTHORS_GB,
                "fits_authors_gpu": reserved <= AUTHORS_GB * 1e9,
            }
        )
        del opt
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return out


def speed_check(device: torch.device, distance, quick: bool, mm_peak: float) -> list[dict[str, Any]]:
    """`chimle bench speed`'s cases at the small and paper presets (16x SR), on this GPU."""
    reps = 1 if quick else 3
    cases = [
        Case("small", "sr", (8, 8), 3, [20, 10, 5], 35, 16, [20, 10, 5], 4, 16),
        Case(
            "paper",
            "sr",
            (32, 32),
            4,
            [50, 50, 10, 5] if quick else [200, 200, 20, 10],
            10 if quick else 40,
            2,
            [2, 2, 1, 1],
            1,
            8,
        ),
    ]
    rows = []
    for case in cases:
        rows += bench_case(case, device, distance, reps, mm_peak, {"search", "flat", "sample", "train"}, False)
    return rows


def tiling_check(model: TowerModel, device: torch.device, budget: str) -> dict[str, Any]:
    """A 4096 x 4096 sample of the paper preset (16x SR of 256 x 256), `--tile auto` for `budget`."""
    hw = (256, 256)
    tile = auto_tile(model, hw, budget)
    overlap = tile // 4
    n_tiles = len(tile_starts(hw[0], tile, overlap)) * len(tile_starts(hw[1], tile, overlap))
    x = photo_crops(1, 512, 2, seed=3)[0].to(device)  # a 256 x 256 input (a photo crop, halved)
    g = torch.Generator(device=device).manual_seed(0)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = generate(model, x, 1, g, tile=tile)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base
    limit = parse_bytes(budget)
    return {
        "output": list(out.shape[-2:]),
        "codes_for": list(padded_hw(model, hw)),
        "tile": tile,
        "overlap": overlap,
        "tiles": n_tiles,
        "seconds": seconds,
        "peak_above_start_gib": peak / GiB,
        "budget_gib": limit / GiB,
        "passed": peak <= limit and tuple(out.shape[-2:]) == (4096, 4096) and bool(torch.isfinite(out).all()),
    }


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Sizes of the checks: full, --quick, and the CPU's."""

    search: list[tuple[str, int, int, int, list[int]]]  # (preset, levels, crop, inputs, counts)
    train: tuple[str, int, int, int]  # (preset, levels, crop, steps)


def plan(device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda":
        return Plan(
            search=[
                ("small", 3, 64, 16, [20, 10, 5]),
                ("paper", 4, 512, 2, [40, 40, 8, 4] if quick else [200, 200, 20, 10]),
            ],
            train=("small", 3, 64, 60 if quick else 200),
        )
    return Plan(
        search=[
            ("tiny", 3, 64, 4, [6, 4, 3] if quick else [20, 10, 5]),
            ("small", 3, 64, 2, [4, 3, 2] if quick else [20, 10, 5]),
        ],
        train=("tiny", 2, 32, 30 if quick else 200),
    )


def run(
    device: torch.device,
    *,
    quick: bool = False,
    only: Sequence[str] = CHECKS,
    budget: float = 480.0,
    memory_budget: str = "4GB",
    distance: str = "vgg",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every check that this device and the time budget allow; returns what --json writes."""
    start = time.monotonic()
    cuda = device.type == "cuda"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
        "quick": quick,
        "distance": f"LPIPS-{distance}",
        "skipped": {},
        "checks": {},
    }
    for c in CHECKS:
        if c not in only:
            result["skipped"][c] = "not selected (--only)"
        elif not cuda and c not in CPU_CHECKS:
            result["skipped"][c] = "needs CUDA (no GPU here)"
    todo = [c for c in CHECKS if c not in result["skipped"]]
    log(f"# {result['device']}, torch {torch.__version__}, {result['distance']}; checks: {', '.join(todo) or 'none'}")
    dist_net = LPIPS(distance).to(device)
    if cuda:
        mm_peak, how = matmul_peak(device, quick)
        result["matmul_peak_tflops"], result["matmul_peak_how"] = mm_peak / 1e12, how
    p = plan(device, quick)
    paper: TowerModel | None = None

    def paper_model() -> TowerModel:
        nonlocal paper
        if paper is None:
            paper = tower("paper", 4, device)
        return paper

    for c in todo:
        elapsed = time.monotonic() - start
        if elapsed > budget:
            result["skipped"][c] = f"time budget: {elapsed:.0f} s of --budget {budget:.0f} s used before it"
            continue
        log(f"# {c} ...")
        t0 = time.monotonic()
        try:
            if c == "search":
                out = []
                for preset, levels, crop, n, counts in p.search:
                    x, y, source = photo_crops(n, crop, 2**levels, seed=0)
                    model = paper_model() if preset == "paper" else tower(preset, levels, device)
                    r = search_agreement(model, x, y, dist_net, counts)
                    out.append({"preset": preset, "case": f"sr {crop // 2**levels}->{crop}", "data": source, **r})
                result["checks"]["search"] = out
            elif c == "train":
                preset, levels, crop, steps = p.train
                result["checks"]["train"] = train_agreement(preset, levels, crop, dist_net, device, steps)
            elif c == "memory":
                result["checks"]["memory"] = memory_check(paper_model(), dist_net, device)
            elif c == "speed":
                result["checks"]["speed"] = speed_check(device, dist_net, quick, result["matmul_peak_tflops"] * 1e12)
            elif c == "ddp":
                result["checks"]["ddp"] = ddp_check(device, timeout=120)
            elif c == "tiling":
                result["checks"]["tiling"] = tiling_check(paper_model(), device, memory_budget)
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others' figures
            result["checks"][c] = {"error": f"{type(e).__name__}: {e}", "passed": False}
        result.setdefault("seconds", {})[c] = time.monotonic() - t0
    result["total_seconds"] = time.monotonic() - start
    return result


# -- reporting -----------------------------------------------------------------------------------------


def _verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("ok" if passed else "FAILED")


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(check, case, figure, value, verdict) rows of a `run` result."""
    rows = []
    ch = result["checks"]
    for r in ch["search"] if isinstance(ch.get("search"), list) else []:
        case = f"{r['preset']} {r['case']}"
        rows += [
            (
                "search",
                case,
                f"identical picks (N={r['inputs']}, m={r['counts']})",
                f"{r['identical_picks']}/{r['picks']} = {r['identical_fraction']:.1%}",
                "",
            ),
            ("search", case, "identical whole codes", f"{r['identical_codes_fraction']:.1%}", ""),
            (
                "search",
                case,
                "bf16 distance error (mean, max)",
                f"{sum(lv['bf16_rel_err_mean'] for lv in r['levels']) / len(r['levels']):.2%}, "
                f"{max(lv['bf16_rel_err_max'] for lv in r['levels']):.2%}",
                "",
            ),
            (
                "search",
                case,
                "gap when different (mean, max; float32)",
                f"{r['gap_rel_mean_when_different']:.3%}, {r['gap_rel_max']:.3%}",
                "",
            ),
            (
                "search",
                case,
                "search gain kept by bf16 (>= 95%)",
                f"{r['search_gain_kept']:.2%}",
                _verdict(r["passed"]),
            ),
        ]
    for key in ("search", "train", "memory", "ddp", "tiling"):
        if isinstance(ch.get(key), dict) and "error" in ch[key]:
            rows.append((key, "", "error", ch[key]["error"][:100], "FAILED"))
    if "train" in ch and "error" not in ch["train"]:
        t = ch["train"]
        case = f"{t['preset']} {t['case']}, {t['steps']} steps, batch {t['batch']}"
        rows += [
            ("train", case, "first step: |bf16 - fp32| / fp32", f"{t['first_step_rel_diff']:.2e}", ""),
            ("train", case, "float32 loss drop over the run", f"{t['fp32_drop']:.1%}", ""),
            ("train", case, f"max gap of {t['window']}-step means, bf16 vs fp32", f"{t['window_gap_max']:.2%}", ""),
            (
                "train",
                case,
                "tolerance: same, fp32 with another batch order",
                f"{t['tolerance']:.2%}",
                _verdict(t["passed"]),
            ),
        ]
    for m in ch.get("memory", []) if isinstance(ch.get("memory"), list) else []:
        rows.append(
            (
                "memory",
                f"paper sr 32->512, batch 1, {m['precision']}",
                "max allocated / reserved",
                f"{m['max_allocated_gib']:.1f} / {m['max_reserved_gib']:.1f} GiB (authors: {AUTHORS_GB} GB)",
                "fits 32 GB" if m["fits_authors_gpu"] else "over 32 GB",
            )
        )
    for r in ch.get("speed", []) if isinstance(ch.get("speed"), list) else []:
        frac = "" if r.get("peak_fraction") is None else f" ({r['peak_fraction']:.1%} of bf16 peak)"
        value = "-" if r["value"] is None else f"{r['value']:.4g} {r['unit']}{frac}"
        rows.append(("speed", f"{r['preset']} {r['case']}", r["metric"], value, r.get("note", "")))
    if "ddp" in ch and "error" not in ch["ddp"]:
        d = ch["ddp"]
        for a in d.get("attempts", []):
            rows.append(
                (
                    "ddp",
                    f"2 ranks, {d['gpus']} GPU(s)",
                    f"{a['backend']}",
                    "ran" if a["ok"] else "refused/failed",
                    a["log"][-80:],
                )
            )
        if "loss_rel_gap_max" in d:
            rows += [
                (
                    "ddp",
                    f"{d['backend']}, {d['steps']} steps",
                    "loss gap vs 1 process (max rel)",
                    f"{d['loss_rel_gap_max']:.1e}",
                    "",
                ),
                (
                    "ddp",
                    f"{d['backend']}, {d['steps']} steps",
                    "weights |diff| (mean, max)",
                    f"{d['weight_abs_diff_mean']:.1e}, {d['weight_abs_diff_max']:.1e}",
                    _verdict(d["passed"]),
                ),
            ]
    if "tiling" in ch and "error" not in ch["tiling"]:
        t = ch["tiling"]
        rows.append(
            (
                "tiling",
                f"paper 256->{t['output'][0]}",
                f"tile {t['tile']} ({t['tiles']} tiles), {t['seconds']:.1f} s",
                f"peak {t['peak_above_start_gib']:.2f} GiB of {t['budget_gib']:.2f}",
                _verdict(t["passed"]),
            )
        )
    for c, why in result["skipped"].items():
        rows.append((c, "", "skipped", why, ""))
    return rows


def format_table(result: dict[str, Any]) -> str:
    head = ("check", "case", "figure", "value", "verdict")
    cells = [head] + table_rows(result)
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failed(result: dict[str, Any]) -> list[str]:
    out = []
    for c, r in result["checks"].items():
        items = r if isinstance(r, list) else [r]
        if any(isinstance(i, dict) and i.get("passed") is False for i in items):
            out.append(c)
    return out


def cmd_bench_gpu(a: argparse.Namespace) -> int:
    """`chimle bench gpu` (its options: `chimle.apps.cli`): run the checks, print their table; exit status 1
    when a check that ran failed."""
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device
    )
    bad = sorted(set(a.only.split(",")) - set(CHECKS))
    if bad:
        raise ValueError(f"unknown check {bad[0]!r}: --only takes {','.join(CHECKS)}")
    result = run(
        device,
        quick=a.quick,
        only=a.only.split(","),
        budget=a.budget,
        memory_budget=a.memory_budget,
        distance=a.distance or ("alex" if a.quick and device.type == "cpu" else "vgg"),
    )
    print(format_table(result))
    bad_checks = failed(result)
    print(
        f"# {result['total_seconds']:.0f} s; "
        + (f"FAILED: {', '.join(bad_checks)}" if bad_checks else "all checks that ran passed")
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {a.json}")
    return 1 if bad_checks else 0
