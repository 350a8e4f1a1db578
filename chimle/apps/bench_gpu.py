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
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import latent, search
from ..data.tasks import make_task
from ..distances.lpips import LPIPS
from ..inference.sample import generate
from ..inference.tiling import auto_tile, padded_hw, tile_starts
from ..loss import level_targets
from ..memory import default_budget, keep_freed_host_memory, parse_bytes
from ..model import TowerConfig, TowerModel
from ..resample import resize
from ..threads import add_threads_argument, use_threads
from ..training.step import optimize_step, param_groups
from . import bench_speed

__all__ = ["main", "run", "CHECKS", "search_agreement", "train_agreement", "format_table"]

CHECKS = ("search", "train", "memory", "speed", "ddp", "tiling")
CPU_CHECKS = ("search", "train")  # what runs without CUDA (bf16 autocast on the CPU)
AUTHORS_GB = 32  # "a 32 GB GPU" for 16x SR (CHIMLE's appendix; 24 GB for the other tasks)
GiB = 2**30


# -- precision switches ------------------------------------------------------------------------------


@contextlib.contextmanager
def float32(device: torch.device) -> Iterator[None]:
    """True float32: autocast off (also inside code that turns it on), and on CUDA no TF32 (cuDNN uses
    it for float32 convolutions by default, which would make the reference a 10-bit one)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bf16(device: torch.device):
    """bf16 autocast. On CUDA the search and the training step turn it on themselves (this is a no-op
    there); on a CPU it is what they would do with a CUDA device."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


# -- data ------------------------------------------------------------------------------------------


