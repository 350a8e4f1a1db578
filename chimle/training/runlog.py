"""What a training run writes as it goes, besides its checkpoints: log.csv (one row per step),
TensorBoard scalars in tb/ (optional: pip install chimle[tensorboard]), the progress bar, loss.png at
the end, and one-line messages on stderr. Rank 0 writes; the other ranks' `RunLog` writes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
import warnings
from pathlib import Path

from ..data.imageio import atomic_write, read_csv_columns
from ..inference.figures import plot_curve
from . import dist

__all__ = ["RunLog", "CsvLog", "say", "progress"]


class RunLog:
    """The log of one run from `step` on: log.csv, TensorBoard (`writer`, None without it), the bar."""

    def __init__(self, out: Path, step: int, total: int, quiet: bool):
        main = dist.is_main()
        self.out = out
        self.writer = _writer(out) if main else None
        self.csv = CsvLog(out / "log.csv", step) if main else None
        self.bar = progress(total=total, initial=step, disable=quiet or not main, desc="train")

    def step(self, step: int, losses: dict[str, float]) -> None:
        """A step is done: the bar moves, log.csv gets its row."""
        self.bar.update(1)
        if self.csv:
            self.csv.write({"step": step, **losses})

    def searched(self, step: int, distance: float, seconds: float) -> None:
        """A round's search is done: its mean distance and its time."""
        if self.writer:
            self.writer.add_scalar("search/distance", distance, step)
            self.writer.add_scalar("search/seconds", seconds, step)

    def report(self, step: int, losses: dict[str, float], search_distance: float) -> None:
        """The step's losses on the bar and in TensorBoard (every `train.log_every` steps)."""
        self.bar.set_postfix(loss=f"{losses['loss']:.4f}", search=f"{search_distance:.3f}")
        if self.writer:
            for k, v in losses.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def flush(self) -> None:
        if self.csv:
            self.csv.flush()

    def restart_csv(self, step: int) -> None:
        """After a rollback to `step`: log.csv without the rows that will be redone."""
        if self.csv:
            self.csv.close()
            self.csv = CsvLog(self.out / "log.csv", step)

    def plot(self) -> None:
        """loss.png from log.csv."""
        cols = read_csv_columns(self.out / "log.csv")
        if cols.get("step"):
            plot_curve(cols.pop("step"), cols, self.out / "loss.png")


def _writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional extra: pip install chimle[tensorboard]
        warnings.warn("tensorboard is not installed; logging to log.csv only", stacklevel=2)
        return None
    return SummaryWriter(str(out / "tb"))


class CsvLog:
    """log.csv, one row per step, appended as training goes (nothing of it is kept in memory). On
    resume, rows past the checkpoint's step (steps that will be redone) are dropped first."""

    def __init__(self, path: Path, step: int):
        self.path = path
        self.header = False
        if step > 0 and path.exists():
            with open(path, newline="") as f:
                raw = f.read()
            rows = list(csv.reader(io.StringIO(raw)))
            kept = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
            # a last row cut short by a kill has no line end: rewritten, or the next row would be glued to it
            if len(kept) < len(rows) or not raw.endswith("\n"):
                # one atomic replace, not a truncate and a rewrite: a crash before the first flush would
                # otherwise leave the log empty, losing the rows of every earlier session
                text = io.StringIO()
                csv.writer(text).writerows(kept)
                with self._named():
                    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
            self.header = bool(kept)
        with self._named():
            self.f = open(path, "a" if step > 0 else "w", newline="")
        self.w = csv.writer(self.f)

    def write(self, row: dict[str, float]) -> None:
        with self._named():
            if not self.header:
                self.w.writerow(list(row))
                self.header = True
            self.w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])

    def flush(self) -> None:
        if not self.f.closed:
            with self._named():
                self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            with self._named():
                self.f.close()

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except OSError as e:  # a full disk: say which file
            raise OSError(f"cannot write '{self.path}': {e.strerror or e}") from e


def say(msg: str) -> None:
    """A line on stderr that the progress bar does not overwrite (rank 0 only)."""
    if dist.is_main():
        from tqdm.auto import tqdm

        tqdm.write(f"chimle train: {msg}", file=sys.stderr)


def progress(**kw):
    """A tqdm progress bar."""
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kw)
