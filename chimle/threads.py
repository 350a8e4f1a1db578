"""CPU threads for torch: how many a command uses (`--threads N`, by default the cores that are free).

torch starts one intra-op thread per core. Its OpenMP workers spin while they wait for each other, so on
a machine whose cores are busy with other jobs a command with a thread per core slows down by orders of
magnitude; the commands therefore take the cores that are free, and `--threads N` overrides that. The
module imports no torch until a count is applied: the `chimle` command's parser adds `--threads`
(`add_threads_argument`) before anything heavy is loaded.

    n = default_threads()          # os.cpu_count() - round(1-minute load average), at least 1
    with use_threads(None):        # that many for the block (or use_threads(4)), then torch's count again
        ...
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator

__all__ = ["THREADS_HELP", "default_threads", "set_threads", "use_threads", "add_threads_argument"]

THREADS_HELP = (
    "CPU threads for torch (default: the free cores, os.cpu_count() minus the 1-minute load average "
    "rounded to the nearest integer, at least 1; shared among torchrun's processes on the machine; "
    "$OMP_NUM_THREADS when set)"
)


def default_threads() -> int:
    """The cores no other job uses: os.cpu_count() minus the 1-minute load average (rounded to the nearest
    integer), at least 1, divided among the processes torchrun starts on this machine (LOCAL_WORLD_SIZE);
    $OMP_NUM_THREADS instead when it is set (torchrun sets it to 1, a user to choose)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): assume the machine is idle
        load = 0.0
    free = (os.cpu_count() or 1) - math.floor(load + 0.5)  # round half up: round() rounds 2.5 to 2
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    per_process = free // int(local) if local.isdigit() and int(local) > 1 else free
    return max(1, per_process)


def set_threads(n: int | None = None) -> int:
    """torch.set_num_threads(n), or default_threads() when n is None; returns the count set."""
    if n is not None and n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    import torch  # here, not at the top: the command line's parser imports this module

    count = default_threads() if n is None else n
    torch.set_num_threads(count)
    return count


@contextlib.contextmanager
def use_threads(n: int | None = None) -> Iterator[int]:
    """`set_threads(n)` for the block, then the caller's count again (a command run in-process, as the
    tests do, leaves the process as it found it)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 thread, got {n}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N` (None when not given: `set_threads` then takes `default_threads()`)."""
    parser.add_argument("--threads", type=_count, metavar="N", help=THREADS_HELP)
