"""Training: IMLE rounds of "search codes for a pool, then train on those codes".

The authors' schedule (REFERENCE.md): each round picks a pool of images (random crops), searches one
latent code per image (CHIMLE's hierarchical search, or cIMLE's flat one), then trains
`steps_per_round` steps on (input, code, target) triples from that pool. The loss is the unweighted
sum over levels of LPIPS between each level's output and the target downsampled to that level
(intermediate supervision), plus an optional L1. Adam; the mapping networks at lr x 0.01.

    cfg = chimle.config.load_config(base={"data.task": "sr", "data.scale": 8, "data.data": "photos/"})
    Trainer(cfg).run()                 # writes runs/NAME/{config.yaml, checkpoints/last.pt, samples/, tb/}
    Trainer(cfg, resume=True).run()    # continues from checkpoints/last.pt, same trajectory

Resume reproduces an uninterrupted run exactly: every random choice (pool crops, search candidates,
batch order) comes from a generator seeded by (seed, round or step), not from hidden global state.
"""

from __future__ import annotations

import contextlib
import csv
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import dist, latent, search
from .checkpoint import load_state, save_state
from .config import Config, dump_config, resolve_model
from .data import ImageDataset, builtin_photo_dir, make_task
from .distance import make_distance
from .model import TowerModel, downsample

__all__ = ["Trainer", "train", "seeded", "level_losses", "optimize_step"]


