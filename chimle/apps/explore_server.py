"""`chimle explore`: a web page to explore the modes of a model, with guided search toward a user's hint.

    chimle explore [WEIGHTS] [--host 127.0.0.1] [--port 7860]    # default: the shipped sr8-small
    chimle explore colorize-small                                # any name `chimle models` lists, or a file
    chimle explore --demo                                        # a random-init tiny 8x SR tower: a smoke run
    chimle explore --models runs/exported                        # that folder's weights in the page's model menu
    python -m chimle.apps.explore_server ...                     # the same

A small FastAPI app (the `app` extra: `pip install "chimle[app]"`) serving one static page
(chimle/apps/static/) and a JSON API over `chimle.inference.explore`. Why not Gradio: its page does
load nothing from outside (measured), but every Gradio 6 release requires Pillow < 13 and would
downgrade the project's Pillow, and it brings ~260 MB of dependencies and a 7-9 s import.

The page loads nothing but this server's own files: no font, script or analytics from outside. The
server keeps the inputs and results of recent requests (bounded, oldest dropped) in memory, each result
as its PNG with its latent code. Model work runs as jobs, one at a time in one worker thread, first come
first served (`JobQueue`): a job reports its progress (in FLOPs, so that the estimate of the time left
holds), its place in the queue while it waits, the best so far of a guided search, and stops at its next
unit of work when cancelled. After every job the server frees what it left (garbage, and the memory glibc
would keep), so that idle it holds its model and results, not the peak of its last search.

Bad input never stops the server: a non-image or corrupt upload, an image whose outputs would exceed
`--max-pixels`, an empty hint, an unknown id each answer 400 with a one-line `message` that the page
shows; grey, RGBA, palette and 16-bit images are converted (`chimle.data.imageio.load_image`).

API (JSON in and out; uploads are the raw file as the request body):
    GET  /api/info                                   model, task, levels, examples, limits, the model menu
    POST /api/model?name=N                           load another model of the menu (inputs and results dropped)
    POST /api/input?name=F&degrade=0|1   (file)      -> input id, its picture, the real image if degraded
    POST /api/example?name=N&degrade=0|1             a bundled photo (scikit-image's) as the input
    POST /api/sample      {input, num, seed}         -> items (each: id, png, npz, label, consistency)
    POST /api/vary        {item, level, num, seed}   -> items sharing z_1..z_{level-1} with `item`
    POST /api/interpolate {a, b, steps}              -> frames between two items' codes
    POST /api/reference?input=I&name=F   (file)      -> a reference image for the guided search
    GET  /api/reference/I.png                        that reference, at the outputs' size
    POST /api/guided      {input, hint | reference, k, samples, refine_steps, seed, compare}
    GET  /api/item/ID.png, /api/item/ID.npz          a result and its code (`chimle sample --code`), named
                                                     input_[degraded_]model_what-made-it_seed_ID
    POST /api/jobs/OP     (OP: sample, vary, interpolate, guided; the same body) -> a job's status, at once
    GET  /api/jobs/ID                                state, ahead (jobs before it), fraction, eta_s, preview,
                                                     and once ended: result (the operation's answer), message
    POST /api/jobs/ID/cancel                         a queued job leaves the queue, a running one stops
The operations above (sample, vary, interpolate, guided) answer when their job ended; the page uses the jobs.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time
# (`request: Request` inside build_app, where Request is a local name), and string annotations would hide them.
import argparse
import asyncio
import base64
import binascii
import ctypes
import gc
import io
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import latent
from ..data.imageio import BUILTIN_PHOTOS, ImageError, load_image
from ..data.tasks import Task, make_task
from ..inference import explore as ex
from ..inference.weights import load_with_task
from ..latent import Codes
from ..model import TowerConfig, TowerModel
from ..resample import resize
from ..rng import seeded
from ..threads import add_threads_argument, set_threads

__all__ = ["main", "build_app", "Explorer", "JobQueue", "demo_model", "model_menu", "DEFAULT_MODEL"]

DEFAULT_MODEL = "sr8-small"  # the shipped 8x super-resolution model (`chimle models`)

STATIC = ("explore.html", "explore.js", "explore.css")
# How many results (each one code + one image) and inputs the server keeps, the oldest dropped first: enough
# for a long session on the page, little enough to stay in memory.
MAX_ITEMS = 256
MAX_INPUTS = 16
MAX_SEED = 2**32 - 1
# An upload is decoded (then scaled to fit --max-pixels when degraded) only up to this size: a phone's 12-50 MP
# photo passes, a decompression bomb does not.
MAX_DECODE = 100_000_000


@dataclass
class Item:
    """One result shown on the page: its image (cropped) as the PNG the page shows, its code (batch 1) and what
    the page prints. The PNG, not the float image: a quarter of the memory or less, for every result kept."""

    id: str
    input: str
    png_bytes: bytes
    codes: Codes
    label: str
    info: dict[str, Any] = field(default_factory=dict)
    slug: str = "result"  # what a download's name says of it: sample3_seed0, vary-l2_seed1_4, guided1_seed0...

    def png(self) -> bytes:
        return self.png_bytes

    @property
    def image(self) -> Tensor:
        """(3, H, W) in [0, 1], as the page shows it (8-bit)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.png_bytes)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


