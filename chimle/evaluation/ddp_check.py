"""DDP against one process: 2 ranks of the training step on this machine's GPU(s) (or CPU) must give the
losses and weights that one process gives on the same global batches.

    r = ddp_check(torch.device("cuda"), timeout=120)   # {"attempts": [...], "loss_rel_gap_max", ..., "passed"}

Both sides run `ddp_steps`: the same init, the same global batches, rank r taking its contiguous share (as
`chimle.training.dist.shard` does), the loss scaled by world / global batch as the Trainer does; float32,
deterministic cuDNN. The ranks are separate processes (`python -m chimle.evaluation.ddp_check OUT BACKEND`,
started by `ddp_check` with torchrun's environment variables). NCCL refuses two ranks on one GPU (NCCL >=
2.5, "Duplicate GPU detected"): with one GPU the check tries NCCL, reports the refusal, and runs the ranks
with gloo over the same CUDA tensors; with two GPUs it uses NCCL, one GPU per rank. `chimle bench gpu`
runs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import latent
from ..distances.lpips import LPIPS
from ..memory import keep_freed_host_memory
from ..model import TowerModel
from ..training.step import optimize_step, param_groups
from .precision import float32, photo_crops, tower

__all__ = ["ddp_check", "ddp_steps", "ddp_worker", "DDP_STEPS", "DDP_BATCH", "DDP_LR"]


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


def ddp_worker(out: str, backend: str) -> int:
    """One rank of the DDP check (started by `ddp_check`, with torchrun's environment variables RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT); rank 0 saves the weights and every rank's losses to `out`."""
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
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
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "chimle.evaluation.ddp_check", out, backend]
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


if __name__ == "__main__":  # one rank, started by `ddp_check`
    keep_freed_host_memory()  # as `chimle` does for every command
    if len(sys.argv) != 3:
        sys.exit("usage: python -m chimle.evaluation.ddp_check OUT BACKEND (started by `chimle bench gpu`)")
    sys.exit(ddp_worker(sys.argv[1], sys.argv[2]))
