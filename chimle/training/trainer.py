"""Training: IMLE rounds of "search codes for a pool, then train on those codes".

The authors' schedule (docs/design.md): each round picks a pool of images (random crops), searches one
latent code per image (CHIMLE's hierarchical search, or cIMLE's flat one), then trains
`steps_per_round` steps on (input, code, target) triples from that pool. The loss is the unweighted
sum over levels of LPIPS between each level's output and the target downsampled to that level
(intermediate supervision), plus an optional L1. Adam; the mapping networks at lr x 0.01.

    cfg = load_config(base={"data.task": "sr", "data.scale": 8, "data.data": "photos/"})  # training.config
    Trainer(cfg).run()                 # writes runs/NAME/{config.yaml, log.csv, checkpoints/last.pt, samples/, tb/}
    Trainer(cfg, resume=True).run()    # continues from checkpoints/last.pt, same trajectory

The loop is `Trainer._run`, one screen long. Resume reproduces an uninterrupted run exactly: every
random choice (pool crops, search candidates, batch order) comes from a generator seeded by (seed,
round or step), not from hidden global state.

What can go wrong is `chimle.training.faults` (README "When things go wrong"): a non-finite loss or
weights stop the run with one line naming the step, the loss, the learning rate and the last good
checkpoint (or skip the step, or roll back: `train.on_nonfinite`), and no non-finite state is ever
written; a failed checkpoint write keeps the previous files and stops with the path and the error;
`last.pt` and `previous.pt` are kept and `--resume` falls back to the second when the first is damaged;
one run at a time writes a folder (`train.lock`); a rank that dies or hangs stops the others within
`train.dist_timeout` seconds with a message; a group that torchrun restarts (`--max-restarts`) goes on
from its last checkpoint by itself (docs/distributed.md). What a run logs is `chimle.training.runlog`.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .. import latent, search
from ..data import layouts
from ..data.dataset import ImageDataset
from ..data.imageio import PHOTOS, WALLPAPERS, builtin_photo_dir, photo_corpus_dir, wallpaper_photo_dir
from ..data.tasks import Task, make_task
from ..distances import make_distance
from ..inference.figures import save_grid
from ..inference.sample import generate
from ..inference.weights import CheckpointError, load_state, load_with_task
from ..model import TowerModel
from ..rng import Stream, seeded
from . import dist
from .checkpoint import FORMAT, nonfinite, previous_path, trajectory_changes
from .config import Config, ConfigError, dump_config, resolve_model
from .faults import (
    CheckpointFormatError,
    CheckpointWriteError,
    ConfigChanged,
    Faults,
    RankLost,
    RolledBack,
    RunFolderBusy,
    SearchStopped,
    StopFlag,
    TrainingDiverged,
    locked,
)
from .pool import Pool
from .runlog import RunLog, progress, say
from .step import optimize_step, param_groups

__all__ = [
    "Trainer",
    "train",
    "train_or_reuse",
    "TrainingDiverged",
    "CheckpointWriteError",
    "RunFolderBusy",
    "RankLost",
    "ConfigChanged",
]


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
        t = cfg.train
        self.device = dist.init(t.device, timeout=t.dist_timeout)
        self.out = cfg.out_dir
        self.task = task if task is not None else make_task(cfg.data.task, **self._task_kw())
        self.model_cfg = resolve_model(cfg)
        self.dataset = dataset if dataset is not None else self._dataset(cfg.data.data, train=True)
        self.val = self._dataset(cfg.data.val_data, train=False) if cfg.data.val_data else None
        if cfg.data.rebalance or t.loss_rebalance:
            self.rarity, self.layout_stats = self._rarity()
        torch.manual_seed(t.seed)  # the model's initial weights
        self.model = TowerModel(self.model_cfg).to(self.device)
        self.distance = make_distance(cfg.search.distance).to(self.device)
        self.opt = torch.optim.Adam(param_groups(self.model, t.lr, t.mapping_lr_mult), betas=(t.beta1, t.beta2))
        self.faults = Faults(self)  # non-finite steps (its optimizer hook drops their updates), exit handling
        self.ddp = dist.wrap(self.model)
        if self.device.type == "cuda":  # fixed shapes every step: let cuDNN pick the fastest convs once
            torch.backends.cudnn.benchmark = True
        # No torch.compile of the training step (docs/measurements.md: no gain on a CPU); `chimle bench
        # speed --compile` measures it on other hardware.
        self.step, self.round = 0, 0
        self.pool: Pool | None = None
        self.last: dict[str, float] = {}  # the latest step's losses; the whole history is in log.csv
        self.checkpoint_file: Path | None = None  # the last good checkpoint (written or resumed from)
        self.checkpoint_step: int | None = None
        self.last_damaged = False  # resumed from previous.pt because last.pt did not load
        self._stop: StopFlag | None = None  # set while `run` listens for SIGINT/SIGTERM
        self.log: RunLog | None = None  # while `run` runs
        # torchrun --max-restarts reruns the same command after a failure, without --resume: a restarted
        # group goes on from its last checkpoint instead of overwriting it from step 0. The ranks agree,
        # as an agent that restarts its workers for another node's failure leaves its count at 0.
        if not resume and "TORCHELASTIC_RESTART_COUNT" in os.environ:
            saved = self.checkpoint_path.exists() or previous_path(self.checkpoint_path).exists()
            resume = dist.any_rank(int(os.environ["TORCHELASTIC_RESTART_COUNT"]) > 0 and saved)
        if resume:
            self._resume()
        elif t.init_from:  # not on resume: the run's weights are its checkpoint's, the source may be gone
            self._init_weights(t.init_from)

    # -- setup ----------------------------------------------------------------------------------
    def _init_weights(self, source: str) -> None:
        """Fine-tuning (`train.init_from`): copy a trained tower's weights into this run's fresh one. Both
        must be the same tower for the same task, or the weights would be meaningless (or not fit at all)."""
        model, task_cfg = load_with_task(source)
        where = f"train.init_from '{source}'"
        if task_cfg.get("name") != self.task.name:
            raise ConfigError(f"{where} is a {task_cfg.get('name')} model; this config trains {self.task.name}")
        # every field but input_size, the default input side for sampling, which a fine-tune's crop may change
        names = [f.name for f in dataclasses.fields(self.model_cfg) if f.name != "input_size"]
        there, here = ({n: getattr(c, n) for n in names} for c in (model.cfg, self.model_cfg))
        diffs = [f"{n}: {there[n]!r} there, {here[n]!r} here" for n in names if there[n] != here[n]]
        if diffs:
            raise ConfigError(
                f"{where} is another tower than this config builds ({'; '.join(diffs)}): set the same preset "
                "and model options"
            )
        self.model.load_state_dict(model.state_dict())

    def _task_kw(self) -> dict[str, Any]:
        d = self.cfg.data
        if d.task == "layout":
            if not d.num_classes:  # counted once; config.yaml and the checkpoint record the number
                d.num_classes = layouts.count_classes(d.data, d.ignore_index, d.palette)
            return {"num_classes": d.num_classes, "ignore_index": d.ignore_index, "palette": d.palette}
        return {"sr": {"scale": d.scale}, "jpeg": {"quality": d.quality}}.get(d.task, {})

    def _dataset(self, root: str, train: bool) -> ImageDataset:
        d = self.cfg.data
        if not root:
            raise ValueError("data.data is empty: pass --data DIR (a folder of photos), or 'builtin'")
        if hasattr(self.task, "dataset"):  # tasks that bring their own data (digits: "mnist" or IDX files)
            return self.task.dataset(root, train, d.crop, self.model_cfg.levels)
        if root == "builtin":
            root = str(builtin_photo_dir())
        elif root == WALLPAPERS:
            root = str(wallpaper_photo_dir())
        elif root == PHOTOS:
            root = str(photo_corpus_dir())
        kw = dict(input_root=root, root=d.target) if self.task.paired else dict(root=root)
        if self.task.paired and not d.target:
            raise ValueError(f"the {d.task} task needs --target DIR (the folder of target images)")
        with warnings.catch_warnings():
            if not dist.is_main():
                warnings.simplefilter("ignore")
            return ImageDataset(
                task=self.task,
                crop=d.crop,
                levels=self.model_cfg.levels,
                train=train,
                bad_files="unchecked" if not d.verify else "skip" if d.skip_bad else "raise",
                seed=self.cfg.train.seed,
                prescale=d.prescale or None,
                cache=d.cache,
                **kw,
            )

    # -- the pool ---------------------------------------------------------------------------------
    def pool_crops(self, round_: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The (inputs, targets, loss masks or None) of a round's pool, on the CPU: entry k is a random
        image and a random crop of it, both fixed by (seed, round, k), so a resumed run cuts the same crops."""
        n, size = len(self.dataset), self.cfg.train.pool_size
        g = seeded(self.cfg.train.seed, Stream.POOL, round_)
        if self.cfg.data.rebalance:  # cIMLE Sect. 4.2.3: images drawn in proportion to their rarity
            order = layouts.sample_pool(self.rarity, self.layout_stats, size, min(5, len(self.layout_stats)), g)
        else:
            order = torch.randperm(n, generator=g)[torch.arange(size) % n]
        items = []
        for k in range(size):
            self.dataset.set_epoch(round_ * (1 + size // n) + k // n)  # a new crop each time an image recurs
            items.append(self.dataset[int(order[k])])
        masks = None
        if self.cfg.train.loss_rebalance:  # per-pixel loss weights of each crop's categories (Sect. 4.2.3)
            masks = torch.cat(
                [layouts.loss_weight_map(self.task.labels(it["input"]), self.rarity[it["index"]]) for it in items]
            )
        return torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items]), masks

    def _rarity(self) -> tuple[torch.Tensor, dict]:
        """R (images, classes) and the per-category colour statistics of the training layouts
        (`chimle.data.layouts`), from the whole label maps and photos."""
        segs, photos = [], []
        for i in range(len(self.dataset)):
            y, x = self.dataset.whole(i)
            segs.append(self.task.labels(x))
            photos.append(y)
        stats = layouts.category_mean_colours(segs, photos, ignore_index=-1)
        return layouts.rarity_weights(stats, len(photos), self.task.num_classes), stats

    def _chunks(self) -> list[range]:
        size, b = self.cfg.train.pool_size, self.cfg.search.batch
        return [range(i, min(i + b, size)) for i in range(0, size, b)]

    def _search_generator(self, chunk: int) -> torch.Generator:
        # seeded by the chunk's index, so the result does not depend on the number of ranks
        return seeded(self.cfg.train.seed, Stream.SEARCH, self.round, chunk, device=self.device)

    @property
    def _zero_code(self) -> bool:
        return self.round < self.cfg.search.zero_code_rounds

    def _method(self) -> search.Method:
        s = self.cfg.search
        return search.choose(s.method, s.ablation, s.samples_per_level, s.num_samples, zero=self._zero_code)

    def _search(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> search.Selection:
        """The codes, distances and winners of one chunk of the pool."""
        s = self.cfg.search
        options = search.SearchOptions(memory_budget=s.memory_budget or None, compile=s.compile)
        g = self._search_generator(chunk)
        return search.run(self._method(), self.model, x, y, self.distance, g, to_rgb=self.task.rgb, options=options)

    def _replay(self, picks: torch.Tensor) -> latent.Codes:
        """The pool's codes from the winners its searches stored (bit-equal to the search's)."""
        layout, method = self.model.latent_layout(self.input_hw), self._method()
        parts = [
            search.replay(layout, method, picks[rows.start : rows.stop], self._search_generator(ci))
            for ci, rows in enumerate(self._chunks())
        ]
        return latent.to(latent.cat(parts), self.device)

    @torch.no_grad()
    def search_pool(self) -> Pool:
        """Cut this round's crops and search one code per entry. Each rank takes a shard of the chunks;
        the codes are all-gathered, since the next steps draw their batches from the whole pool."""
        inputs, targets, masks = self.pool_crops(self.round)
        chunks = self._chunks()
        mine = dist.shard(len(chunks))
        codes, dists, picks = [], [], []
        bar = progress(
            total=len(mine),
            desc=f"search round {self.round}",
            leave=False,
            disable=self.quiet or not dist.is_main() or len(mine) < 2,
        )
        for ci in mine:
            # A round's search can take minutes, longer than a scheduler's grace period after SIGTERM:
            # a single process stops between chunks (the round is searched again on resume, with the
            # same seeds). DDP ranks finish the round: they could not agree on a chunk without a collective.
            if self._stop is not None and self._stop.requested and dist.world_size() == 1:
                bar.close()
                raise SearchStopped
            bar.update(1)
            rows = chunks[ci]
            chosen = self._search(
                inputs[rows.start : rows.stop].to(self.device), targets[rows.start : rows.stop].to(self.device), ci
            )
            codes.append(chosen.codes)
            dists.append(chosen.dists)
            picks.append(chosen.picks.to(self.device))
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
            masks=masks,
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
        x, _, codes = self.pool.batch(rows, self.device)
        # The targets resized to every level and their LPIPS features, computed once per pool entry
        # and round (they do not change during a round), not once per step.
        targets = self.pool.loss_targets(rows, self.model.cfg.output_sizes(*x.shape[-2:]), self.distance, self.device)
        # Mean over the global batch: each rank's share, so DDP's gradient average is exact.
        scale = dist.world_size() / t.batch_size
        losses = optimize_step(
            self.ddp,
            self.opt,
            x,
            targets,
            codes,
            self.distance,
            to_rgb=self.task.rgb,
            loss_scale=scale,
            amp=None if t.amp else False,  # train.amp: bf16 on CUDA; a CPU runs float32 either way
            pixel_weight=t.pixel_weight,
        )
        per_level = dist.all_mean(losses.mean(0))  # the global batch's loss, on every rank
        return {"loss": float(per_level.sum()), **{f"level{l + 1}": float(v) for l, v in enumerate(per_level)}}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Train to `cfg.train.steps`; returns the last step's losses (every step's are in log.csv)."""
        with locked(self.out):  # one run at a time writes a folder
            return self._run()

    def _run(self) -> dict[str, float]:
        """The IMLE loop. Each round draws a pool of `train.pool_size` crops and searches one code per
        crop (CHIMLE's Algorithm 1, or cIMLE's flat selection: `search.choose`), then trains
        `train.steps_per_round` steps on batches of (input, code, target) triples of the pool; a
        checkpoint every `train.checkpoint_every` steps and at the end. A non-finite step is skipped,
        rolled back or stops the run (`faults.Faults`); SIGINT/SIGTERM end the loop at the next step (or
        the next chunk of a search) with a checkpoint."""
        t = self.cfg.train
        self._start_outputs()
        self.log = log = RunLog(self.out, self.step, t.steps, self.quiet)
        # SIGINT/SIGTERM only set a flag until the end, the exit handling included: torchrun's SIGTERM to
        # the survivors of a dead rank must not cut short their message and their last checkpoint.
        with StopFlag() as stop, self.faults.exiting(log, stop):
            # every rank stops at the same step, or the others would wait inside a collective
            while self.step < t.steps and not dist.any_rank(stop.requested):
                r = self.step // t.steps_per_round
                if self.pool is None or self.pool.round != r:  # a new round: draw the pool, search its codes
                    try:
                        self.pool = self._search_round(r)
                    except SearchStopped:
                        break  # saved at exit, without this round's pool
                    except RolledBack:
                        continue
                # a step on a batch of the pool
                self.faults.mid_step, self.faults.dropped, problem = True, False, None
                rows = self.batch_rows(self.step)
                try:
                    self.last = self.train_step(rows)
                except ValueError:  # the distance refuses NaN images: before any update, so no harm done
                    problem = self.faults.diagnose(rows)
                    if problem is None:
                        raise
                    nan = float("nan")
                    self.last = {"loss": nan, **{f"level{l + 1}": nan for l in range(self.model_cfg.levels)}}
                self.step += 1
                self.faults.mid_step = False
                log.step(self.step, self.last)
                saving = self.step % t.checkpoint_every == 0
                if self.faults.after_step(rows, saving, problem):  # skipped or rolled back (or raised)
                    log.bar.n = self.step
                    continue
                if self.step % t.log_every == 0 or self.step == t.steps:
                    log.report(self.step, self.last, float(self.pool.dists.mean()))
                if dist.is_main() and t.sample_every and self.step % t.sample_every == 0:
                    self.write_grid(log.writer)
                if saving:
                    self.save()
            dist.assert_in_sync(self.model)
        if stop.requested and self.step < t.steps:
            # saved; now the caller stops too (a CLI must not report success, `chimle reproduce` must not
            # start its next tower)
            raise KeyboardInterrupt(f"stopped at step {self.step} of {t.steps}; {self.faults.checkpoint_note()}")
        return self.last

    def _start_outputs(self) -> None:
        """The run folder with config.yaml, and without the staging files of a writer killed mid-write."""
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
            for pattern in (".*.new*", ".*.link*"):
                for junk in self.checkpoint_path.parent.glob(pattern):
                    junk.unlink(missing_ok=True)

    def _search_round(self, r: int) -> Pool:
        """Round r's pool, searched; RolledBack when the model diverged and the run went back."""
        self.round, t0 = r, time.time()
        self.pool = None  # free the last round's pool (codes, cached targets) before the search
        try:
            pool = self.search_pool()
        except ValueError:  # the distance refuses NaN images
            problem = self.faults.diagnose()
            if problem is None:
                raise
            self.faults.handle(f"{problem[0]} (search of round {r})", skippable=False)
            raise RolledBack from None
        self.log.searched(self.step, float(pool.dists.mean()), time.time() - t0)
        return pool

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

    def save(self, sync: bool = True) -> None:
        """Write checkpoints/last.pt (the one it replaces becomes previous.pt). Never a non-finite state;
        a write that fails leaves both files as they were and raises CheckpointWriteError naming the
        path and the error (`Faults.write_checkpoint`). `sync`: all ranks learn the outcome (False after
        an error: peers may be gone)."""
        self.faults.write_checkpoint(sync)

    def _resume(self) -> None:
        """Load checkpoints/last.pt, or previous.pt with a warning when last.pt is damaged or missing."""
        path, prev = self.checkpoint_path, previous_path(self.checkpoint_path)
        if not path.exists() and not prev.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at '{path}'")
        try:
            self.load(path)
        except CheckpointError as e:
            if isinstance(e, CheckpointFormatError) or not prev.exists():
                raise
            if dist.is_main():
                warnings.warn(f"{e}; resuming from the previous checkpoint '{prev}' instead", stacklevel=2)
            self.load(prev)
            self.last_damaged = True

    def load(self, path: Path) -> None:
        """Restore the whole training state from a checkpoint file (resume, rollback)."""
        if not path.exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        s = load_state(path)
        if s.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"--resume: '{path}' has format {s.get('format')!r}, written by another chimle version; this one "
                f"resumes {FORMAT!r} (start a new run, or resume with the chimle version that wrote it)"
            )
        bad = nonfinite(s)
        if bad:
            raise CheckpointError(f"checkpoint '{path}' holds non-finite values ({bad[0]}): a diverged state")
        changes = trajectory_changes(s["config"], dump_config(self.cfg))
        if changes:
            raise ConfigChanged(
                f"--resume: '{path}' was trained with another config ({'; '.join(changes)});"
                f" only train.steps and output settings may change on resume",
                changes,
            )
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.step, self.round, self.last = s["step"], s["round"], s["last"]
        self.checkpoint_file, self.checkpoint_step = path, s["step"]
        torch.set_rng_state(s["torch_rng"])
        if s["pool"] is not None:
            inputs, targets, masks = self.pool_crops(self.round)
            recipe = s["pool"]
            self.pool = Pool(
                self.round,
                inputs,
                targets,
                self._replay(recipe["picks"].long()),
                recipe["dists"],
                recipe["picks"].long(),
                masks=masks,
            )

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
        if not bool(samples.isfinite().all()):  # grids never show NaNs; the loss check says why
            say(f"step {self.step}: the samples hold NaN/inf values; '{path}' not written")
            return None
        try:
            grid = save_grid(path, x, samples.cpu(), y, task=self.task)
        except OSError as e:
            raise OSError(f"cannot write '{path}': {e.strerror or e}") from e
        if writer is not None:
            writer.add_image("samples", grid, self.step)
        return path


def train(cfg: Config, resume: bool = False, quiet: bool = False) -> Trainer:
    """Train a run to completion; returns the trainer (model, last losses, output folder)."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    trainer.run()
    return trainer


def train_or_reuse(cfg: Config, quiet: bool = False) -> Trainer:
    """The run in cfg's folder: resumed from its checkpoint if it has one (and left untouched when already
    finished, so nothing evaluated from it goes stale), else trained from the start. For commands that
    train many runs (reports, ablations) and are rerun after an interruption."""
    try:
        trainer = Trainer(cfg, resume=(cfg.out_dir / "checkpoints" / "last.pt").exists(), quiet=quiet)
    except ConfigChanged as e:  # the caller never said --resume: name the folder, not the flag
        raise ConfigChanged(
            f"'{cfg.out_dir}' holds a run trained with other settings ({'; '.join(e.changes)}): "
            "rerun with the settings it was trained with, or give another output folder",
            e.changes,
        ) from None
    if trainer.step < cfg.train.steps:
        trainer.run()
    return trainer