@dataclass
class Entry:
    """An input: what the model sees, the name of its file, and a stored reference image if any."""

    id: str
    name: str
    inp: ex.Input
    shown: Tensor  # (3, h, w): the input as a picture
    reference: Tensor | None = None
    resize: tuple[int, int] | None = None  # the photo was scaled to this (h, w) to fit --max-pixels


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
                self._end(job, "error", None, _one_line(err), 400)
            except Exception as err:  # noqa: BLE001 - the server stays up and the page says what happened
                self._end(job, "error", None, f"internal error: {type(err).__name__}: {_one_line(err)}"[:300], 500)
            finally:
                with self._cv:
                    self.running = None
                if self.after is not None:
                    self.after()


class Explorer:
    """The state and the operations of the page, independent of the web framework (tested directly)."""

    def __init__(
        self,
        model: TowerModel,
        task: Task | None,
        *,
        name: str = "model",
        max_pixels: int = 1 << 20,
        max_upload: int = 50 << 20,
        workdir: str | Path | None = None,
        models: dict[str, str] | None = None,
    ):
        self.model, self.task, self.name = model.eval(), task, name
        # the model menu: name -> what `load_with_task` loads (the shipped models, the user's, --models DIR)
        self.models = dict(models or {})
        self.max_pixels, self.max_upload = max_pixels, max_upload
        # uploads are written here only while they are decoded (load_image reads files)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="chimle-explore-")
        self.workdir = Path(workdir or self._tmp.name)
        self.inputs: OrderedDict[str, Entry] = OrderedDict()
        self.items: OrderedDict[str, Item] = OrderedDict()
        self.jobs = JobQueue(after=self.after_job)  # one model job at a time, in order
        # The guided search judges its candidates in chunks within this many bytes of activations (the
        # library's default on a CPU is 2 GiB): a few candidates at a time, which keeps the server's memory
        # small and gives the page a progress report (and a chance to cancel) after every chunk.
        self.search_budget = 256 << 20
        self._lpips = None
        self._counter = 0

    def after_job(self) -> None:
        """After every job: free what it left (the activations' memory, which glibc would keep: `chimle` asks
        it to keep freed memory for the training loop's sake, `chimle.memory.keep_freed_host_memory`), so that
        an idle server holds its model and the results kept, not the peak of its last search."""
        gc.collect()
        _malloc_trim()

    def close(self) -> None:
        """Stop the job queue and remove the upload folder this explorer made (a given `workdir` stays)."""
        self.jobs.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- helpers --------------------------------------------------------------------------------
    def _id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}{secrets.token_hex(2)}"

    def _entry(self, key: str | None) -> Entry:
        if not key or key not in self.inputs:
            raise BadRequest("no input yet (or it expired): upload an image or pick an example first")
        return self.inputs[key]

    def _item(self, key: str | None) -> Item:
        if not key or key not in self.items:
            raise BadRequest(f"unknown result '{key}' (expired?): draw samples again")
        return self.items[key]

    def _add(
        self, entry: Entry, images: Tensor, codes: Codes, labels: list[str], infos: list[dict], slugs: list[str]
    ) -> list[Item]:
        out = []
        for i, (label, info, slug) in enumerate(zip(labels, infos, slugs)):
            png = ex.to_png_bytes(images[i])
            it = Item(self._id("r"), entry.id, png, latent.index(codes, [i]), label, info, slug)
            self.items[it.id] = it
            out.append(it)
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)
        return out

    def _infos(self, entry: Entry, images: Tensor) -> list[dict]:
        """Per-image figures: the super-resolution consistency (error of the sample brought back to the
        input's size), in 8-bit levels so that it reads like a pixel error."""
        if self.task is None or self.task.name != "sr":
            return [{} for _ in range(images.shape[0])]
        x = entry.inp.x[..., : entry.inp.hw[0], : entry.inp.hw[1]]
        err = ex.consistency(images, x, self.task)
        return [{"consistency": round(float(e) * 255, 3)} for e in err]

    def short_name(self) -> str:
        """The model's name in download names: its menu name, or its file's stem."""
        name = next((k for k, v in self.models.items() if v == self.name or k == self.name), None)
        return name or Path(self.name.split(":")[0]).stem

    def switch_model(self, name: str | None = None, progress: Progress | None = None) -> dict:
        """Load another model of the menu; the inputs and results of the previous one are dropped (their codes
        fit it alone)."""
        if not name or name not in self.models:
            raise BadRequest(f"no model '{name}' in the menu ({', '.join(self.models) or 'none'})")
        device = self.model.device
        model, task_cfg = load_with_task(self.models[name], device)
        self.model, self.task, self.name = model.to(device).eval(), (make_task(**task_cfg) if task_cfg else None), name
        self.inputs.clear()
        self.items.clear()
        self._lpips = None
        return {**self.info(), "message": f"model {name} loaded: {self.info()['task'] or 'no'} task"}

    def info(self) -> dict:
        cfg = self.model.cfg
        task = self.task
        return {
            "model": self.name,
            "model_short": self.short_name(),
            "models": list(self.models),
            "task": task.name if task is not None else None,
            "levels": cfg.levels,
            "scale": cfg.scale,
            "can_degrade": task is not None and not task.paired,
            "consistency": task is not None and task.name == "sr",
            "examples": sorted(BUILTIN_PHOTOS),
            "max_pixels": self.max_pixels,
            "defaults": {
                "num": 8,
                "level": min(2, cfg.levels),
                "steps": 16,
                "k": 4,
                "samples": 32,
                "refine": 0,
                "degrade": task is not None and not task.paired,
            },
        }

    # -- inputs ---------------------------------------------------------------------------------
    def add_input(self, name: str, degrade: bool, data: bytes, progress: Progress | None = None) -> dict:
        """An uploaded file -> a new input. Checks the size from the header before decoding anything."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or "upload").name)[:80] or "upload"
        if len(data) > self.max_upload:
            raise BadRequest(
                f"'{safe}' is {len(data) / 2**20:.1f} MB, over the upload limit of {self.max_upload / 2**20:.0f} MB"
            )
        if not data:
            raise BadRequest(f"'{safe}' is empty")
        path = self.workdir / f"{self._id('u')}_{safe}"
        path.write_bytes(data)
        try:
            return self._input_from(path, safe, degrade)
        except ImageError as err:  # name the uploaded file, not the server's temporary copy
            raise BadRequest(f"bad image '{safe}': {err.problem}") from None
        finally:
            path.unlink(missing_ok=True)

    def add_example(self, name: str, degrade: bool, progress: Progress | None = None) -> dict:
        """A photo bundled with scikit-image, centre-cropped to 256 px (fast on a CPU), as the input."""
        from ..data.imageio import builtin_photo_dir

        if name not in BUILTIN_PHOTOS:
            raise BadRequest(f"no example '{name}' (available: {', '.join(sorted(BUILTIN_PHOTOS))})")
        path = builtin_photo_dir() / f"{name}.png"  # written once, from the scikit-image wheel
        if not path.is_file():
            raise BadRequest(f"the example '{name}' is not in this scikit-image installation")
        img = load_image(path)
        h, w = img.shape[-2:]
        s = min(256, h, w)
        img = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        if degrade and not self.info()["can_degrade"]:
            raise BadRequest(
                f"this model's task ({self._task_name()}) cannot make inputs from photos: untick 'degrade'"
            )
        # The example as it is (not degraded) is the input: scaled so that its outputs fit --max-pixels.
        fit = self._fit(s, s, degrade)
        note = "(example, centre 256 px" + (f", scaled to {fit[1]}x{fit[0]} to fit --max-pixels)" if fit else ")")
        return self._register(resize(img, fit) if fit else img, name, degrade, note, fit)

    def _task_name(self) -> str:
        return self.task.name if self.task is not None else "none"

    def _fit(self, h: int, w: int, degrade: bool) -> tuple[int, int] | None:
        """The size to scale an image of h x w to so that its outputs stay within --max-pixels (None: it fits).
        Degraded, the photo is the output; otherwise the outputs are `scale` times the input's side."""
        s = 1 if degrade else self.model.cfg.scale
        fh, fw = ex.fit_size(h, w, self.max_pixels // (s * s))
        return None if (fh, fw) == (h, w) else (fh, fw)

    def _input_from(self, path: Path, name: str, degrade: bool) -> dict:
        from PIL import Image

        try:  # the header alone: refuse a huge image before decoding it
            with Image.open(path) as im:
                (w, h), mode = im.size, im.mode
        except Exception:  # noqa: BLE001 - load_image turns it into the one-line message
            load_image(path)
            raise
        s = self.model.cfg.scale
        out_px = h * w if degrade else h * w * s * s
        if h * w > MAX_DECODE:
            raise BadRequest(
                f"'{name}' is too large to read: {w}x{h} ({h * w / 1e6:.0f} MP; at most {MAX_DECODE / 1e6:.0f} MP)"
            )
        fit = self._fit(h, w, degrade) if degrade else None
        if out_px > self.max_pixels and not degrade:
            # Degraded, a full-resolution photo is scaled to fit (below); as it is, the image is the input and
            # scaling it would change what the user asked for: say what to do instead.
            hint = " (tick 'degrade it first' to treat it as a full-resolution photo, scaled to fit)" if s > 1 else ""
            raise BadRequest(
                f"'{name}' is too large: {w}x{h} gives outputs of {out_px / 1e6:.1f} MP, over the "
                f"limit of {self.max_pixels / 1e6:.1f} MP (--max-pixels){hint}"
            )
        notes = [f"{mode} converted to RGB"] if mode != "RGB" else []
        img = load_image(path)
        if fit:
            notes.append(f"{w}x{h} scaled to {fit[1]}x{fit[0]} to fit the server's {self.max_pixels / 1e6:.1f} MP")
            img = resize(img, fit)
        return self._register(img, name, degrade, f"({'; '.join(notes)})" if notes else "", fit)

    def _register(self, img: Tensor, name: str, degrade: bool, note: str, fit: tuple[int, int] | None = None) -> dict:
        inp = ex.prepare(self.model, self.task, img, degrade)
        shown = self.task.show_input(inp.x[0]) if self.task is not None else inp.x[0][:3]
        entry = Entry(self._id("i"), name, inp, shown[..., : inp.hw[0], : inp.hw[1]].clamp(0, 1), resize=fit)
        self.inputs[entry.id] = entry
        while len(self.inputs) > MAX_INPUTS:
            self.inputs.popitem(last=False)
        h, w = inp.output_hw
        note = f" {note}" if note else ""
        return {
            "input": entry.id,
            "name": name,
            "width": w,
            "height": h,
            "input_png": f"api/input/{entry.id}.png",
            "target_png": f"api/target/{entry.id}.png" if inp.target is not None else None,
            "message": f"input '{name}'{note}: {inp.hw[1]}x{inp.hw[0]} -> outputs {w}x{h}",
        }

    def reference_png(self, key: str) -> bytes:
        e = self._entry(key)
        if e.reference is None:
            raise BadRequest("no reference image for this input")
        return ex.to_png_bytes(e.reference[0])

    def input_png(self, key: str, target: bool = False) -> bytes:
        e = self._entry(key)
        if target:
            if e.inp.target is None:
                raise BadRequest("this input has no real image (it was not degraded)")
            return ex.to_png_bytes(e.inp.crop(e.inp.target))
        return ex.to_png_bytes(e.shown)

    # -- operations -----------------------------------------------------------------------------
    def sample(self, input: str | None = None, num: int = 8, seed: int = 0, progress: Progress | None = None) -> dict:
        e = self._entry(input)
        num = _bounded("num", num, 1, 64)
        g = seeded(_seed(seed), device=self.model.device)
        t = time.perf_counter()
        images, codes = ex.draw_samples(self.model, e.inp.x, num, g, task=self.task, progress=progress)
        images = e.inp.crop(images)
        labels = [f"sample {i + 1} (seed {seed})" for i in range(num)]
        slugs = [f"sample{i + 1}_seed{seed}" for i in range(num)]
        items = self._add(e, images, codes, labels, self._infos(e, images), slugs)
        return self._answer(items, f"{num} samples in {time.perf_counter() - t:.2f} s")

    def vary(
        self, item: str | None = None, level: int = 2, num: int = 8, seed: int = 0, progress: Progress | None = None
    ) -> dict:
        it = self._item(item)
        e = self._entry(it.input)
        level = _bounded("level", level, 1, self.model.cfg.levels)
        num = _bounded("num", num, 1, 64)
        g = seeded(_seed(seed), device=self.model.device)
        t = time.perf_counter()
        images, codes = ex.vary(self.model, e.inp.x, it.codes, level, num, g, task=self.task, progress=progress)
        images = e.inp.crop(images)
        kept = "z1" if level == 2 else f"z1..z{level - 1}"
        labels = [f"{it.label}, {kept} kept, {i + 1}" if level > 1 else f"redrawn {i + 1}" for i in range(num)]
        slugs = [f"{it.slug}_vary-level{level}-seed{seed}-{i + 1}" for i in range(num)]
        items = self._add(e, images, codes, labels, self._infos(e, images), slugs)
        return self._answer(items, f"{num} variations from level {level} in {time.perf_counter() - t:.2f} s")

    def interpolate(
        self, a: str | None = None, b: str | None = None, steps: int = 16, progress: Progress | None = None
    ) -> dict:
        ia, ib = self._item(a), self._item(b)
        if ia.input != ib.input:
            raise BadRequest("the two samples belong to different inputs: pick two samples of this input")
        if a == b:
            raise BadRequest("pick two different samples (click one, shift-click another)")
        steps = _bounded("steps", steps, 2, 64)
        e = self._entry(ia.input)
        t = time.perf_counter()
        codes = ex.interpolate_codes(ia.codes, ib.codes, steps)
        images = e.inp.crop(ex.render(self.model, e.inp.x, codes, self.task, progress=progress))
        labels = [f"frame {i + 1}/{steps}" for i in range(steps)]
        slugs = [f"frame{i + 1}of{steps}_{ia.slug}_to_{ib.slug}" for i in range(steps)]
        items = self._add(e, images, codes, labels, self._infos(e, images), slugs)
        return self._answer(items, f"{steps} frames in {time.perf_counter() - t:.2f} s")

    def add_reference(self, input: str | None, name: str, data: bytes, progress: Progress | None = None) -> dict:
        """A reference image for the guided search: decoded, resized to the outputs' size."""
        e = self._entry(input)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or "reference").name)[:80] or "reference"
        if not data or len(data) > self.max_upload:
            raise BadRequest(f"'{safe}' is empty or over the upload limit")
        path = self.workdir / f"{self._id('f')}_{safe}"
        path.write_bytes(data)
        try:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception:  # noqa: BLE001
                load_image(path)
                raise
            if w * h > max(self.max_pixels, 1 << 22):
                raise BadRequest(f"reference '{safe}' is too large ({w}x{h})")
            img = load_image(path)
        except ImageError as err:
            raise BadRequest(f"bad image '{safe}': {err.problem}") from None
        finally:
            path.unlink(missing_ok=True)
        e.reference = resize(img[None], e.inp.output_hw)
        return {
            "reference": e.id,
            "reference_png": f"api/reference/{e.id}.png",
            "message": f"reference '{safe}' ({w}x{h}) resized to the outputs' size",
        }

    def guided(
        self,
        input: str | None = None,
        hint: str | None = None,
        reference: bool = False,
        k: int = 4,
        samples: int | list[int] = 32,
        refine_steps: int = 0,
        seed: int = 0,
        compare: list[str] | None = None,
        progress: Progress | None = None,
    ) -> dict:
        """The guided search on a painted hint (a PNG data URL, transparent where nothing was painted, at
        the outputs' size) or on the input's reference image; compared with the plain samples `compare`."""
        e = self._entry(input)
        seed = _seed(seed)
        k = _bounded("k", k, 1, 16)
        refine_steps = _bounded("refine_steps", refine_steps, 0, 200)
        L = self.model.cfg.levels
        # One number m: m candidates at level 1, a quarter as many at each finer level (at least 1 per match),
        # shared among the k matches. The finest levels cost the most per candidate (4.9, 9.6, 20 GFLOP on
        # sr8-small with a 48 px input), and the coarse level decides the most, the colours a hint asks for
        # (CHIMLE's schedules, e.g. 200, 200, 20, 10, also put more candidates on the coarse levels).
        if isinstance(samples, int) and not isinstance(samples, bool):
            samples = _bounded("candidates", samples, 1, 1024)
            per_level = [samples] + [max(1, samples >> (2 * l)) for l in range(1, L)]
        else:
            per_level = list(samples) if isinstance(samples, list) else []
        if len(per_level) != L or not all(isinstance(m, int) and 1 <= m <= 1024 for m in per_level):
            raise BadRequest(f"candidates: a count in 1..1024, or one per level ({L}), got {samples!r}")
        if reference:
            if e.reference is None:
                raise BadRequest("no reference image for this input: upload one first")
            hint_t, mask, distance = e.reference, None, self.lpips()
        else:
            hint_t, mask = _decode_hint(hint, e.inp.output_hw)
            distance = None
        t = time.perf_counter()

        def preview(level: int, imgs: Tensor, ds: Tensor) -> None:
            """The best so far of each match (partial outputs at this level), for the page while it searches."""
            # the padding cut off at this level's size
            (ph, pw), (h, w) = e.inp.x.shape[-2:], e.inp.hw
            sh, sw = imgs.shape[-2] // ph, imgs.shape[-1] // pw
            shown = [
                {"png": _data_url(i[:, : h * sh, : w * sw]), "label": f"best so far, level {level} of {L}: d = {v:.4g}"}
                for i, v in zip(imgs, ds.tolist())
            ]
            progress(None, None, note=f"level {level} of {L} done", preview=shown)

        found = ex.guided_search(
            self.model,
            e.inp.x,
            e.inp.pad(hint_t) if mask is not None else _pad_edge(e.inp, hint_t),
            e.inp.pad(mask) if mask is not None else None,
            per_level,
            seeded(int(seed), device=self.model.device),
            task=self.task,
            k=k,
            refine_steps=refine_steps,
            distance=distance,
            progress=progress,
            on_best=(lambda level, imgs, ds: preview(level, imgs, ds)) if progress is not None else None,
            memory_budget=self.search_budget,
        )
        images = e.inp.crop(found.images)
        # every figure on the page measured the same way: on the cropped images
        dists = ex.hint_distance(images, hint_t, mask, distance)
        order = dists.argsort()
        images, codes, dists = images[order], latent.index(found.codes, order), dists[order]
        infos = self._infos(e, images)
        for info, d in zip(infos, dists.tolist()):
            info["distance"] = d
        kind = "reference" if mask is None else "hint"
        slugs = [f"guided{i + 1}-{kind}_seed{seed}" for i in range(k)]
        items = self._add(e, images, codes, [f"guided {i + 1}" for i in range(k)], infos, slugs)
        plain = [self.items[c] for c in (compare or []) if c in self.items and self.items[c].input == e.id]
        plain_d = (
            ex.hint_distance(torch.stack([p.image for p in plain]), hint_t, mask, distance).tolist() if plain else []
        )
        out = self._answer(items, "")
        out["plain"] = [{"id": p.id, "distance": d} for p, d in zip(plain, plain_d)]
        kind = "LPIPS to the reference" if mask is None else "masked L2 on the painted pixels"
        kind += f", {'/'.join(map(str, per_level))} candidates per level"
        best_plain = f"; best of {len(plain)} samples shown: {min(plain_d):.4g}" if plain else ""
        out["message"] = f"guided search ({kind}) in {time.perf_counter() - t:.2f} s: best {dists[0]:.4g}{best_plain}"
        return out

    def lpips(self):
        if self._lpips is None:
            from ..distances.lpips import LPIPS

            self._lpips = LPIPS("alex").to(self.model.device).eval()
        return self._lpips

    def item_png(self, key: str) -> bytes:
        return self._item(key).png()

    def item_npz(self, key: str) -> bytes:
        it = self._item(key)
        e = self._entry(it.input)
        buf = io.BytesIO()
        # the server's torch threads: `sample_with_code` renders with as many (the last bit can depend on it)
        extra = {"threads": torch.get_num_threads(), **({"resize": list(e.resize)} if e.resize else {})}
        meta = ex.code_meta(self.model, self.task, e.inp, input_name=e.name, label=it.label, **extra)
        ex.save_code(buf, it.codes, meta)
        return buf.getvalue()

    def _answer(self, items: list[Item], message: str) -> dict:
        return {
            "items": [
                {
                    "id": it.id,
                    "png": f"api/item/{it.id}.png",
                    "npz": f"api/item/{it.id}.npz",
                    "label": it.label,
                    **it.info,
                }
                for it in items
            ],
            "message": message,
        }


