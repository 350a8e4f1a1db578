"""Speed and memory of the search, the training step and sampling: the measurements of `chimle bench speed`.

    result = run_benchmarks(["tiny", "small"], torch.device("cpu"), quick=True)   # {"rows": [...], ...}
    rows = bench_case(case, device, LPIPS("alex"), reps, peak, {"search", "train"}, compile=False)

Per preset and case ("sr": 8x super-resolution 8 -> 64 px, 16x 32 -> 512 px for "paper"; "same": the
same-size layout at 64 px, 256 px for "paper"; `make_cases`), `bench_case` measures:
  search L<l>    candidates judged per second at level l of the hierarchical (CHIMLE) search, LPIPS
                 included; "search all" the whole search, "search flat" cIMLE's flat search. GFLOP/s:
                 convolution and matmul FLOPs (torch.utils.flop_counter) over the measured time, and
                 their fraction of this machine's measured dense matmul peak (`matmul_peak`: float32 on
                 a CPU, bf16 on CUDA, the precisions the search runs in there)
  naive search   the same search written plainly (`chimle.search.reference_hierarchical`); both must
                 choose the same codes (asserted), and the speed-up is measured in the same run
  train step     images per second of forward (all levels) + multi-level LPIPS + backward + Adam
  sample         samples per second (batched) and the latency of one sample (batch 1)
Peak memory (`peak_mib`): tensor memory of one call above what was allocated before it: CUDA's
max_memory_allocated, or on a CPU the running sum of the allocator's events recorded by torch.profiler
(an RSS delta would show almost nothing after a warm-up: freed memory stays in the process). Times
(`best_time`) are the best of a few repetitions after a warm-up: on a shared machine the minimum is the
least disturbed run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo
import torch.utils.flop_counter

from .. import search
from ..data.tasks import make_task
from ..distances.lpips import LPIPS
from ..inference.sample import generate
from ..model import TowerConfig, TowerModel
from ..training.step import optimize_step, param_groups

__all__ = [
    "BENCHMARKS",
    "Case",
    "make_cases",
    "bench_case",
    "run_benchmarks",
    "best_time",
    "matmul_peak",
    "peak_mib",
    "memory_method",
]

BENCHMARKS = ("search", "naive", "flat", "sample", "train")


# -- measuring -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], reps: int, device: torch.device, warmup: int = 1) -> float:
    """Seconds of the fastest of `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(max(reps, 1)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, quick: bool = False) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: float32 on a CPU, bf16 on CUDA (what the search runs in)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024 if quick else 2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = best_time(lambda: a @ b, 3 if quick else 5, device)
    return 2 * n**3 / t, f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


@contextlib.contextmanager
def _quiet_stderr():
    # The profiler's backend (kineto) writes "profiler_start/stop" lines straight to file descriptor 2.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the start of the call"
    return (
        "peak of the CPU tensor allocations above the start of the call (torch.profiler memory events); "
        "process peak RSS in the JSON (getrusage)"
    )


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak tensor memory of one call of `fn` above what was allocated before it, in MiB: CUDA's
    max_memory_allocated, or on a CPU the running sum of the allocator's alloc/free events recorded by
    torch.profiler (the CPU allocator keeps no statistics, and the process RSS does not fall when
    tensors are freed, so an RSS delta after a warm-up shows nearly nothing)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = current = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


@contextlib.contextmanager
def _frozen(model: TowerModel):
    # FlopCounterMode hooks autograd on module inputs that require grad, which inference mode forbids.
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# -- the cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    preset: str
    name: str  # "sr" (upscale layout) or "same"
    input_hw: tuple[int, int]
    levels: int
    counts: list[int]  # m_l of the hierarchical search
    flat: int  # m of the flat search
    batch: int  # inputs searched together
    naive_counts: list[int]  # m_l of the naive comparison (the naive search is slow)
    train_batch: int
    sample_batch: int

    @property
    def layout(self) -> str:
        return "upscale" if self.name == "sr" else "same"

    @property
    def label(self) -> str:
        h = self.input_hw[0]
        return f"sr {h}->{h * 2**self.levels}" if self.name == "sr" else f"same {h}"


def make_cases(preset: str, device: torch.device, quick: bool) -> list[Case]:
    if preset == "paper":  # 16x SR 32 -> 512 px and same-size 256 px, 4 levels
        if device.type == "cuda":  # the authors' counts; the naive comparison with fewer
            kw = dict(
                counts=[200, 200, 20, 10], flat=430, batch=2, naive_counts=[20, 20, 4, 2], train_batch=1, sample_batch=8
            )
        else:  # a CPU forward at 512 px takes seconds: tiny counts
            kw = dict(counts=[2, 2, 1, 1], flat=6, batch=1, naive_counts=[2, 2, 1, 1], train_batch=1, sample_batch=1)
        return [Case(preset, "sr", (32, 32), 4, **kw), Case(preset, "same", (256, 256), 4, **kw)]
    if quick:
        kw = dict(counts=[4, 3, 2], flat=9, batch=1, naive_counts=[4, 3, 2], train_batch=2, sample_batch=4)
    else:  # the default config's counts (chimle.config.SearchConfig)
        kw = dict(counts=[20, 10, 5], flat=35, batch=4, naive_counts=[20, 10, 5], train_batch=4, sample_batch=16)
    return [Case(preset, "sr", (8, 8), 3, **kw), Case(preset, "same", (64, 64), 3, **kw)]


def _row(
    case: Case,
    metric: str,
    value: float | None,
    unit: str,
    peak: float | None = None,
    flops: float | None = None,
    mm_peak: float = 0.0,
    note: str = "",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "preset": case.preset,
        "case": case.label,
        "metric": metric,
        "value": value,
        "unit": unit,
        "gflops": None if flops is None else flops / 1e9,
        "peak_fraction": None if flops is None or not mm_peak else flops / mm_peak,
        "peak_mib": peak,
        "note": note,
        **extra,
    }


def _instrumented(fn: Callable[[Any], Any], device: torch.device, model: TowerModel | None = None) -> tuple[int, float]:
    """(FLOPs, peak MiB) of one call of fn(counter). Pass `model` when fn runs in inference mode."""
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)

    def call():
        with _frozen(model) if model is not None else contextlib.nullcontext(), counter:
            fn(counter)

    peak = peak_mib(call, device)
    return counter.get_total_flops(), peak


def _measure(fn: Callable[[Any], Any], device: torch.device, reps: int, model: TowerModel | None = None):
    """(best seconds, FLOPs, peak MiB) of fn(counter_or_None). On a CPU the instrumented call is the
    warm-up; on CUDA it follows one, so that cuDNN's autotuning is neither counted nor timed."""
    if device.type == "cuda":
        fn(None)
    flops, peak = _instrumented(fn, device, model)
    return best_time(lambda: fn(None), reps, device, warmup=0), flops, peak


def bench_case(
    case: Case, device: torch.device, distance, reps: int, mm_peak: float, only: set[str], compile: bool
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset(case.preset, layout=case.layout, levels=case.levels)).to(device)
    n, out_hw = case.batch, model.cfg.output_sizes(*case.input_hw)[-1]
    x, y = torch.rand(n, 3, *case.input_hw, device=device), torch.rand(n, 3, *out_hw, device=device)
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    rows: list[dict[str, Any]] = []
    fast_time = None

    def hier(counts, compile_=False, on_level=None):
        options = search.SearchOptions(compile=compile_, on_level=on_level)
        return search.hierarchical(model, x, y, distance, counts, gen(), options=options)

    if "search" in only or "naive" in only:
        marks: list[float] = []
        level_flops: list[int] = []

        def timed_search(counter):
            marks.append(time.perf_counter())

            def on_level(l, d):
                _sync(device)
                marks.append(time.perf_counter())
                if counter is not None:
                    level_flops.append(counter.get_total_flops())

            hier(case.counts, on_level=on_level)
            marks.append(time.perf_counter())

        total, flops, mem = _measure(timed_search, device, reps, model)
        # marks: [start, end of L1 .. L_L, end] per call; the first call is the instrumented one
        calls = [marks[i : i + len(case.counts) + 2] for i in range(0, len(marks), len(case.counts) + 2)][-reps:]
        per_level = [min(c[l + 1] - c[l] for c in calls) for l in range(len(case.counts))]
        level_flops = [b - a for a, b in zip([0] + level_flops, level_flops)]
        if "search" in only:
            for l, (t, m, f) in enumerate(zip(per_level, case.counts, level_flops), 1):
                rows.append(
                    _row(case, f"search L{l}", n * m / t, "cand/s", flops=f / t, mm_peak=mm_peak, note=f"N={n} x m={m}")
                )
            rows.append(
                _row(
                    case,
                    "search all",
                    n * sum(case.counts) / total,
                    "cand/s",
                    mem,
                    flops / total,
                    mm_peak,
                    f"m={case.counts}, {total * 1e3:.0f} ms",
                )
            )
        fast_time = total if case.naive_counts == case.counts else None
        if compile and "search" in only:
            torch._dynamo.reset()  # graphs of earlier cases would count towards the recompile limit
            t0 = time.perf_counter()
            try:
                hier(case.counts, True)
            except Exception as e:  # noqa: BLE001 - no compiler, unsupported op: report, do not stop
                rows.append(_row(case, "search all (compile)", None, "cand/s", note=f"failed: {type(e).__name__}"))
            else:
                first = time.perf_counter() - t0
                ctotal = best_time(lambda: hier(case.counts, True), reps, device)
                rows.append(
                    _row(
                        case,
                        "search all (compile)",
                        n * sum(case.counts) / ctotal,
                        "cand/s",
                        flops=flops / ctotal,
                        mm_peak=mm_peak,
                        note=f"x{total / ctotal:.2f} vs eager; first call {first:.0f} s",
                    )
                )

    if "naive" in only:
        if fast_time is None:
            fast_time = best_time(lambda: hier(case.naive_counts), reps, device)
        fast_codes, fast_d = hier(case.naive_counts)
        t0 = time.perf_counter()
        naive_codes, naive_d = search.reference_hierarchical(model, x, y, distance, case.naive_counts, gen())
        _sync(device)
        naive_time = time.perf_counter() - t0
        same = all(
            torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise) for a, b in zip(fast_codes, naive_codes)
        )
        if device.type == "cpu":  # float32 both: the very same choices
            assert same, "the fast and the naive search chose different codes"
            torch.testing.assert_close(fast_d, naive_d, rtol=1e-4, atol=1e-6)
        else:  # bf16 fast path: a near tie may flip a choice; the distances reached must agree
            assert abs(float(fast_d.mean()) - float(naive_d.mean())) <= 0.1 * float(naive_d.mean()) + 1e-6
        rows.append(
            _row(
                case,
                "naive search",
                n * sum(case.naive_counts) / naive_time,
                "cand/s",
                note=f"speed-up x{naive_time / fast_time:.1f}; same codes: {'yes' if same else 'no (bf16)'}",
                speedup=naive_time / fast_time,
                same_codes=same,
            )
        )

    if "flat" in only:
        nf = min(n, 2)  # whole codes at full resolution are the costliest candidates: fewer inputs
        t, flops, mem = _measure(
            lambda c: search.flat(model, x[:nf], y[:nf], distance, case.flat, gen()), device, reps, model
        )
        rows.append(
            _row(case, "search flat", nf * case.flat / t, "cand/s", mem, flops / t, mm_peak, f"N={nf} x m={case.flat}")
        )

    if "sample" in only:
        xs = torch.rand(case.sample_batch, 3, *case.input_hw, device=device)
        t, flops, mem = _measure(lambda c: generate(model, xs, 1, gen()), device, reps, model)
        rows.append(
            _row(
                case,
                "sample",
                case.sample_batch / t,
                "samples/s",
                mem,
                flops / t,
                mm_peak,
                f"batch {case.sample_batch}",
            )
        )
        t = best_time(lambda: generate(model, xs[:1], 1, gen()), reps, device)
        rows.append(_row(case, "sample latency", t * 1e3, "ms", note="batch 1"))

    if "train" in only:
        task = make_task("sr", scale=2**case.levels) if case.name == "sr" else make_task("jpeg")
        b = case.train_batch
        xt, yt = torch.rand(b, 3, *case.input_hw, device=device), torch.rand(b, 3, *out_hw, device=device)
        codes = model.sample_codes(b, gen(), input_hw=case.input_hw)
        model.train()
        opt = torch.optim.Adam(param_groups(model, 1e-4, 0.01))  # as the Trainer's

        def step(fwd):
            return optimize_step(fwd, opt, xt, yt, codes, distance, to_rgb=task.rgb, loss_scale=1 / b)

        t, flops, mem = _measure(lambda c: step(model), device, reps)
        rows.append(_row(case, "train step", b / t, "img/s", mem, flops / t, mm_peak, f"batch {b}"))
        if compile:
            torch._dynamo.reset()
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            try:
                step(compiled)
            except Exception as e:  # noqa: BLE001
                rows.append(_row(case, "train step (compile)", None, "img/s", note=f"failed: {type(e).__name__}"))
            else:
                first = time.perf_counter() - t0
                ct = best_time(lambda: step(compiled), reps, device)
                rows.append(
                    _row(
                        case,
                        "train step (compile)",
                        b / ct,
                        "img/s",
                        flops=flops / ct,
                        mm_peak=mm_peak,
                        note=f"batch {b}; x{t / ct:.2f} vs eager; first call {first:.0f} s",
                    )
                )
    return rows


def run_benchmarks(
    presets: Sequence[str],
    device: torch.device,
    *,
    quick: bool = False,
    reps: int | None = None,
    distance: str = "vgg",
    cases: Sequence[str] = ("sr", "same"),
    only: Sequence[str] = BENCHMARKS,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every case of `presets` on `device`; returns {"rows": [...], "device": ..., ...} (what --json writes)."""
    reps = reps or (1 if quick else 3)
    peak, peak_how = matmul_peak(device, quick)
    dist_net = LPIPS(distance).to(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "distance": f"LPIPS-{distance}",
        "quick": quick,
        "reps": reps,
        "matmul_peak_gflops": peak / 1e9,
        "matmul_peak_how": peak_how,
        "memory": memory_method(device),
        "notes": [],
        "rows": [],
    }
    log(
        f"# device {result['device']}, torch {torch.__version__}, {result['distance']}; measured matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s ({peak_how}); memory: {result['memory']}"
    )
    for preset in presets:
        for case in make_cases(preset, device, quick):
            if case.name not in cases:
                continue
            log(f"# {preset} {case.label}: search m={case.counts} (N={case.batch}), flat m={case.flat} ...")
            result["rows"] += bench_case(case, device, dist_net, reps, peak, set(only), compile)
    result["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result
