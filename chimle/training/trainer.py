"""Training: IMLE rounds of "search codes for a pool, then train on those codes".

The authors' schedule (REFERENCE.md): each round picks a pool of images (random crops), searches one
latent code per image (CHIMLE's hierarchical search, or cIMLE's flat one), then trains
`steps_per_round` steps on (input, code, target) triples from that pool. The loss is the unweighted
sum over levels of LPIPS between each level's output and the target downsampled to that level
(intermediate supervision), plus an optional L1. Adam; the mapping networks at lr x 0.01.

    cfg = load_config(base={"data.task": "sr", "data.scale": 8, "data.data": "photos/"})  # training.config
    Trainer(cfg).run()                 # writes runs/NAME/{config.yaml, log.csv, checkpoints/last.pt, samples/, tb/}
    Trainer(cfg, resume=True).run()    # continues from checkpoints/last.pt, same trajectory

Resume reproduces an uninterrupted run exactly: every random choice (pool crops, search candidates,
batch order) comes from a generator seeded by (seed, round or step), not from hidden global state.
"""

from __future__ import annotations

import csv
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .. import latent, search
from ..data.dataset import ImageDataset
from ..data.imageio import builtin_photo_dir, read_csv_columns
from ..data.tasks import Task, make_task
from ..distances import make_distance
from ..inference.figures import plot_curve, save_grid
from ..inference.sample import generate
from ..inference.weights import CheckpointError, load_state
from ..model import TowerModel
from ..rng import Stream, seeded
from . import dist
from .checkpoint import FORMAT, save_state, trajectory_changes
from .config import Config, dump_config, resolve_model
from .pool import Pool
from .step import optimize_step, param_groups

__all__ = ["Trainer", "train"]