def _malloc_trim() -> bool:
    """Hand the free memory of every malloc arena back to the kernel (glibc; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _data_url(image: Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(ex.to_png_bytes(image)).decode()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _bounded(name: str, value: Any, lo: int, hi: int) -> int:
    """A whole number in lo..hi, or a one-line BadRequest that names the field (an empty field on the
    page arrives as null: JSON has no NaN)."""
    if value is None or value == "":
        raise BadRequest(f"{name} is empty: enter a whole number in {lo}..{hi}")
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} must be a whole number in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _seed(value: Any) -> int:
    return _bounded("seed", value, 0, MAX_SEED)


def _decode_hint(data_url: str | None, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A painted hint (PNG data URL, RGBA) -> (hint (1, 3, H, W), mask (1, 1, H, W)): mask = painted alpha."""
    from PIL import Image

    if not data_url:
        raise BadRequest("the hint is empty: paint on the selected sample first (or upload a reference image)")
    try:
        raw = base64.b64decode(data_url.split(",", 1)[-1], validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            rgba = torch.from_numpy(np.array(im.convert("RGBA"))).permute(2, 0, 1).float() / 255
    except (binascii.Error, OSError, ValueError) as err:
        raise BadRequest(f"the hint is not a PNG image: {' '.join(str(err).split())[:120]}") from None
    if tuple(rgba.shape[-2:]) != tuple(hw):
        raise BadRequest(f"the hint is {rgba.shape[-1]}x{rgba.shape[-2]}, the outputs are {hw[1]}x{hw[0]}")
    mask = (rgba[3:] > 0).float()
    if float(mask.sum()) == 0:
        raise BadRequest("the hint is empty: paint on the selected sample first (or upload a reference image)")
    return rgba[None, :3], mask[None]


def _pad_edge(inp: ex.Input, image: Tensor) -> Tensor:
    """A reference image at the outputs' size -> the padded size, repeating the edge (a whole-image
    distance then sees no black border)."""
    h, w = inp.output_hw
    ph, pw = inp.x.shape[-2] * inp.scale - h, inp.x.shape[-1] * inp.scale - w
    return torch.nn.functional.pad(image, (0, pw, 0, ph), mode="replicate") if ph or pw else image


# ---------------------------------------------------------------------------------------------
# The web app


def build_app(explorer: Explorer):
    """The FastAPI app: the static page and the JSON API over `explorer`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="chimle explore", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("chimle.apps") / "static"
    types = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}

    async def run(fn, *args, what: str = "working", op: str = "", **kw):
        """Queue the work as a job and answer once it ended (the event loop stays free meanwhile)."""
        job = explorer.jobs.submit(op or fn.__name__, what, lambda progress: fn(*args, **kw, progress=progress))
        while not job.ended.is_set():
            await asyncio.sleep(0.02)
        if job.state == "done":
            return JSONResponse(job.result)
        return JSONResponse({"message": job.message}, status_code=job.status)

    def _error(err: Exception, status: int) -> JSONResponse:
        msg = _one_line(err)
        if status == 500:
            msg = f"internal error: {type(err).__name__}: {msg}"
        return JSONResponse({"message": msg[:300]}, status_code=status)

    def flag(value: str | None) -> bool:
        return str(value).lower() in ("1", "true", "yes", "on")

    async def body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > explorer.max_upload:
            raise BadRequest(
                f"the file is {int(size) / 2**20:.1f} MB, over the upload limit of {explorer.max_upload / 2**20:.0f} MB"
            )
        return await request.body()

    async def json_body(request: Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    def page(name: str) -> Response:
        return Response((static / name).read_bytes(), media_type=types[Path(name).suffix])

    @app.get("/")
    def index() -> Response:
        return page("explore.html")

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in STATIC:
            return JSONResponse({"message": f"no static file '{name}'"}, status_code=404)
        return page(name)

    @app.get("/api/info")
    def info() -> JSONResponse:
        return JSONResponse(explorer.info())

    async def fields(request: Request, op: str) -> dict:
        """The JSON body of an operation: its fields are the keyword arguments (unknown ones refused)."""
        data = await json_body(request)
        names = OPS[op][1]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(names)}")
        return data

    OPS = {
        "sample": (explorer.sample, ("input", "num", "seed"), "sampling"),
        "vary": (explorer.vary, ("item", "level", "num", "seed"), "varying"),
        "interpolate": (explorer.interpolate, ("a", "b", "steps"), "interpolating"),
        "guided": (
            explorer.guided,
            ("input", "hint", "reference", "k", "samples", "refine_steps", "seed", "compare"),
            "searching",
        ),
    }

    async def api(request: Request, op: str):
        """An operation answered when it is done (scripts, the benchmark): the page uses /api/jobs."""
        try:
            data = await fields(request, op)
        except BadRequest as err:
            return _error(err, 400)
        return await run(OPS[op][0], what=OPS[op][2], op=op, **data)

    @app.post("/api/jobs/{op}")
    async def submit(request: Request, op: str):
        """Queue an operation and answer at once with its job's status; GET /api/jobs/ID follows it."""
        if op not in OPS:
            return _error(BadRequest(f"no operation '{op}' (one of {', '.join(OPS)})"), 404)
        try:
            data = await fields(request, op)
        except BadRequest as err:
            return _error(err, 400)
        fn = OPS[op][0]
        job = explorer.jobs.submit(op, OPS[op][2], lambda progress: fn(**data, progress=progress))
        return JSONResponse(explorer.jobs.status(job), status_code=202)

    @app.get("/api/jobs/{key}")
    def job_status(key: str):
        try:
            return JSONResponse(explorer.jobs.status(explorer.jobs.get(key)))
        except BadRequest as err:
            return _error(err, 404)

    @app.post("/api/jobs/{key}/cancel")
    def job_cancel(key: str):
        try:
            return JSONResponse(explorer.jobs.status(explorer.jobs.cancel(key)))
        except BadRequest as err:
            return _error(err, 404)

    async def upload_then(request: Request, fn, *args, what: str = "reading the image"):
        """An upload (the raw file as the body): `fn(*args, data)`."""
        try:
            data = await body(request)
        except BadRequest as err:
            return _error(err, 400)
        return await run(fn, *args, data, what=what)

    @app.post("/api/input")
    async def upload(request: Request, name: str = "upload", degrade: str = "0"):
        return await upload_then(request, explorer.add_input, name, flag(degrade))

    @app.post("/api/example")
    async def example(name: str = "", degrade: str = "1"):
        return await run(explorer.add_example, name, flag(degrade), what="loading the example")

    @app.post("/api/reference")
    async def reference(request: Request, input: str = "", name: str = "reference"):
        return await upload_then(request, explorer.add_reference, input or None, name, what="reading the reference")

    @app.post("/api/sample")
    async def sample(request: Request):
        return await api(request, "sample")

    @app.post("/api/vary")
    async def vary(request: Request):
        return await api(request, "vary")

    @app.post("/api/interpolate")
    async def interpolate(request: Request):
        return await api(request, "interpolate")

    @app.post("/api/guided")
    async def guided(request: Request):
        return await api(request, "guided")

    def binary(fn, key: str, media: str, filename: str | None = None) -> Response:
        try:
            data = fn(key)
        except BadRequest as err:
            return _error(err, 404)
        headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else {}
        return Response(data, media_type=media, headers=headers)

    @app.get("/api/input/{key}.png")
    def input_png(key: str) -> Response:
        return binary(explorer.input_png, key, "image/png")

    @app.get("/api/reference/{key}.png")
    def reference_png(key: str) -> Response:
        return binary(explorer.reference_png, key, "image/png")

    @app.post("/api/model")
    async def switch_model(name: str = ""):
        return await run(explorer.switch_model, name, what="loading the model")

    @app.get("/api/target/{key}.png")
    def target_png(key: str) -> Response:
        return binary(lambda k: explorer.input_png(k, target=True), key, "image/png")

    @app.get("/api/item/{key}.png")
    def item_png(key: str) -> Response:
        return binary(explorer.item_png, key, "image/png", _download_name(explorer, key, "png"))

    @app.get("/api/item/{key}.npz")
    def item_npz(key: str) -> Response:
        return binary(explorer.item_npz, key, "application/octet-stream", _download_name(explorer, key, "npz"))

    return app


def _download_name(explorer: Explorer, key: str, ext: str) -> str:
    """input_model_what_id.ext: the input's file, the model, how the result was made (sample, seed, level...)."""
    it = explorer.items.get(key)
    if it is None or it.input not in explorer.inputs:
        return f"result_{key}.{ext}"
    e = explorer.inputs[it.input]
    parts = [Path(e.name).stem, "degraded" if e.inp.degraded else "", explorer.short_name(), it.slug[:120], key]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(p for p in parts if p)) + f".{ext}"


