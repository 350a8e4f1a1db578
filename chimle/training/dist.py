"""Multi-GPU / multi-node training with torchrun + DistributedDataParallel, in one small module.

Single process is the default: every function here is a no-op (or the identity) when torchrun has
not set WORLD_SIZE. Under torchrun:

    torchrun --nproc_per_node=8 -m chimle train --task sr --scale 16 --data DIR --preset paper

each rank searches codes for its own shard of the pool (the search is the expensive part of IMLE),
the codes are all-gathered so every rank holds the whole pool, every rank takes its slice of the
same global batch, DDP all-reduces (averages) the gradients, and only rank 0 writes checkpoints,
logs and grids. Checkpoints hold no per-rank state, so a run resumes under any world size.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = [
    "init",
    "shutdown",
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
]


def enabled() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def init(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; return this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not enabled():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        torch_dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return local_device(device)


def shutdown() -> None:
    if enabled():
        torch_dist.destroy_process_group()


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
    if enabled():
        torch_dist.barrier()
