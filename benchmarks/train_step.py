"""One training step of chimle's Trainer, and its parts: where the time of a step goes.

    python benchmarks/train_step.py                           # small preset, batch 4, 8 -> 64 px, LPIPS-VGG, 1 thread
    python benchmarks/train_step.py --threads 2 --json step.json
    python benchmarks/train_step.py --preset tiny --crop 32   # any other configuration

"step" is `Trainer.train_step` on a pool of builtin-photo crops (the trainer's own batch order, pool and
optimizer), after a few warm-up steps. The parts are timed one by one on one batch, through public APIs
only: the tower's forward and backward, LPIPS on the outputs (forward; its backward is "loss backward"),
the targets' resize + LPIPS features (what a step recomputed before the pool kept them), Adam's step,
and the weight-normalised conv weights (forward + backward; part of the tower's times). Where this
checkout caches the targets per pool round (`Pool.loss_targets`), the same run also times the plain
step (`chimle.loss.level_losses` on the raw targets, Adam's default loop), interleaved with the
trainer's step, and prints the speed-up measured in the same run.

Both steps' convolution and matmul FLOPs (`torch.utils.flop_counter`) are counted and set against this
core's float32 matmul rate, measured in the same run: how close a step is to what the hardware can do,
and how much of a speed-up is fewer FLOPs rather than a higher rate.

Before/after against another checkout (e.g. HEAD), without touching the working tree:

    git worktree add /tmp/head HEAD && PYTHONPATH=/tmp/head python benchmarks/train_step.py

Times are the fastest of --reps repetitions, as process CPU time (what the step costs; with one
thread it is the least disturbed by other jobs on a shared machine) and as wall time. Like the `chimle`
commands, the benchmark keeps freed host memory for reuse (`chimle.memory.keep_freed_host_memory`);
`--system-malloc` leaves glibc's default, and the page faults and kernel time of a step show the difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

import chimle
from chimle.evaluation.speed import matmul_peak
from chimle.loss import level_losses
from chimle.memory import keep_freed_host_memory
from chimle.resample import resize
from chimle.training.config import load_config
from chimle.training.trainer import Trainer


def best(fns: dict[str, Callable[[], object]], reps: int, block: int = 1) -> dict[str, tuple[float, float]]:
    """{name: (min CPU seconds, min wall seconds)} of `reps` rounds; each round runs every function
    `block` times in a row (alternating single calls of two steps slows both: each evicts the other's
    memory), the functions taking turns so that a change of load on the machine touches all alike."""
    out = {k: (float("inf"), float("inf")) for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            for _ in range(block):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                c, w = time.process_time() - c0, time.perf_counter() - w0
                out[k] = (min(out[k][0], c), min(out[k][1], w))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--scale", type=int, default=8)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--distance", default="vgg")
    p.add_argument("--pool", type=int, default=8, help="pool entries (the step draws its batch from them)")
    p.add_argument("--reps", type=int, default=9, help="timed repetitions of each (the fastest is kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--system-malloc", action="store_true", help="glibc's default: freed memory goes back at once")
    p.add_argument("--json")
    a = p.parse_args(argv)
    kept = False if a.system_malloc else keep_freed_host_memory()
    torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory()
    cfg = load_config(
        base={
            "out": tmp.name,
            "preset": a.preset,
            "data.task": "sr",
            "data.scale": a.scale,
            "data.crop": a.crop,
            "data.data": "builtin",
            "search.distance": a.distance,
            "search.samples_per_level": [2] * (a.scale.bit_length() - 1),
            "search.batch": a.pool,
            "train.pool_size": a.pool,
            "train.batch_size": a.batch,
            "train.device": "cpu",
        }
    )
    tr = Trainer(cfg, quiet=True)
    tr.round = 0
    tr.pool = tr.search_pool()
    model, d, dev = tr.model, tr.distance, tr.device
    cached = hasattr(tr.pool, "loss_targets")  # this checkout keeps the targets' features per round
    step_no = iter(range(10**9))

    def trainer_step():
        tr.train_step(tr.batch_rows(next(step_no)))

    # The plain step: what a step computed before the pool kept the targets (HEAD's optimize_step).
    groups = [{k: v for k, v in g.items() if k != "fused"} for g in tr.opt.param_groups]
    plain_opt = torch.optim.Adam(groups)

    def plain_step():
        rows = tr.batch_rows(next(step_no))
        model.train()
        x, y, codes = tr.pool.batch(rows, dev)
        losses = level_losses(model(x, codes), x, y, d, tr.task.rgb)
        plain_opt.zero_grad(set_to_none=True)
        (losses.sum() / len(rows)).backward()
        plain_opt.step()

    t0 = time.process_time()
    for _ in range(max(4, 2 * a.pool // a.batch)):  # warm-up; fills the pool's target cache
        trainer_step()
    warm = time.process_time() - t0
    steps = {"step": trainer_step, **({"plain step": plain_step} if cached else {})}
    times = best(steps, max(1, a.reps // 3), block=3)
    # The arithmetic of a step (convolution and matmul FLOPs, forward and backward), against this
    # core's float32 matmul rate measured now: how far a step is from what the hardware can do, and
    # how much of the speed-up over the plain step is fewer FLOPs rather than a higher rate.
    flops = {}
    for k, fn in steps.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[k] = counter.get_total_flops()
    peak, peak_how = matmul_peak(torch.device("cpu"))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(3):
        trainer_step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    faults, kernel_ms = (r1.ru_minflt - r0.ru_minflt) / 3, (r1.ru_stime - r0.ru_stime) / 3 * 1e3

    # -- the parts, on one batch ------------------------------------------------------------------
    model.train()
    x, y, codes = tr.pool.batch(tr.batch_rows(0), dev)
    sizes = model.cfg.output_sizes(*x.shape[-2:])
    with torch.no_grad():
        tfeat = [d.features(resize(y, s)) for s in sizes]
    state: dict[str, object] = {}

    def tower_forward():
        state["outs"] = model(x, codes)

    def loss_forward():
        rgb = [o.detach().requires_grad_() for o in state["outs"]]
        loss = sum(d.distance_from_features(d.features(r), f).sum() for r, f in zip(rgb, tfeat)) / len(x)
        state["rgb"], state["loss"] = rgb, loss

    def loss_backward():
        state["loss"].backward()

    def tower_backward():
        torch.autograd.backward(state["outs"], [r.grad for r in state["rgb"]])

    def targets():
        with torch.no_grad():
            for s in sizes:
                d.features(resize(y, s))

    def optimizer():
        tr.opt.step()

    convs = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]

    def weight_norm():
        sum(m.weight.sum() for m in convs).backward()

    def parts_once():
        tower_forward()
        loss_forward()
        loss_backward()
        tower_backward()

    part_fns = {"tower forward": tower_forward, "LPIPS on the outputs": loss_forward, "loss backward": loss_backward}
    part_fns |= {"tower backward": tower_backward}
    parts = {k: (float("inf"), float("inf")) for k in part_fns}
    for _ in range(a.reps):  # in order, each needs the previous one's results
        for k, v in best(part_fns, 1).items():
            parts[k] = (min(parts[k][0], v[0]), min(parts[k][1], v[1]))
    parts |= best({"targets: resize + LPIPS": targets, "optimizer step": optimizer}, a.reps)
    parts |= best({"weight norm (fwd + bwd)": weight_norm}, a.reps)
    model.zero_grad(set_to_none=True)

    # -- report -----------------------------------------------------------------------------------
    rows = [(k, *v) for k, v in times.items()] + [(f"  {k}", *v) for k, v in parts.items()]
    print(
        f"# chimle {Path(chimle.__file__).parent}; {a.preset} preset, batch {a.batch}, "
        f"{a.crop // a.scale} -> {a.crop} px, LPIPS-{a.distance}, {a.threads} thread(s), torch {torch.__version__}; "
        f"targets cached per round: {'yes' if cached else 'no'}; freed memory kept: {'yes' if kept else 'no'}; "
        f"best of {a.reps}"
    )
    print(f"{'':34s} {'CPU ms':>9s} {'wall ms':>9s}")
    for k, c, w in rows:
        print(f"{k:34s} {c * 1e3:9.1f} {w * 1e3:9.1f}")
    # the parts a step runs (the targets' features only where they are not kept per round)
    in_step = [*part_fns, "optimizer step"] + ([] if cached else ["targets: resize + LPIPS"])
    print(f"{'  sum of the parts in a step':34s} {sum(parts[k][0] for k in in_step) * 1e3:9.1f}")
    if cached:
        cpu, wall = (times["plain step"][i] / times["step"][i] for i in (0, 1))
        print(f"speed-up over the plain step, same run: x{cpu:.2f} (CPU), x{wall:.2f} (wall)")
    for k, f in flops.items():
        rate = f / times[k][0]
        print(f"{k}: {f / 1e9:.1f} GFLOP, {rate / 1e9:.0f} GFLOP/s = {rate / peak:.0%} of the {peak_how} rate here")
    if cached:
        print(f"  FLOPs alone: x{flops['plain step'] / flops['step']:.2f} fewer in a step than in the plain step")
    print(f"page faults per step: {faults:.0f} ({kernel_ms:.1f} ms kernel time)")
    print(f"warm-up: {warm:.1f} s CPU for the first steps (incl. the targets' features of the {a.pool} pool entries)")
    if a.json:
        result = {
            "config": vars(a),
            "chimle": str(Path(chimle.__file__).parent),
            "torch": torch.__version__,
            "targets_cached": cached,
            "freed_memory_kept": kept,
            "gflop": {k: f / 1e9 for k, f in flops.items()},
            "matmul_gflops": peak / 1e9,
            "page_faults_per_step": faults,
            "kernel_ms_per_step": kernel_ms,
            "cpu_ms": {k: c * 1e3 for k, c, _ in rows},
            "wall_ms": {k: w * 1e3 for k, _, w in rows},
        }
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