def photo_crops(n: int, crop: int, scale: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, targets, source): n random crops of the builtin photos (scikit-image's), upscaled where a
    photo is smaller than the crop, and their 8-bit bicubic downsamples by `scale` (the sr task).
    Falls back to smooth random images where scikit-image is missing."""
    g = torch.Generator().manual_seed(seed)
    task = make_task("sr", scale=scale)
    try:
        from ..data.imageio import builtin_photo_dir, list_images, load_image

        photos, source = [load_image(p) for p in list_images(builtin_photo_dir())], "builtin photos"
    except Exception as e:  # noqa: BLE001 - no scikit-image on this machine: say so, use synthetic images
        photos = [resize(torch.rand(1, 3, 8, 8, generator=g), (crop, crop))[0].clamp(0, 1) for _ in range(4)]
        source = f"smooth random images ({type(e).__name__}: no builtin photos)"
    ys = []
    for k in range(n):
        img = photos[k % len(photos)]
        h, w = img.shape[-2:]
        if min(h, w) < crop:
            f = crop / min(h, w)
            img = resize(img[None], (math.ceil(h * f), math.ceil(w * f)))[0].clamp(0, 1)
            h, w = img.shape[-2:]
        top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
        ys.append(img[:, top : top + crop, left : left + crop])
    y = torch.stack(ys).contiguous()
    return task.degrade(y).contiguous(), y, source


def tower(preset: str, levels: int, device: torch.device, seed: int = 0) -> TowerModel:
    torch.manual_seed(seed)
    return TowerModel(TowerConfig.preset(preset, layout="upscale", levels=levels)).to(device)


# -- check: the search in bf16 against float32 ------------------------------------------------------


def search_agreement(
    model: TowerModel, x: torch.Tensor, y: torch.Tensor, distance, counts: Sequence[int], seed: int = 0
) -> dict[str, Any]:
    """Algorithm 1 scored twice on the same candidates: in float32 (NCHW, TF32 off) and as the search runs
    on this device in bf16 (on CUDA: the Scorer's own autocast and channels-last; on a CPU: bf16 autocast).
    Both judge level l on the float32 search's choices at levels < l, so every level compares the same
    candidates on the same prefix. Returns per level the picks of both, the float32 distances at both
    picks, the median candidate's, and the relative error of bf16's distances."""
    dev = model.device
    x, y = x.to(dev), y.to(dev)
    # float32 needs twice the bytes per candidate that the search's chunking assumes on CUDA (bf16 there)
    ref_budget = default_budget(dev) // 2 if dev.type == "cuda" else None
    ref = search.Scorer(model, x, y, distance, None, ref_budget)
    fast = search.Scorer(model, x, y, distance, None, None)
    ref.fmt = lambda t: t  # the reference: plain NCHW (the Scorer would make it channels-last on CUDA)
    with ref.context(), float32(dev):
        ref.initial = model.initial_state(x.clone())
    fast_ctx = lambda: contextlib.ExitStack() if dev.type == "cuda" else bf16(dev)  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(seed)
    n, levels, t0 = x.shape[0], [], time.perf_counter()
    p_ref, p_fast = ref.initial, fast.initial
    for l, m in enumerate(counts, 1):
        _, z, _ = search.draw(ref.layout, l, n * m, g, dev)
        with ref.context(), float32(dev):
            d32 = ref.score(p_ref, l, [z], m).float()
        with fast.context(), fast_ctx():
            d16 = fast.score(p_fast, l, [z], m).float()
        a, b = d32.argmin(1), d16.argmin(1)
        rows = torch.arange(n, device=dev)
        chosen = latent.index([z], rows * m + a)[0]
        with ref.context(), float32(dev):
            p_ref = ref.step(l, p_ref, chosen)
        with fast.context(), fast_ctx():
            p_fast = fast.step(l, p_fast, fast.fmt(chosen))
        err = ((d16 - d32).abs() / d32.clamp_min(1e-12)).flatten()
        levels.append(
            {
                "level": l,
                "m": m,
                "picks_fp32": a.tolist(),
                "picks_bf16": b.tolist(),
                "d_fp32_at_fp32_pick": d32[rows, a].tolist(),
                "d_fp32_at_bf16_pick": d32[rows, b].tolist(),
                "d_fp32_median": d32.median(1).values.tolist(),
                "bf16_rel_err_mean": float(err.mean()),
                "bf16_rel_err_max": float(err.max()),
            }
        )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    # The production path, for the record: `search.hierarchical` with the same generator draws the same
    # level-1 candidates and judges them as `fast` does on CUDA, as `ref` does on a CPU (float32 there).
    picks = search.hierarchical(model, x, y, distance, counts, torch.Generator(device=dev).manual_seed(seed)).picks
    mine = levels[0]["picks_bf16" if dev.type == "cuda" else "picks_fp32"]
    return {
        "inputs": n,
        "counts": list(counts),
        "levels": levels,
        "seconds": seconds,
        "production_level1_same": sum(int(p == q) for p, q in zip(picks[:, 0].tolist(), mine)),
        **summarize_search(levels),
    }


def summarize_search(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a `search_agreement`, computed from its picks and distances (so they can be checked)."""
    same = total = 0
    gaps, excess, gain = [], 0.0, 0.0
    whole = None
    for lv in levels:
        eq = [p == q for p, q in zip(lv["picks_fp32"], lv["picks_bf16"])]
        whole = eq if whole is None else [w and e for w, e in zip(whole, eq)]
        same, total = same + sum(eq), total + len(eq)
        for e, best, got, med in zip(eq, lv["d_fp32_at_fp32_pick"], lv["d_fp32_at_bf16_pick"], lv["d_fp32_median"]):
            if not e:
                gaps.append((got - best) / best)
            excess += got - best
            gain += med - best
    kept = 1 - excess / gain if gain > 0 else 1.0
    return {
        "identical_picks": same,
        "picks": total,
        "identical_fraction": same / total,
        "identical_codes_fraction": sum(whole) / len(whole),
        "gap_rel_mean_when_different": sum(gaps) / len(gaps) if gaps else 0.0,
        "gap_rel_max": max(gaps) if gaps else 0.0,
        "search_gain_kept": kept,
        "tolerance": "search_gain_kept >= 0.95",
        "passed": kept >= 0.95,
    }


# -- check: training in bf16 against float32 ------------------------------------------------------


def train_curve(
    model: TowerModel,
    pool: tuple[torch.Tensor, torch.Tensor, latent.Codes],
    distance,
    steps: int,
    batch: int,
    lr: float,
    order_seed: int,
    use_bf16: bool,
) -> list[float]:
    """The loss (sum over levels, batch mean) of every step of `steps` Adam steps on a fixed pool of
    (input, code, target), the batches drawn from `order_seed`. bf16: autocast of the tower's forward,
    the loss in float32, as `optimize_step` trains on CUDA; else true float32."""
    dev = model.device
    x_all, y_all, codes_all = pool
    opt = torch.optim.Adam(param_groups(model, lr, 0.01))
    g = torch.Generator().manual_seed(order_seed)
    sizes = model.cfg.output_sizes(*x_all.shape[-2:])
    with torch.no_grad(), float32(dev):
        targets_all = level_targets(y_all.to(dev), sizes, distance)
    curve = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        idx = rows.to(dev)
        targets = [t._replace(image=t.image[idx], features=[f[idx] for f in t.features]) for t in targets_all]
        codes = latent.index(codes_all, idx)
        with contextlib.nullcontext() if use_bf16 else float32(dev):
            losses = optimize_step(
                model,
                opt,
                x_all[idx],
                targets,
                codes,
                distance,
                loss_scale=1 / batch,
                amp=use_bf16,
            )
        curve.append(float(losses.sum(1).mean()))
    return curve


def windows(curve: Sequence[float], w: int) -> list[float]:
    return [sum(curve[i : i + w]) / len(curve[i : i + w]) for i in range(0, len(curve), w)]


def curve_gap(a: Sequence[float], b: Sequence[float], w: int) -> float:
    """Largest relative difference of the window means of two loss curves."""
    return max(abs(p - q) / abs(q) for p, q in zip(windows(a, w), windows(b, w)))


def train_agreement(
    preset: str, levels: int, crop: int, distance, device: torch.device, steps: int, batch: int = 4, lr: float = 1e-4
) -> dict[str, Any]:
    """float32, bf16 (same seed, same batches) and float32 with another batch order, from one init."""
    scale = 2**levels
    x, y, source = photo_crops(16, crop, scale, seed=1)
    base = tower(preset, levels, device)
    codes = base.sample_codes(16, torch.Generator(device=device).manual_seed(1), input_hw=x.shape[-2:])
    pool = (x.to(device), y.to(device), codes)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    t0 = time.perf_counter()
    curves = {}
    for name, order, half in (("fp32", 0, False), ("bf16", 0, True), ("fp32_other_order", 1, False)):
        base.load_state_dict(init)
        curves[name] = train_curve(base, pool, distance, steps, batch, lr, order, half)
    w = max(1, min(20, steps // 10))
    return {
        "preset": preset,
        "case": f"sr {crop // scale}->{crop}",
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "window": w,
        "data": source,
        "seconds": time.perf_counter() - t0,
        "curves": curves,
        **summarize_train(curves, w),
    }


def summarize_train(curves: dict[str, list[float]], w: int) -> dict[str, Any]:
    """The figures of a `train_agreement`, computed from its curves."""
    gap = curve_gap(curves["bf16"], curves["fp32"], w)
    tol = curve_gap(curves["fp32_other_order"], curves["fp32"], w)
    first = abs(curves["bf16"][0] - curves["fp32"][0]) / curves["fp32"][0]
    win = windows(curves["fp32"], w)
    return {
        "first_step_rel_diff": first,
        "window_gap_max": gap,
        "tolerance": tol,
        "fp32_drop": 1 - win[-1] / win[0],
        "passed": gap <= tol,
    }


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
        bench_speed.Case("small", "sr", (8, 8), 3, [20, 10, 5], 35, 16, [20, 10, 5], 4, 16),
        bench_speed.Case(
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
        rows += bench_speed.bench_case(
            case, device, distance, reps, mm_peak, {"search", "flat", "sample", "train"}, False
        )
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


# -- DDP: 2 ranks against 1 process -------------------------------------------------------------------

DDP_STEPS, DDP_BATCH, DDP_LR = 5, 4, 1e-4


def ddp_steps(rank: int, world: int, device: torch.device, wrap: Callable[[TowerModel], torch.nn.Module]):
    """The steps both sides run: the same init, the same global batches, rank r taking its contiguous
    share (as `chimle.training.dist.shard` does), the loss scaled by world / global batch as the Trainer
    does; float32, deterministic cuDNN. Returns (model, losses of every step, global batch mean)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    model = tower("small", 3, device)
    net = wrap(model)
    distance = LPIPS("vgg").to(device)
    x, y, _ = photo_crops(8, 64, 8, seed=4)
    codes = model.sample_codes(8, torch.Generator(device=device).manual_seed(4), input_hw=(8, 8))
    opt = torch.optim.Adam(param_groups(model, DDP_LR, 0.01))
    per, losses = DDP_BATCH // world, []
    g = torch.Generator().manual_seed(5)
    with float32(device):
        for _ in range(DDP_STEPS):
            rows = torch.randint(0, 8, (DDP_BATCH,), generator=g)[rank * per : (rank + 1) * per]
            idx = rows.to(device)
            l = optimize_step(
                net,
                opt,
                x[rows].to(device),
                y[rows].to(device),
                latent.index(codes, idx),
                distance,
                loss_scale=world / DDP_BATCH,
                amp=False,
            )
            losses.append(l.sum(1))  # this rank's rows
    return model, losses


def ddp_worker(out: str) -> int:
    """One rank of the DDP check (run by `ddp_check` with torchrun's environment variables)."""
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ["CHIMLE_DDP_BACKEND"]
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")  # the CPU: a smoke test
    if gpus:
        torch.cuda.set_device(device)
    try:  # binding the NCCL communicator to the device (torch >= 2.3) makes a refusal show at once
        tdist.init_process_group(backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    except TypeError:
        tdist.init_process_group(backend, rank=rank, world_size=world)
    try:
        ids = [device.index] if gpus else None
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)  # noqa: E731
        model, losses = ddp_steps(rank, world, device, wrap)
        gathered = [None] * world
        tdist.all_gather_object(gathered, [t.cpu() for t in losses])
        if rank == 0:
            per_step = [torch.cat([g[s] for g in gathered]) for s in range(DDP_STEPS)]
            torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "losses": per_step}, out)
    finally:
        tdist.destroy_process_group()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend: str, out: str, timeout: float) -> tuple[bool, str]:
    """Start the 2 ranks; (finished, last lines of their output)."""
    root = str(Path(__file__).resolve().parents[2])  # so the ranks import this chimle, installed or not
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "CHIMLE_DDP_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "chimle.apps.bench_gpu", "--ddp-worker", out]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"rank{r}.log" for r in range(2)]
        procs = []
        for r, log in enumerate(logs):
            with open(log, "w") as f:
                rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
                procs.append(subprocess.Popen(cmd, env=rank_env, stdout=f, stderr=subprocess.STDOUT))
        deadline, failed_at = time.monotonic() + timeout, None
        while any(q.poll() is None for q in procs) and time.monotonic() < deadline:
            if failed_at is None and any(q.poll() not in (None, 0) for q in procs):
                failed_at = time.monotonic()  # a rank failed: its peer may wait for it forever
            if failed_at is not None and time.monotonic() - failed_at > 15:
                break
            time.sleep(0.5)
        timed_out = [q for q in procs if q.poll() is None]
        for q in timed_out:  # only the ranks started here
            q.kill()
            q.wait()
        ok = not timed_out and all(q.returncode == 0 for q in procs)
        lines = [line for log in logs for line in log.read_text(errors="replace").strip().splitlines()[-3:]]
    tail = " | ".join(line.strip() for line in lines if line.strip()) + (" | (ended: timed out)" if timed_out else "")
    return ok, tail[-600:]


def ddp_check(device: torch.device, timeout: float) -> dict[str, Any]:
    """2 ranks on this machine's GPU(s) against one process on the same global batches."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        single, single_losses = ddp_steps(0, 1, device, lambda m: m)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    result: dict[str, Any] = {"gpus": torch.cuda.device_count(), "steps": DDP_STEPS, "global_batch": DDP_BATCH}
    if device.type == "cuda" and result["gpus"] > 1:
        result["note"] = "one GPU per rank"
    attempts = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.pt")
        for backend in ("nccl", "gloo") if device.type == "cuda" else ("gloo",):
            t0 = time.perf_counter()
            ok, tail = _launch(backend, out, timeout)
            attempts.append(
                {"backend": backend, "ok": ok, "seconds": time.perf_counter() - t0, "log": "" if ok else tail}
            )
            if ok:
                break
        result["attempts"] = attempts
        if not Path(out).exists():
            result["passed"] = False
            return result
        multi = torch.load(out, weights_only=True)
    result["backend"] = attempts[-1]["backend"]
    ref = {k: v.cpu() for k, v in single.state_dict().items()}
    diffs = torch.cat([(multi["model"][k].float() - v.float()).abs().flatten() for k, v in ref.items()])
    loss_gap = max(float(((a - b.cpu()).abs() / b.cpu().abs()).max()) for a, b in zip(multi["losses"], single_losses))
    result |= {
        "loss_rel_gap_max": loss_gap,
        "weight_abs_diff_max": float(diffs.max()),
        "weight_abs_diff_mean": float(diffs.mean()),
        # A wrong split of the batch (or unsynchronised gradients) moves nearly every weight by ~lr per
        # step; summing the same gradients in another order moves a few near-zero ones (Adam magnifies
        # their float noise). Tolerance: the same per-step losses to 1e-4, a mean weight change below
        # 1% of one step's.
        "tolerance": f"loss_rel_gap_max <= 1e-4 and weight_abs_diff_mean <= {0.01 * DDP_LR:g}",
    }
    result["passed"] = loss_gap <= 1e-4 and result["weight_abs_diff_mean"] <= 0.01 * DDP_LR
    return result


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
        mm_peak, how = bench_speed.matmul_peak(device, quick)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_host_memory()  # as `chimle bench` does (chimle.apps.cli.main), also when run as a script
    if argv[:1] == ["--ddp-worker"]:  # one rank of the DDP check (started by ddp_check)
        return ddp_worker(argv[1])
    p = argparse.ArgumentParser(prog="chimle bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer candidates, steps and repetitions")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--budget", type=float, default=480, help="seconds; checks not started by then are skipped")
    p.add_argument("--memory-budget", default="4GB", help="memory for the tiled 4096 x 4096 sample (default 4GB)")
    p.add_argument(
        "--distance", choices=["vgg", "alex"], help="LPIPS network (default vgg; on a CPU with --quick: alex)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    add_threads_argument(p)
    p.add_argument("--json", help="write every figure to this JSON file")
    a = p.parse_args(argv)
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device
    )
    bad = sorted(set(a.only.split(",")) - set(CHECKS))
    if bad:
        p.error(f"unknown check {bad[0]!r}: --only takes {','.join(CHECKS)}")
    with use_threads(a.threads):
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


if __name__ == "__main__":
    sys.exit(main())
