"""Memory arithmetic: how many candidates (or image rows) a step can run at once within a byte budget.

The search runs candidates in chunks and tiled inference picks its tile side from the same estimate
of a tower's activation memory, so one budget (`search.memory_budget`, `--memory-budget`) governs both.
`keep_freed_host_memory` is the CPU's counterpart of CUDA's caching allocator, for the commands.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from .model import TowerModel

__all__ = [
    "parse_bytes",
    "default_budget",
    "available_memory",
    "bytes_per_row",
    "chunk_rows",
    "keep_freed_host_memory",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed host memory for reuse instead of handing it back to the kernel at once.

    A step on the CPU frees and re-allocates the same megabyte-sized activations every time. glibc
    returns blocks above its mmap threshold, and the heap's free top beyond its trim threshold, to the
    kernel on free, so the next step page-faults them in again, thousands of faults per training step
    (`benchmarks/train_step.py` counts them; docs/measurements.md has the figures). Raising both thresholds
    (mmap to glibc's maximum, 32 MiB) keeps such blocks in the process, as CUDA's caching allocator
    does on a GPU; the resident size then stays near its peak until the process exits. Process-wide,
    so the commands call it (`chimle.apps.cli.main`), not the library. False where it does not apply
    (not Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def parse_bytes(budget: int | str) -> int:
    """'512MB', '4GiB', '2G' or an int -> bytes."""
    if isinstance(budget, (int, float)):
        return int(budget)
    s = budget.strip().upper().replace("IB", "B")
    for unit, mult in (
        ("TB", 2**40),
        ("GB", 2**30),
        ("MB", 2**20),
        ("KB", 2**10),
        ("T", 2**40),
        ("G", 2**30),
        ("M", 2**20),
        ("K", 2**10),
        ("B", 1),
    ):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def default_budget(device: torch.device) -> int:
    """Half the free GPU memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 2 * 2**30


def available_memory(device: torch.device) -> int | None:
    """Bytes a process can still allocate on `device` without swapping: the free GPU memory, or the host's
    MemAvailable (Linux; the free physical pages elsewhere); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def bytes_per_row(model: TowerModel, levels: range, input_hw: tuple[int, int]) -> int:
    """Estimated peak bytes per candidate (or image) when running `levels` and the distance under no_grad.

    Under no_grad only a few activations live at once; the widest is a dense block's concatenation
    (nf + 4 gc channels). The factor 6 covers it, its neighbours and the distance network's features.
    """
    cfg, per_row = model.cfg, 0
    elem = 2 if model.device.type == "cuda" else 4
    outs = cfg.output_sizes(*input_hw)
    for l in levels:
        h, w = outs[l - 1]
        nf, gc = cfg.channels[l - 1], cfg.growth[l - 1]
        per_row = max(per_row, elem * h * w * (6 * (nf + 4 * gc) + 2 * 64 * 3))
    return max(per_row, 1)


def chunk_rows(model: TowerModel, levels: range, input_hw: tuple[int, int], budget: int) -> int:
    """How many candidates fit in `budget` bytes when running `levels` and the distance on them (>= 1)."""
    return max(1, budget // bytes_per_row(model, levels, input_hw))