# ---------------------------------------------------------------------------------------------
# Command line


def demo_model(seed: int = 0) -> tuple[TowerModel, Task]:
    """A random-init tiny 8x super-resolution tower: no training, for a smoke run of the page (its
    samples are noise around the upscaled input, not photos)."""
    torch.manual_seed(seed)
    return TowerModel(TowerConfig.preset("tiny", layout="upscale")).eval(), make_task("sr", scale=8)


def model_menu(folder: str | Path | None = None) -> dict[str, str]:
    """{name: what to load} for the page's menu: the models `chimle models` lists (shipped, then the user's),
    then the weights in `folder` (.safetensors, .pt checkpoints, `save_pretrained` folders) by file name."""
    from ..inference.weights import available_models

    menu = {name: str(path) for name, path in available_models().items()}
    if folder is not None:
        d = Path(folder)
        if not d.is_dir():
            raise ValueError(f"--models: '{d}' is not a folder")
        for q in sorted(d.iterdir()):
            if (q.suffix in (".safetensors", ".pt") and q.is_file()) or (q / "config.json").is_file():
                menu.setdefault(q.stem if q.is_file() else q.name, str(q))
    return menu


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chimle explore", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "weights",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"exported .safetensors, training checkpoint, or a model's name (default: the shipped {DEFAULT_MODEL})",
    )
    p.add_argument("--demo", action="store_true", help="no weights: a random-init tiny 8x SR tower (smoke run)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="0 picks a free port (printed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=1 << 20, help="largest output, in pixels (default 1 MP)")
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument(
        "--models",
        metavar="DIR",
        help="a folder of weights (.safetensors, .pt, model folders) for the page's model menu, with the shipped",
    )
    add_threads_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        print(
            f"chimle explore: error: needs the app extra ({err.name} is missing): pip install 'chimle[app]'",
            file=sys.stderr,
        )
        return 2
    try:
        set_threads(a.threads)  # the server's whole life: nothing to restore
        if a.demo:
            model, task = demo_model()
            name = "demo: random-init tiny 8x SR tower (untrained)"
        else:
            model, task_cfg = load_with_task(a.weights, a.device)
            task, name = (make_task(**task_cfg) if task_cfg else None), str(a.weights)
        model = model.to(a.device)
        models = model_menu(a.models)
        if not a.demo:  # the model given, under its menu name when the menu has it (a file of --models DIR)
            given = Path(str(a.weights)).resolve()
            name = next((k for k, v in models.items() if k == name or Path(v).resolve() == given), name)
            models.setdefault(name, str(a.weights))
        explorer = Explorer(
            model,
            task,
            name=name,
            max_pixels=a.max_pixels,
            max_upload=int(a.max_upload_mb * 2**20),
            models=models,
        )
        app = build_app(explorer)
        # Bind the socket here so that --port 0 can print the port it got before serving.
        sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
        sock.listen(128)  # connections made once the address is printed wait for the server, not get refused
    except (ValueError, OSError) as err:
        if os.environ.get("CHIMLE_DEBUG"):
            raise
        print(f"chimle explore: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    host = f"[{a.host}]" if ":" in a.host else a.host
    print(f"chimle explore: {name} on http://{host}:{sock.getsockname()[1]}/ (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again, which with the default
    # handler would end the process before anything cleans up (the upload folder stayed in the temp
    # folder): exit through Python instead, with the usual status of a SIGTERM (128 + 15).
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        explorer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