def seeded(*key: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on `device` (default CPU) determined by the integers in `key` (independent streams
    for each use)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


def level_losses(task, distance, outs: list[Tensor], x: Tensor, y: Tensor, pixel_weight: float = 0.0) -> Tensor:
    """Per-level loss (N, L): LPIPS(level output as RGB, target downsampled to the level) [+ w * L1]."""
    per_level = []
    for out in outs:
        size = tuple(out.shape[-2:])
        rgb = task.to_rgb(out, downsample(x, size)) if task.name == "colorize" else out
        target = downsample(y, size)
        d = distance(rgb.float(), target)
        if pixel_weight:
            d = d + pixel_weight * (rgb.float() - target).abs().flatten(1).mean(1)
        per_level.append(d)
    return torch.stack(per_level, 1)


def optimize_step(model, opt: torch.optim.Optimizer, task, distance, x: Tensor, y: Tensor, codes: latent.Codes, *,
                  loss_scale: float, amp: bool = True, pixel_weight: float = 0.0) -> Tensor:
    """One optimizer step: forward all levels, loss = loss_scale * sum of the per-level losses, backward,
    step. `model` is the tower (or its DDP / torch.compile wrapper). Returns the detached (N, L) losses.

    On CUDA the forward runs under bf16 autocast (if `amp`) on channels-last inputs (conv outputs and
    their gradients inherit the layout, which cuDNN's bf16 kernels prefer); the CPU path is plain
    float32, so CPU runs stay bit-for-bit reproducible.
    """
    cuda = x.device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
        codes = latent.channels_last(codes)
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else contextlib.nullcontext():
        outs = model(x, codes)
    losses = level_losses(task, distance, outs, x, y, pixel_weight)  # (n, L)
    opt.zero_grad(set_to_none=True)
    (losses.sum() * loss_scale).backward()
    opt.step()
    return losses.detach()


class Trainer:
    """Owns the model, optimizer, data and pool of one run; `run()` trains to `cfg.train.steps`."""

    def __init__(self, cfg: Config, resume: bool = False, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.device = dist.init(cfg.train.device)
        t = cfg.train
        self.out = cfg.out_dir
        self.task = make_task(cfg.data.task, **self._task_kw())
        self.model_cfg = resolve_model(cfg)
        self.dataset = self._dataset(cfg.data.data, train=True)
        self.val = self._dataset(cfg.data.val_data, train=False) if cfg.data.val_data else None
        torch.manual_seed(t.seed)  # the model's initial weights
        self.model = TowerModel(self.model_cfg).to(self.device)
        self.distance = make_distance(cfg.search.distance).to(self.device)
        mapping = {id(p) for p in self.model.mapping_parameters()}
        groups = [{"params": [p for p in self.model.parameters() if id(p) not in mapping], "lr": t.lr},
                  {"params": self.model.mapping_parameters(), "lr": t.lr * t.mapping_lr_mult}]
        self.opt = torch.optim.Adam(groups, betas=(t.beta1, t.beta2))
        self.ddp = dist.wrap(self.model)
        if self.device.type == "cuda":  # fixed shapes every step: let cuDNN pick the fastest convs once
            torch.backends.cudnn.benchmark = True
        # No torch.compile of the training step: on a CPU it measured no gain (LPIPS's and the tower's
        # oneDNN convolutions dominate); `chimle bench speed --compile` measures it on other hardware.
        self.step, self.round, self.pool = 0, 0, None
        self._perm: tuple[int, Tensor | None] = (-1, None)
        self.history: list[dict[str, float]] = []
        if resume:
            self._resume()

    # -- setup ----------------------------------------------------------------------------------
    def _task_kw(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"sr": {"scale": d.scale}, "jpeg": {"quality": d.quality}}.get(d.task, {})

    def _dataset(self, root: str, train: bool) -> ImageDataset:
        d = self.cfg.data
        if not root:
            raise ValueError("data.data is empty: pass --data DIR (a folder of photos), or 'builtin'")
        if root == "builtin":
            root = str(builtin_photo_dir())
        kw = dict(input_root=root, root=d.target) if d.task == "paired" else dict(root=root)
        if d.task == "paired" and not d.target:
            raise ValueError("the paired task needs --target DIR (the folder of target images)")
        with warnings.catch_warnings():
            if not dist.is_main():
                warnings.simplefilter("ignore")
            return ImageDataset(task=self.task, crop=d.crop, levels=self.model_cfg.levels, train=train,
                                skip_bad=d.skip_bad, seed=self.cfg.train.seed, prescale=d.prescale or None,
                                cache=d.cache, verify=d.verify, **kw)

    # -- the pool ---------------------------------------------------------------------------------
    def pool_item(self, round_: int, k: int) -> dict[str, Tensor]:
        """Pool entry k of a round: a random image and a random crop, both fixed by (seed, round, k)."""
        n = len(self.dataset)
        if self._perm[0] != round_:  # one permutation per round, not one per item
            self._perm = (round_, torch.randperm(n, generator=seeded(self.cfg.train.seed, 11, round_)))
        perm = self._perm[1]
        self.dataset.set_epoch(round_ * (1 + self.cfg.train.pool_size // n) + k // n)
        return self.dataset[int(perm[k % n])]

    def pool_batch(self, rows: list[int]) -> tuple[Tensor, Tensor]:
        items = [self.pool_item(self.round, k) for k in rows]
        x = torch.stack([it["input"] for it in items]).to(self.device)
        y = torch.stack([it["target"] for it in items]).to(self.device)
        return x, y

    @torch.no_grad()
    def search_pool(self) -> dict[str, Any]:
        """Search one code per pool entry. Each rank takes its shard; chunks are seeded by their index,
        so the result does not depend on the number of ranks."""
        cfg, s = self.cfg, self.cfg.search
        size = cfg.train.pool_size
        to_rgb = self.task.output_to_rgb
        budget = s.memory_budget or None
        chunks = [list(range(i, min(i + s.batch, size))) for i in range(0, size, s.batch)]
        mine = dist.shard(len(chunks))
        codes, dists = [], []
        zero = self.round < s.zero_code_rounds
        bar = _progress(total=len(mine), desc=f"search round {self.round}", leave=False,
                        disable=self.quiet or not dist.is_main() or len(mine) < 2)
        for ci in mine:
            bar.update(1)
            x, y = self.pool_batch(chunks[ci])
            g = seeded(cfg.train.seed, 22, self.round, ci)
            if zero or s.method == "cimle":
                c, d = search.flat(self.model, x, y, self.distance, s.num_samples, g, to_rgb=to_rgb,
                                   memory_budget=budget, zero=zero, compile=s.compile)
            else:
                c, d = search.ablation(s.ablation, self.model, x, y, self.distance, s.samples_per_level, g,
                                       to_rgb=to_rgb, memory_budget=budget, compile=s.compile)
            codes.append(latent.to(c, "cpu"))
            dists.append(d.cpu())
        bar.close()
        layout = self.model.latent_layout(self.input_hw)
        flat = latent.flatten(latent.cat(codes)) if codes else torch.empty(0, sum(layout.dims()))
        d = torch.cat(dists) if dists else torch.empty(0)
        # Every rank needs every code: the batches of the next steps are drawn from the whole pool.
        flat = dist.all_gather_rows(flat.to(self.device))
        d = dist.all_gather_rows(d.to(self.device))
        return {"round": self.round, "codes": flat.cpu(), "dists": d.cpu()}

    def pool_codes(self, rows: list[int]) -> latent.Codes:
        layout = self.model.latent_layout(self.input_hw)
        return latent.to(latent.unflatten(self.pool["codes"][rows], layout), self.device)

    @property
    def input_hw(self) -> tuple[int, int]:
        c = self.cfg.data.crop // self.task.scale
        return c, c

    # -- one step ---------------------------------------------------------------------------------
    def batch_rows(self, step: int) -> list[int]:
        """The global batch of `step` (same on every rank) and this rank's slice of it."""
        t = self.cfg.train
        rows = torch.randint(0, t.pool_size, (t.batch_size,), generator=seeded(t.seed, 33, step)).tolist()
        share = dist.shard(t.batch_size)
        return rows[share.start:share.stop]

    def train_step(self, rows: list[int]) -> dict[str, float]:
        t = self.cfg.train
        self.model.train()
        x, y = self.pool_batch(rows)
        codes = self.pool_codes(rows)
        # Mean over the global batch: each rank's share, so DDP's gradient average is exact.
        scale = dist.world_size() / t.batch_size
        losses = optimize_step(self.ddp, self.opt, self.task, self.distance, x, y, codes, loss_scale=scale,
                               amp=t.amp, pixel_weight=t.pixel_weight)
        per_level = dist.all_mean(losses.mean(0))  # the global batch's loss, on every rank
        return {"loss": float(per_level.sum()), **{f"level{l + 1}": float(v) for l, v in enumerate(per_level)}}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> list[dict[str, float]]:
        t = self.cfg.train
        main = dist.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        writer = self._writer() if main else None
        bar = _progress(total=t.steps, initial=self.step, disable=self.quiet or not main, desc="train")
        stop = _StopFlag()
        try:
            with stop:
                while self.step < t.steps and not stop.requested:
                    r = self.step // t.steps_per_round
                    if self.pool is None or self.pool["round"] != r:
                        self.round = r
                        t0 = time.time()
                        self.pool = self.search_pool()
                        if writer:
                            writer.add_scalar("search/distance", float(self.pool["dists"].mean()), self.step)
                            writer.add_scalar("search/seconds", time.time() - t0, self.step)
                    stats = self.train_step(self.batch_rows(self.step))
                    self.step += 1
                    self.history.append({"step": self.step, **stats})
                    bar.update(1)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", search=f"{float(self.pool['dists'].mean()):.3f}")
                        if writer:
                            for k, v in stats.items():
                                writer.add_scalar(f"train/{k}", v, self.step)
                    if main and t.sample_every and self.step % t.sample_every == 0:
                        self.write_grid(writer)
                    if self.step % t.checkpoint_every == 0:
                        self.save()
            dist.assert_in_sync(self.model)
        finally:
            bar.close()
            self.save()  # at exit, on Ctrl-C and on errors: never lose finished steps
            if main:
                self.write_grid(writer)
                self._write_log()
                if writer:
                    writer.close()
        return self.history

    # -- outputs ----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                "round": self.round, "pool": self.pool, "model_config": self.model_cfg.to_dict(),
                "task_config": self.task.config(), "config": dump_config(self.cfg),
                "torch_rng": torch.get_rng_state(), "history": self.history, "format": "chimle-train-1"}

    def save(self) -> None:
        if dist.is_main() and self.step > 0:
            save_state(self.checkpoint_path, self.state())
        dist.barrier()

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at '{self.checkpoint_path}'")
        s = load_state(self.checkpoint_path)
        if s["model_config"] != self.model_cfg.to_dict():
            raise ValueError(f"--resume: '{self.checkpoint_path}' was trained with another model configuration")
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.step, self.round, self.pool, self.history = s["step"], s["round"], s["pool"], s["history"]
        torch.set_rng_state(s["torch_rng"])

    def _writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra: pip install chimle[tensorboard]
            warnings.warn("tensorboard is not installed; logging to log.csv only", stacklevel=2)
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _write_log(self) -> None:
        if not self.history:
            return
        keys = list(self.history[-1])
        with open(self.out / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        from .sample import plot_curve

        plot_curve([h["step"] for h in self.history], {k: [h.get(k, math.nan) for h in self.history]
                                                       for k in keys if k != "step"}, self.out / "loss.png")

    @torch.no_grad()
    def write_grid(self, writer=None) -> Path | None:
        """Sample grid of held-out crops (or the first pool entries): input | samples | target."""
        from .sample import generate, save_grid

        t = self.cfg.train
        src = self.val if self.val is not None else None
        if src is not None:
            items = [src[i] for i in range(min(t.grid_inputs, len(src)))]
        else:
            items = [self.pool_item(self.round, k) for k in range(min(t.grid_inputs, t.pool_size))]
        x = torch.stack([it["input"] for it in items]).to(self.device)
        y = torch.stack([it["target"] for it in items])
        samples = generate(self.model, x, t.grid_samples, seeded(t.seed, 44), task=self.task)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        grid = save_grid(path, x.cpu(), samples.cpu(), y, task=self.task)
        if writer is not None:
            writer.add_image("samples", grid, self.step)
        return path


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag so the loop ends cleanly and writes its checkpoint."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def _progress(**kw):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kw)


def train(cfg: Config, resume: bool = False, quiet: bool = False) -> Trainer:
    """Train a run to completion; returns the trainer (model, history, output folder)."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    trainer.run()
    return trainer
