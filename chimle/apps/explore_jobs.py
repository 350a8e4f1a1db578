"""The explorer's jobs (`chimle explore`): model work queued and run one job at a time, with progress,
place in the queue, an estimate of the time left, and cancelling.

The page asks for work (samples, variations, a walk between two codes, a guided search) and follows it:
`JobQueue.submit` answers at once with a `Job`, and `JobQueue.status` tells its state, how many jobs run
before it, the fraction done and the time left. The work reports its progress through `Job.progress`,
weighted by its cost (FLOPs), so that the rate, and with it the estimate, holds; a cancelled job stops at
its next call. A request the page should explain in one line raises `BadRequest` (status 400).

Explorer-only: `chimle.apps.explore_page` and `chimle.apps.explore_server` use it, no other app.
"""

from __future__ import annotations

import ctypes
import gc
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data.imageio import ImageError

__all__ = ["BadRequest", "Cancelled", "Progress", "Job", "JobQueue", "one_line", "free_memory"]


class BadRequest(ValueError):
    """A request the page should explain in one line (HTTP 400)."""


class Cancelled(Exception):
    """The user cancelled the job: raised from its progress callback, between two units of work."""


Progress = Callable[..., None]  # progress(done, total, note="", preview=None): raises Cancelled when cancelled


@dataclass
class Job:
    """One request's work in the queue: its state, progress (`done` of `total` units, weighted by their cost),
    what it returned or the one line of what went wrong."""

    id: str
    op: str
    what: str  # what the page says while it runs: "sampling", "searching"...
    fn: Callable[..., dict]  # fn(progress=...) -> the answer
    state: str = "queued"  # queued, running, done, error, cancelled
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    done: float = 0.0
    total: float = 0.0
    note: str = ""
    preview: list[dict] = field(default_factory=list)  # the best so far: [{png (data URL), label}]
    result: dict | None = None
    message: str = ""
    status: int = 200
    cancel: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - (self.started or self.created)

    def progress(
        self, done: float | None, total: float | None, note: str = "", preview: list[dict] | None = None
    ) -> None:
        """Called by the work between its units (None: the fraction stays); raises Cancelled once cancelled."""
        if self.cancel.is_set():
            raise Cancelled
        if done is not None and total is not None:
            self.done, self.total = float(done), float(total)
        if note:
            self.note = note
        if preview is not None:
            self.preview = preview


class JobQueue:
    """Runs the jobs one after another in one worker thread (the model runs one job at a time; torch's threads
    do the parallel work), first come first served. A job's status tells its place in the queue, its progress
    and an estimate of the time left; a queued job cancelled leaves the queue, a running one stops at its next
    unit of work. `after` runs after every job (the explorer frees its caches there)."""

    KEEP = 64  # finished jobs kept for their status

    def __init__(self, after: Callable[[], None] | None = None):
        self.after = after
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: list[Job] = []
        self.running: Job | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="chimle-explore-jobs", daemon=True)
        self._thread.start()

    def submit(self, op: str, what: str, fn: Callable[..., dict]) -> Job:
        job = Job(f"j{secrets.token_hex(6)}", op, what, fn)
        with self._cv:
            self.jobs[job.id] = job
            finished = [k for k, j in self.jobs.items() if j.ended.is_set()]
            for k in finished[: max(0, len(finished) - self.KEEP)]:
                del self.jobs[k]
            self.queue.append(job)
            self._cv.notify()
        return job

    def get(self, key: str) -> Job:
        job = self.jobs.get(key)
        if job is None:
            raise BadRequest(f"unknown job '{key}' (finished long ago?)")
        return job

    def cancel(self, key: str) -> Job:
        job = self.get(key)
        with self._cv:
            job.cancel.set()
            if job in self.queue:  # never started: out of the queue at once
                self.queue.remove(job)
                self._end(job, "cancelled", None, "cancelled before it started", 409)
        return job

    def ahead(self, job: Job) -> int:
        """How many jobs run before this one starts (the running one included); 0 once it runs."""
        with self._cv:
            if job in self.queue:
                return self.queue.index(job) + (self.running is not None)
        return 0

    def status(self, job: Job) -> dict:
        now = time.monotonic()
        frac = min(1.0, job.done / job.total) if job.total > 0 else 0.0
        out: dict[str, Any] = {
            "job": job.id,
            "op": job.op,
            "what": job.what,
            "state": job.state,
            "ahead": self.ahead(job) if job.state == "queued" else 0,
            "waited_s": round((job.started or now) - job.created, 2),
            "elapsed_s": round((job.finished or now) - job.started, 2) if job.started else 0.0,
            "fraction": round(frac, 4),
            "note": job.note,
            "preview": job.preview,
        }
        if job.state == "running" and 0 < frac:
            # time left at the rate so far: the units are weighted by their cost (FLOPs), so the rate is steady
            out["eta_s"] = round((now - job.started) * (1 - frac) / frac, 1)
        if job.state == "queued" and self.running is not None:
            r = self.running
            rf = min(1.0, r.done / r.total) if r.total > 0 else 0.0
            if rf > 0 and r.started:
                out["running_eta_s"] = round((now - r.started) * (1 - rf) / rf, 1)
        if job.ended.is_set():
            out["result"] = job.result
            out["message"] = job.message
            out["status"] = job.status
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every job and wait for the worker to stop (a thread still inside torch when the interpreter
        exits aborts it)."""
        with self._cv:
            self._closed = True
            for job in self.queue:
                job.cancel.set()
                self._end(job, "cancelled", None, "the server is stopping", 503)
            self.queue.clear()
            if self.running is not None:
                self.running.cancel.set()
            self._cv.notify()
        self._thread.join(timeout)

    def _end(self, job: Job, state: str, result: dict | None, message: str, status: int) -> None:
        job.state, job.result, job.message, job.status = state, result, message, status
        job.finished = time.monotonic()
        job.preview = []
        job.ended.set()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self.queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self.queue.pop(0)
                self.running, job.state, job.started = job, "running", time.monotonic()
            try:
                result = job.fn(progress=job.progress)
                self._end(job, "done", result, result.get("message", ""), 200)
            except Cancelled:
                self._end(job, "cancelled", None, f"{job.what} cancelled after {job.elapsed():.1f} s", 409)
            except (BadRequest, ImageError, ValueError, FileNotFoundError) as err:
                self._end(job, "error", None, one_line(err), 400)
            except Exception as err:  # noqa: BLE001 - the server stays up and the page says what happened
                self._end(job, "error", None, f"internal error: {type(err).__name__}: {one_line(err)}"[:300], 500)
            finally:
                with self._cv:
                    self.running = None
                if self.after is not None:
                    self.after()


def one_line(err: Exception) -> str:
    """An error's message on one line (the page shows one line)."""
    return " ".join(str(err).split()) or type(err).__name__


def free_memory() -> None:
    """Free what a job left: its garbage, and the memory glibc would keep (`chimle` asks it to keep freed
    memory for the training loop's sake, `chimle.memory.keep_freed_host_memory`), so that an idle server
    holds its model and the results it keeps, not the peak of its last search."""
    gc.collect()
    if sys.platform.startswith("linux"):  # glibc: hand the free memory of every malloc arena back
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
