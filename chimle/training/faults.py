"""What can go wrong in a training run, and what the trainer does about it (docs/troubleshooting.md).

* A non-finite step (`Faults`): a loss, gradients, weights or outputs that hold NaN/inf stop the run with
  one line naming the step, the loss, the learning rate and the last good checkpoint, or, as
  `train.on_nonfinite` says, skip the step (its update is never applied: `Faults.drop_nonfinite_update`)
  or roll back to the last good checkpoint at half the learning rate. No non-finite state is written.
* A checkpoint write that fails (`CheckpointWriteError`) keeps the previous files and names the path
  and the error; at exit only what is safe is written (`Faults.exiting`).
* One run at a time writes a folder (`locked`, `RunLock`: OUT/train.lock).
* SIGINT/SIGTERM end the loop cleanly, the checkpoint written (`StopFlag`); during a round's search, a
  single process stops between chunks (`SearchStopped`).
* A rank that dies or hangs stops the others with a message (`RankLost`).
* Resuming with settings that change the trajectory is refused (`ConfigChanged`), and so is a
  checkpoint of another format (`CheckpointFormatError`).

The loop itself is `chimle.training.trainer.Trainer._run`; this module is what it calls when a step,
a search or a write goes wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..inference.weights import CheckpointError
from ..rng import Stream, seeded
from . import dist
from .checkpoint import nonfinite, previous_path, save_state
from .runlog import RunLog, say

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None

__all__ = [
    "TrainingDiverged",
    "CheckpointWriteError",
    "RunFolderBusy",
    "RankLost",
    "ConfigChanged",
    "CheckpointFormatError",
    "Faults",
    "StopFlag",
    "SearchStopped",
    "RolledBack",
    "RunLock",
    "locked",
    "MAX_SKIPS",
    "MAX_ROLLBACKS",
]

MAX_SKIPS = 10  # train.on_nonfinite=skip: this many non-finite steps in a row stop the run (it is not a blip)
MAX_ROLLBACKS = 4  # train.on_nonfinite=rollback: rollbacks to one checkpoint (lr / 16) before giving up


class TrainingDiverged(ValueError):
    """A non-finite loss or weights; the message names the step, the loss, the learning rate and the
    last good checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error, permission); the earlier ones are intact."""


class RunFolderBusy(OSError):
    """Another process is training into the same run folder."""


class RankLost(ConnectionError):
    """Another rank of a distributed run died, hung or became unreachable."""


class ConfigChanged(ValueError):
    """A run is resumed with settings that change its trajectory (`changes`: "key: old -> new")."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes


class CheckpointFormatError(CheckpointError):
    """A checkpoint written by a chimle whose format this one does not resume."""


class SearchStopped(Exception):
    """SIGINT/SIGTERM arrived during a round's search (see `Trainer.search_pool`)."""


class RolledBack(Exception):
    """A round's search met a diverged model, and the run rolled back to its last good checkpoint."""


