"""Multi-GPU / multi-node training with torchrun + DistributedDataParallel, in one small module.

Single process is the default: every function here is a no-op (or the identity) when torchrun has
not set WORLD_SIZE. Under torchrun:

    torchrun --nproc_per_node=8 -m chimle train --task sr --scale 16 --data DIR --preset paper

each rank searches codes for its own shard of the pool (the search is the expensive part of IMLE),
the codes are all-gathered so every rank holds the whole pool, every rank takes its slice of the
same global batch, DDP all-reduces (averages) the gradients, and only rank 0 writes checkpoints,
logs and grids. Checkpoints hold no per-rank state, so a run resumes under any world size.

Faults. A rank that dies (killed, out of memory, its machine gone) must not leave the others waiting
forever: every collective gives up after `timeout` seconds (`train.dist_timeout`; gloo's own timeout,
NCCL's watchdog with async error handling), a dead peer's closed connection fails the others at once,
and `lost_peer(e)` / `describe_lost(e)` turn what torch raises into one line. Ranks agree on stopping
(`any_rank`) so that Ctrl-C on one of them never leaves the others inside a collective.
"""

from __future__ import annotations

import datetime
import os
import re

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = [
    "init",
    "rank",
    "world_size",
    "is_main",
    "local_device",
    "wrap",
    "unwrap",
    "all_gather_rows",
    "all_mean",
    "assert_in_sync",
    "barrier",
    "shard",
    "any_rank",
    "lost_peer",
    "describe_lost",
]

_timeout = 600.0  # seconds; set by init() from train.dist_timeout


def enabled() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def init(device: str = "auto", timeout: float = 600.0) -> torch.device:
    """Join the process group if launched by torchrun; return this process's device. `timeout`: seconds
    any collective (and the rendezvous) waits for the other ranks before failing instead of hanging."""
    global _timeout
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not enabled():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:  # without it a NCCL collective whose peer is gone can block past the timeout
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        _timeout = float(timeout)
        torch_dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return local_device(device)


def rank() -> int:
    return torch_dist.get_rank() if enabled() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and enabled():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # set_device needs an index (torch 2.11 refuses a bare "cuda")
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def wrap(model: nn.Module) -> nn.Module:
    """DDP around the model when distributed, else the model itself."""
    if not enabled():
        return model
    dev = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(n: int) -> range:
    """The contiguous share of n items that this rank handles (contiguous, so order is kept)."""
    per, extra = divmod(n, world_size())
    r = rank()
    start = r * per + min(r, extra)
    return range(start, start + per + (1 if r < extra else 0))


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of `t` in rank order (row counts may differ between ranks)."""
    if not enabled():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    torch_dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging the global batch's loss)."""
    if not enabled():
        return t
    t = t.clone()
    torch_dist.all_reduce(t)
    return t / world_size()


def assert_in_sync(model: nn.Module) -> None:
    """Raise if the ranks' parameters have drifted apart (they must stay identical under DDP)."""
    if not enabled():
        return
    with torch.no_grad():
        v = torch.stack([p.detach().float().sum() for p in model.parameters()])
        lo, hi = v.clone(), v.clone()
        torch_dist.all_reduce(lo, op=torch_dist.ReduceOp.MIN)
        torch_dist.all_reduce(hi, op=torch_dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(
            f"rank {rank()}: parameters differ between ranks (max gap {float((hi - lo).abs().max()):.3g})"
        )


def barrier() -> None:
    """Wait for every rank. Under gloo a monitored barrier, whose error names the ranks that did not
    arrive within the timeout."""
    if not enabled():
        return
    if torch_dist.get_backend() == "gloo":
        torch_dist.monitored_barrier(timeout=datetime.timedelta(seconds=_timeout), wait_all_ranks=True)
    else:
        torch_dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (so all ranks take the same branch, e.g. stopping)."""
    if not enabled():
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=dev)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


# What gloo and NCCL say when a peer died, hung or became unreachable (they raise plain RuntimeErrors).
_LOST = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Timed out|timed out|Timeout|failed to pass monitoredBarrier"
    r"|NCCL|ProcessGroupGloo|gloo/transport|Socket|Connection refused"
)


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank died, hung or is unreachable."""
    if not enabled():
        return False
    if isinstance(e, getattr(torch_dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and bool(_LOST.search(str(e)))


def describe_lost(e: BaseException) -> str:
    """One line for a lost rank: what happened, without torch's source paths and advice."""
    text = " ".join(str(e).split())
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # "[.../pair.cc:537] "
    text = text.split(". This is typically")[0].split(" Check the logs")[0].strip().rstrip(".")
    if re.search(r"Timed out|timed out|Timeout|monitoredBarrier", text):
        what = f"no answer from another rank within {_timeout:g} s (train.dist_timeout): one is stuck or gone"
    elif re.search(r"closed|reset|Broken pipe|refused", text):
        what = "another rank died"
    else:
        what = "a collective failed"
    return f"rank {rank()}: {what} ({text[:160]})"