class Trainer:
    """Owns the model, optimizer, data and pool of one run; `run()` trains to `cfg.train.steps`.

    `dataset` and `task` replace the ones the config names (the MNIST illustration trains on
    in-memory digits through the same loop).
    """

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        quiet: bool = False,
        *,
        dataset: Dataset | None = None,
        task: Task | None = None,
    ):
        self.cfg, self.quiet = cfg, quiet
        self.device = dist.init(cfg.train.device)
        t = cfg.train
        self.out = cfg.out_dir
        self.task = task if task is not None else make_task(cfg.data.task, **self._task_kw())
        self.model_cfg = resolve_model(cfg)
        self.dataset = dataset if dataset is not None else self._dataset(cfg.data.data, train=True)
        self.val = self._dataset(cfg.data.val_data, train=False) if cfg.data.val_data else None
        torch.manual_seed(t.seed)  # the model's initial weights
        self.model = TowerModel(self.model_cfg).to(self.device)
        self.distance = make_distance(cfg.search.distance).to(self.device)
        self.opt = torch.optim.Adam(param_groups(self.model, t.lr, t.mapping_lr_mult), betas=(t.beta1, t.beta2))
        self.ddp = dist.wrap(self.model)
        if self.device.type == "cuda":  # fixed shapes every step: let cuDNN pick the fastest convs once
            torch.backends.cudnn.benchmark = True
        # No torch.compile of the training step: on a CPU it measured no gain (LPIPS's and the tower's
        # oneDNN convolutions dominate); `chimle bench speed --compile` measures it on other hardware.
        self.step, self.round = 0, 0
        self.pool: Pool | None = None
        self.last: dict[str, float] = {}  # the latest step's losses; the whole history is in log.csv
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
            return ImageDataset(
                task=self.task,
                crop=d.crop,
                levels=self.model_cfg.levels,
                train=train,
                skip_bad=d.skip_bad,
                seed=self.cfg.train.seed,
                prescale=d.prescale or None,
                cache=d.cache,
                verify=d.verify,
                **kw,
            )

    # -- the pool ---------------------------------------------------------------------------------
    def pool_crops(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) of a round's pool, on the CPU: entry k is a random image and a random
        crop of it, both fixed by (seed, round, k), so a resumed run cuts the same crops."""
        n, size = len(self.dataset), self.cfg.train.pool_size
        perm = torch.randperm(n, generator=seeded(self.cfg.train.seed, Stream.POOL, round_))
        items = []
        for k in range(size):
            self.dataset.set_epoch(round_ * (1 + size // n) + k // n)  # a new crop each time an image recurs
            items.append(self.dataset[int(perm[k % n])])
        return torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items])

    def _chunks(self) -> list[range]:
        size, b = self.cfg.train.pool_size, self.cfg.search.batch
        return [range(i, min(i + b, size)) for i in range(0, size, b)]

    def _search_generator(self, chunk: int) -> torch.Generator:
        # seeded by the chunk's index, so the result does not depend on the number of ranks
        return seeded(self.cfg.train.seed, Stream.SEARCH, self.round, chunk, device=self.device)

    @property
    def _zero_code(self) -> bool:
        return self.round < self.cfg.search.zero_code_rounds

    def _search(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[latent.Codes, torch.Tensor, torch.Tensor]:
        """Codes, distances and winners (N, L) of one chunk of the pool."""
        s, g, picks = self.cfg.search, self._search_generator(chunk), []
        kw = dict(to_rgb=self.task.rgb, memory_budget=s.memory_budget or None, compile=s.compile, picks=picks)
        if self._zero_code or s.method == "cimle" or s.ablation == "no_ic_pe_cd":
            m = s.num_samples if s.method == "cimle" else sum(s.samples_per_level)
            codes, d = search.flat(self.model, x, y, self.distance, m, g, zero=self._zero_code, **kw)
        else:
            iterative, partial = search.ABLATION_SWITCHES[s.ablation]
            codes, d = search.hierarchical(
                self.model, x, y, self.distance, s.samples_per_level, g, iterative=iterative, partial=partial, **kw
            )
        return codes, d, (torch.stack(picks, 1) if picks else torch.zeros(x.shape[0], 0, dtype=torch.long))

    def _replay(self, picks: torch.Tensor) -> latent.Codes:
        """The pool's codes from the winners its searches stored (bit-equal to the search's)."""
        s, layout = self.cfg.search, self.model.latent_layout(self.input_hw)
        if self._zero_code:
            return layout.zeros(picks.shape[0], self.device)
        parts = []
        for ci, rows in enumerate(self._chunks()):
            g, p = self._search_generator(ci), picks[rows.start : rows.stop]
            if s.method == "cimle" or s.ablation == "no_ic_pe_cd":
                m = s.num_samples if s.method == "cimle" else sum(s.samples_per_level)
                parts.append(search.replay(layout, [m], p, g, flat=True))
            else:
                iterative, partial = search.ABLATION_SWITCHES[s.ablation]
                parts.append(search.replay(layout, s.samples_per_level, p, g, iterative=iterative, partial=partial))
        return latent.to(latent.cat(parts), self.device)

    @torch.no_grad()
    def search_pool(self) -> Pool:
        """Cut this round's crops and search one code per entry. Each rank takes a shard of the chunks;
        the codes are all-gathered, since the next steps draw their batches from the whole pool."""
        inputs, targets = self.pool_crops(self.round)
        chunks = self._chunks()
        mine = dist.shard(len(chunks))
        codes, dists, picks = [], [], []
        bar = _progress(
            total=len(mine),
            desc=f"search round {self.round}",
            leave=False,
            disable=self.quiet or not dist.is_main() or len(mine) < 2,
        )
        for ci in mine:
            bar.update(1)
            rows = chunks[ci]
            c, d, p = self._search(
                inputs[rows.start : rows.stop].to(self.device), targets[rows.start : rows.stop].to(self.device), ci
            )
            codes.append(c)
            dists.append(d)
            picks.append(p.to(self.device))
        bar.close()
        layout = self.model.latent_layout(self.input_hw)
        flat = latent.flatten(latent.cat(codes)) if codes else torch.empty(0, sum(layout.dims()), device=self.device)
        gather = dist.all_gather_rows
        return Pool(
            self.round,
            inputs,
            targets,
            latent.unflatten(gather(flat), layout),
            gather(torch.cat(dists) if dists else torch.empty(0, device=self.device)).cpu(),
            gather(torch.cat(picks) if picks else torch.empty(0, 0, dtype=torch.long, device=self.device)).cpu(),
        )

    @property
    def input_hw(self) -> tuple[int, int]:
        c = self.cfg.data.crop // self.task.scale
        return c, c

    # -- one step ---------------------------------------------------------------------------------
    def batch_rows(self, step: int) -> list[int]:
        """This rank's slice of the global batch of `step` (the same global batch on every rank)."""
        t = self.cfg.train
        rows = torch.randint(0, t.pool_size, (t.batch_size,), generator=seeded(t.seed, Stream.BATCH, step)).tolist()
        share = dist.shard(t.batch_size)
        return rows[share.start : share.stop]

    def train_step(self, rows: list[int]) -> dict[str, float]:
        t = self.cfg.train
        self.model.train()
        x, y, codes = self.pool.batch(rows, self.device)
        # Mean over the global batch: each rank's share, so DDP's gradient average is exact.
        scale = dist.world_size() / t.batch_size
        losses = optimize_step(
            self.ddp,
            self.opt,
            x,
            y,
            codes,
            self.distance,
            to_rgb=self.task.rgb,
            loss_scale=scale,
            amp=t.amp,
            pixel_weight=t.pixel_weight,
        )
        per_level = dist.all_mean(losses.mean(0))  # the global batch's loss, on every rank
        return {"loss": float(per_level.sum()), **{f"level{l + 1}": float(v) for l, v in enumerate(per_level)}}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Train to `cfg.train.steps`; returns the last step's losses (every step's are in log.csv)."""
        t = self.cfg.train
        main = dist.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        writer = self._writer() if main else None
        log = _CsvLog(self.out / "log.csv", self.step) if main else None
        bar = _progress(total=t.steps, initial=self.step, disable=self.quiet or not main, desc="train")
        stop = _StopFlag()
        try:
            with stop:
                while self.step < t.steps and not stop.requested:
                    r = self.step // t.steps_per_round
                    if self.pool is None or self.pool.round != r:
                        self.round = r
                        t0 = time.time()
                        self.pool = self.search_pool()
                        if writer:
                            writer.add_scalar("search/distance", float(self.pool.dists.mean()), self.step)
                            writer.add_scalar("search/seconds", time.time() - t0, self.step)
                    self.last = self.train_step(self.batch_rows(self.step))
                    self.step += 1
                    bar.update(1)
                    if log:
                        log.write({"step": self.step, **self.last})
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        bar.set_postfix(loss=f"{self.last['loss']:.4f}", search=f"{float(self.pool.dists.mean()):.3f}")
                        if writer:
                            for k, v in self.last.items():
                                writer.add_scalar(f"train/{k}", v, self.step)
                    if main and t.sample_every and self.step % t.sample_every == 0:
                        self.write_grid(writer)
                    if self.step % t.checkpoint_every == 0:
                        self.save()
            dist.assert_in_sync(self.model)
        finally:
            bar.close()
            self.save()  # at exit, on Ctrl-C and on errors: never lose finished steps
            if log:
                log.close()
            if main:
                self.write_grid(writer)
                self._plot_log()
                if writer:
                    writer.close()
        return self.last

    # -- outputs ----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "round": self.round,
            "pool": None if self.pool is None else self.pool.recipe(),
            "model_config": self.model_cfg.to_dict(),
            "task_config": self.task.config(),
            "config": dump_config(self.cfg),
            "torch_rng": torch.get_rng_state(),
            "last": self.last,
            "format": FORMAT,
        }

    def save(self) -> None:
        if dist.is_main() and self.step > 0:
            save_state(self.checkpoint_path, self.state())
        dist.barrier()

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at '{self.checkpoint_path}'")
        s = load_state(self.checkpoint_path)
        if s.get("format") != FORMAT:
            raise CheckpointError(
                f"--resume: '{self.checkpoint_path}' has format {s.get('format')!r}, this chimle "
                f"resumes {FORMAT!r} (start a new run, or use the chimle version that wrote it)"
            )
        changes = trajectory_changes(s["config"], dump_config(self.cfg))
        if changes:
            raise ValueError(
                f"--resume: '{self.checkpoint_path}' was trained with another config ({'; '.join(changes)});"
                f" only train.steps and output settings may change on resume"
            )
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.step, self.round, self.last = s["step"], s["round"], s["last"]
        torch.set_rng_state(s["torch_rng"])
        if s["pool"] is not None:
            inputs, targets = self.pool_crops(self.round)
            recipe = s["pool"]
            self.pool = Pool(
                self.round,
                inputs,
                targets,
                self._replay(recipe["picks"].long()),
                recipe["dists"],
                recipe["picks"].long(),
            )

    def _writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra: pip install chimle[tensorboard]
            warnings.warn("tensorboard is not installed; logging to log.csv only", stacklevel=2)
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _plot_log(self) -> None:
        cols = read_csv_columns(self.out / "log.csv")
        if cols.get("step"):
            plot_curve(cols.pop("step"), cols, self.out / "loss.png")

    @torch.no_grad()
    def write_grid(self, writer=None) -> Path | None:
        """Sample grid of held-out crops (or the first pool entries): input | samples | target."""
        t = self.cfg.train
        if self.val is not None:
            items = [self.val[i] for i in range(min(t.grid_inputs, len(self.val)))]
            x, y = torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items])
        elif self.pool is not None:
            x, y = self.pool.inputs[: t.grid_inputs], self.pool.targets[: t.grid_inputs]
        else:
            return None
        g = seeded(t.seed, Stream.GRID, device=self.device)
        samples = generate(self.model, x.to(self.device), t.grid_samples, g, task=self.task)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        grid = save_grid(path, x, samples.cpu(), y, task=self.task)
        if writer is not None:
            writer.add_image("samples", grid, self.step)
        return path


class _CsvLog:
    """log.csv, one row per step, appended as training goes (nothing of it is kept in memory). On
    resume, rows past the checkpoint's step (steps that will be redone) are dropped first."""

    def __init__(self, path: Path, step: int):
        rows = []
        if step > 0 and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)]
            rows = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerows(rows)
        self.header = bool(rows)

    def write(self, row: dict[str, float]) -> None:
        if not self.header:
            self.w.writerow(list(row))
            self.header = True
        self.w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])

    def close(self) -> None:
        self.f.close()


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
    """Train a run to completion; returns the trainer (model, last losses, output folder)."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    trainer.run()
    return trainer