class Faults:
    """The non-finite checks and `train.on_nonfinite` of one `Trainer` (whose model, optimizer, pool and
    last good checkpoint they read, and which a rollback reloads), and its exit handling."""

    def __init__(self, trainer: Any):  # a chimle.training.trainer.Trainer (not imported: no import cycle)
        self.tr = trainer
        self.mid_step = False  # inside a training step: the state may be half updated, so it is not saved
        self.dropped = False  # this step's update was not applied: its gradients were not finite
        self.diverged = False
        self.skips = 0  # non-finite steps skipped in a row (train.on_nonfinite=skip)
        self.rollbacks = 0  # rollbacks since the last checkpoint was written (train.on_nonfinite=rollback)
        trainer.opt.register_step_pre_hook(self.drop_nonfinite_update)

    # -- what is not finite -------------------------------------------------------------------------
    def after_step(self, rows: list[int], saving: bool, problem: tuple[str, bool] | None) -> bool:
        """Whether the step just taken was not finite (`problem`: what `diagnose` found when the distance
        refused its images): it has then been skipped or rolled back, or the run stops with
        TrainingDiverged. The loss and the gradients are checked every step, the weights when asked and
        before a checkpoint, and before a checkpoint also the outputs on the step's batch."""
        t, step = self.tr.cfg.train, self.tr.step
        weights = saving or bool(t.check_weights_every and step % t.check_weights_every == 0)
        problem = problem or self._nonfinite_problem(weights)
        last = saving or step == t.steps  # a checkpoint follows (here or at exit)
        if last and not problem and dist.any_rank(self.outputs_nonfinite(rows)):
            problem = "the updated weights give NaN/inf outputs", False  # not a good checkpoint
        if problem:
            self.handle(*problem)  # raises, or skips the step, or rolls back
            return True
        self.skips = 0
        return False

    def _nonfinite_problem(self, weights: bool) -> tuple[str, bool] | None:
        """What is not finite after a step, and whether skipping the step gets rid of it: the loss and the
        gradients (every step; their update was not applied), the weights (when asked; not skippable)."""
        loss = self.tr.last.get("loss", 0.0)
        if not math.isfinite(loss):
            return f"loss {loss}", True
        if self.dropped:
            return f"non-finite gradients (loss {loss:.4g})", True
        bad = self.weights_problem() if weights else None
        return None if bad is None else (bad, False)

    def weights_problem(self) -> str | None:
        params = list(dist.unwrap(self.tr.model).named_parameters())
        ok = torch.stack([p.detach().isfinite().all() for _, p in params])
        if bool(ok.all()):
            return None
        bad = [n for (n, _), good in zip(params, ok.tolist()) if not good]
        return f"non-finite weights in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")

    def drop_nonfinite_update(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        """Optimizer pre-step hook: a step whose gradients hold a NaN or an inf is not applied. Clearing
        the gradients makes Adam leave weights and moments as they were, so the model stays finite and a
        skipped step (train.on_nonfinite=skip) is really skipped; the loop reports it."""
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads and not _all_finite(grads):
            opt.zero_grad(set_to_none=True)
            self.dropped = True

    @torch.no_grad()
    def diagnose(self, rows: list[int] | None = None) -> tuple[str, bool] | None:
        """After an error from the distance: whether the model diverged (non-finite weights, or outputs
        that hold NaN/inf on this training batch, or on pool crops with random codes before the pool
        exists), as `_nonfinite_problem`; None: a real error."""
        weights = self.weights_problem()
        if weights is not None:
            return weights, False
        if self.outputs_nonfinite(rows):
            return "loss nan (the model's outputs hold NaN/inf)", True
        return None

    @torch.no_grad()
    def outputs_nonfinite(self, rows: list[int] | None = None) -> bool:
        """Whether the model's outputs hold NaN/inf on `rows` of the pool (or on pool crops with random
        codes before the pool exists). Finite weights can still give NaN (the update that made them
        was too large): a checkpoint is only written once its weights passed this on the latest batch."""
        tr = self.tr
        if rows is not None and tr.pool is not None:
            x, _, codes = tr.pool.batch(rows, tr.device)
        else:
            x = tr.pool_crops(tr.round)[0][: tr.cfg.search.batch].to(tr.device)
            g = seeded(tr.cfg.train.seed, Stream.GRID, device=tr.device)
            codes = tr.model.sample_codes(x.shape[0], g, input_hw=tr.input_hw)
        return not all(bool(o.isfinite().all()) for o in tr.model(x, codes))

    # -- what to do about it ------------------------------------------------------------------------
    def handle(self, problem: str, skippable: bool) -> None:
        """train.on_nonfinite: stop (raise), skip the step, or roll back to the last good checkpoint.
        Every rank sees the same all-reduced loss and identical weights, so all take the same branch."""
        tr = self.tr
        mode, why = tr.cfg.train.on_nonfinite, ""
        if mode == "skip":
            if skippable and self.skips < MAX_SKIPS:
                # its update was not applied (drop_nonfinite_update): the weights are the previous step's
                self.skips += 1
                say(f"step {tr.step}: {problem}; step skipped, its update not applied ({self.skips} in a row)")
                return
            why = f" ({MAX_SKIPS} steps in a row)" if skippable else " (this cannot be skipped)"
        elif mode == "rollback":
            if tr.checkpoint_file is not None and self.rollbacks < MAX_ROLLBACKS:
                self.rollback(problem)
                return
            why = f" (after {MAX_ROLLBACKS} rollbacks)" if tr.checkpoint_file is not None else ""
        self.diverged = True
        raise TrainingDiverged(
            f"training diverged at step {tr.step}{why}: {problem}, learning rate {self.lr():g}; "
            + self.checkpoint_note(diverged=True)
        )

    def rollback(self, problem: str) -> None:
        """Reload the last good checkpoint and go on at half the learning rate (a quarter after two
        rollbacks to the same checkpoint, ...), dropping the log rows that will be redone."""
        tr = self.tr
        lr, step = self.lr(), tr.step
        self.rollbacks += 1
        path = tr.checkpoint_file
        try:
            tr.load(path)
        except CheckpointError:
            prev = previous_path(tr.checkpoint_path)
            if path == prev or not prev.exists():
                raise
            path = prev
            tr.load(path)
        for g in tr.opt.param_groups:  # the checkpoint's rates, halved once per rollback to it
            g["lr"] *= 0.5**self.rollbacks
        if tr.log is not None:
            tr.log.restart_csv(tr.step)
        self.skips = 0
        say(
            f"step {step}: {problem}, learning rate {lr:g}; rolled back to '{path}' (step {tr.step}) and "
            f"going on at learning rate {self.lr():g}"
        )

    def lr(self) -> float:
        return float(self.tr.opt.param_groups[0]["lr"])

    def checkpoint_note(self, diverged: bool = False) -> str:
        """Where the run can go on from, and how."""
        tr = self.tr
        if tr.checkpoint_file is None:
            return "no checkpoint was written yet" + (": start over with a lower train.lr" if diverged else "")
        where = f"the last good checkpoint is '{tr.checkpoint_file}' (step {tr.checkpoint_step})"
        if diverged:
            return (
                f"{where}: go on from it with --resume --set train.on_nonfinite=rollback (or skip), or start "
                f"over with a lower train.lr"
            )
        return f"{where}: go on with --resume (any number of processes)"

    # -- checkpoints ---------------------------------------------------------------------------------
    def write_checkpoint(self, sync: bool = True) -> None:
        """`Trainer.save`: checkpoints/last.pt, the one it replaces kept as previous.pt; never a non-finite
        state (TrainingDiverged), and a write that fails leaves both files as they were
        (CheckpointWriteError naming the path and the error). `sync`: all ranks learn the outcome."""
        tr = self.tr
        error: Exception | None = None
        # (a step already in last.pt is not written again: that would turn previous.pt into a copy of it)
        fresh = tr.step > 0 and (tr.checkpoint_file, tr.checkpoint_step) != (tr.checkpoint_path, tr.step)
        if dist.is_main() and fresh:
            state = tr.state()
            bad = nonfinite(state)
            if bad:
                self.diverged = True
                error = TrainingDiverged(
                    f"not saving step {tr.step}: non-finite values in {bad[0]}, learning rate {self.lr():g}; "
                    + self.checkpoint_note(diverged=True)
                )
            else:
                try:
                    if tr.log is not None:
                        tr.log.flush()  # the log covers every step a checkpoint holds
                    # a damaged last.pt (resumed from previous.pt) is not kept as the fallback: previous.pt stays
                    save_state(tr.checkpoint_path, state, keep_previous=not tr.last_damaged)
                except OSError as e:
                    kept = (
                        f"'{tr.checkpoint_file}' (step {tr.checkpoint_step}) is intact"
                        if tr.checkpoint_file
                        else "no earlier checkpoint"
                    )
                    error = CheckpointWriteError(
                        f"cannot write checkpoint '{tr.checkpoint_path}': {e.strerror or e}; {kept}: "
                        f"free space or fix the folder, then --resume"
                    )
                    error.__cause__ = e
        if sync and dist.any_rank(error is not None):  # also the barrier after a write
            raise error or CheckpointWriteError(
                f"rank {dist.rank()}: rank 0 could not write '{tr.checkpoint_path}' (its message says why)"
            )
        if error is not None:
            raise error
        if fresh and (sync or dist.is_main()):  # every rank knows the last good checkpoint (rollback, messages)
            tr.checkpoint_file, tr.checkpoint_step, self.rollbacks = tr.checkpoint_path, tr.step, 0
            tr.last_damaged = False

    # -- the end of a run -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def exiting(self, log: RunLog, stop: StopFlag) -> Iterator[None]:
        """Around the loop: `stop` reaches the trainer (`Trainer._stop`); at the end, whatever ends it,
        `finish`; a lost peer becomes RankLost naming the newest checkpoint."""
        error: BaseException | None = None
        self.tr._stop = stop
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            self.tr._stop = None
            log.bar.close()
            self.finish(error, log)
            if error is not None and dist.lost_peer(error):  # after the exit save: it names the newest checkpoint
                raise RankLost(f"{dist.describe_lost(error)}; {self.checkpoint_note()}") from error

    def finish(self, error: BaseException | None, log: RunLog) -> None:
        """At exit, on Ctrl-C and on errors: save the finished steps, close the log, draw the last grid.
        After an error only what is safe: no checkpoint of a half-done step, of a diverged state or
        after a failed write; no collective (the other ranks may be gone); and nothing that fails
        here may hide the error that is on its way out."""
        tr = self.tr
        failed: list[Exception] = []  # without an error on its way out, the first failure here is raised

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                if error is None and not failed:
                    failed.append(e)
                else:
                    warnings.warn(f"could not write {what} at exit: {' '.join(str(e).split())[:200]}", stacklevel=3)

        if not (self.mid_step or self.diverged or isinstance(error, CheckpointWriteError)):
            attempt("the checkpoint", lambda: tr.save(sync=error is None))
        if log.csv is not None:
            attempt("log.csv", log.csv.close)
        tr.log = None
        if dist.is_main():
            if not self.diverged:
                attempt("the last sample grid", lambda: tr.write_grid(log.writer))
            attempt("loss.png", log.plot)
            if log.writer:
                attempt("TensorBoard", log.writer.close)
        if failed:
            raise failed[0]


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag so the loop ends cleanly and writes its checkpoint."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        # A second Ctrl-C stops at once; a second SIGTERM is usually the same request delivered twice (a
        # wrapper such as `timeout` or `srun` forwarding the signal the process also got) and must not cut
        # the checkpoint's write short: a scheduler that means it follows with SIGKILL.
        if self.requested and signum == signal.SIGINT:
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


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock (`RunLock`, rank 0) while training. Every rank learns whether rank 0 got
    the folder, so that none waits for a rank that stopped."""
    lock = RunLock(folder) if dist.is_main() else None
    busy = None
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderBusy as e:
            busy = e
    if dist.any_rank(busy is not None):
        raise busy or RunFolderBusy(f"rank {dist.rank()}: rank 0 could not lock the run folder '{folder}'")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class RunLock:
    """One writer per run folder: OUT/train.lock, locked with flock and holding the writer's PID, host and
    start time. The kernel drops the lock when its process dies however it dies (kill -9 included), so a
    file whose lock is free but which still names a process is a stale lock: it is taken over with a
    warning. The file is removed at release, while still locked; a taker that opened it just before
    checks that it locked the file that is at the path (else it tries again)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "train.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_fd(fd)
                os.close(fd)
                raise RunFolderBusy(
                    f"run folder '{self.path.parent}' is in use by {_describe_holder(holder)}: wait for it to end "
                    f"or stop it, or train into another --out (two runs in one folder would overwrite each "
                    f"other's checkpoints; lock file '{self.path}')"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder had just removed: try again
        else:
            raise RunFolderBusy(f"cannot lock the run folder '{self.path.parent}' (lock file '{self.path}')")
        stale = _read_fd(fd)
        if stale:
            warnings.warn(
                f"took over the lock of '{self.path.parent}' from {_describe_holder(stale)}, which is no longer "
                f"running (killed or crashed; its checkpoints are kept)",
                stacklevel=3,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still locked: nobody can take a file that is about to go
        os.close(self.fd)
        self.fd = None


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _describe_holder(text: str) -> str:
    """'process 1234 on host (since 2025-01-01 10:00:00)' from a lock file's line."""
    parts = text.split(" ", 2)
    if len(parts) < 2:
        return f"another process ({text or 'unknown'})"
    return f"process {parts[0]} on {parts[1]}" + (f" (since {parts[2]})" if len(parts) > 2 else "")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite. GradScaler's fused check (one kernel for all the tensors; it
    multiplies them by 1, which changes nothing) rather than a check per tensor, which costs more
    than the step's Adam update on a CPU (docs/measurements.md)."""
    found = torch.zeros(1, device=tensors[0].device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=found.device))
    except (RuntimeError, AttributeError):  # mixed devices or dtypes, or a torch without it
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())
    return not bool(found.item())
