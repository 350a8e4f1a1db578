"""What the explorer page does (`chimle explore`), without the web framework: its inputs, its results (each
an image with its latent code) and the operations on them. `chimle.apps.explore_server` serves it over HTTP;
the tests call it directly.

An `Explorer` holds the model, the recent inputs (`Entry`: the model's input made from an uploaded or
bundled photo) and the recent results (`Item`: the PNG the page shows and the code that made it), both
bounded, the oldest dropped first. Its operations take the page's fields, check them (a `BadRequest` names
the field in one line), run the library (`chimle.inference.explore`, `.guide`, `.codefile`,
`chimle.latent.interpolate`) and answer JSON-ready dicts; each runs as a job of its `JobQueue`.

Explorer-only: `chimle.apps.explore_server` uses it, no other app.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import latent
from ..data.imageio import BUILTIN_PHOTOS, ImageError, load_image
from ..data.tasks import Task, make_task
from ..inference import explore as ex
from ..inference.codefile import check_code, load_code, save_code
from ..inference.guide import GuideOptions, guided_search, hint_distance, schedule
from ..inference.weights import load_with_task
from ..latent import Codes
from ..model import TowerModel
from ..resample import resize
from ..rng import seeded
from .explore_jobs import BadRequest, JobQueue, Progress, free_memory

__all__ = ["Explorer", "Item", "Entry", "MAX_ITEMS", "MAX_INPUTS"]

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
        """After every job: free what it left (`free_memory`)."""
        free_memory()

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
        safe = _safe_name(name, "upload")
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
        codes = latent.cat(latent.interpolate(ia.codes, ib.codes, steps))  # slerp, as `chimle sample`
        images = e.inp.crop(ex.render(self.model, e.inp.x, codes, self.task, progress=progress))
        labels = [f"frame {i + 1}/{steps}" for i in range(steps)]
        slugs = [f"frame{i + 1}of{steps}_{ia.slug}_to_{ib.slug}" for i in range(steps)]
        items = self._add(e, images, codes, labels, self._infos(e, images), slugs)
        return self._answer(items, f"{steps} frames in {time.perf_counter() - t:.2f} s")

    def add_reference(self, input: str | None, name: str, data: bytes, progress: Progress | None = None) -> dict:
        """A reference image for the guided search: decoded, resized to the outputs' size."""
        e = self._entry(input)
        safe = _safe_name(name, "reference")
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

    def add_code(self, input: str | None, name: str, data: bytes, progress: Progress | None = None) -> dict:
        """A code file (.npz, as the page downloads it) as a result of this input again, its output rendered as
        `chimle sample --code` renders it: a result to vary, to walk from, to compare."""
        e = self._entry(input)
        safe = _safe_name(name, "code")
        if not data or len(data) > self.max_upload:
            raise BadRequest(f"'{safe}' is empty or over the upload limit")
        codes, _ = load_code(io.BytesIO(data), name=safe)
        check_code(self.model, codes, e.inp.x, f"code '{safe}'")
        images = e.inp.crop(ex.render(self.model, e.inp.x, codes, self.task, progress=progress))
        stem = Path(safe).stem
        items = self._add(e, images, codes, [f"code {stem}"], self._infos(e, images), [f"code-{stem}"])
        return self._answer(items, f"code '{safe}' rendered")

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
        # One number m: m candidates at level 1, fewer at each finer level (`guide.schedule`), shared by the k matches
        if isinstance(samples, int) and not isinstance(samples, bool):
            per_level = schedule(_bounded("candidates", samples, 1, 1024), L)
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

        found = guided_search(
            self.model,
            e.inp.x,
            e.inp.pad(hint_t, edge=mask is None),  # a reference: its edge repeated, no black border
            e.inp.pad(mask) if mask is not None else None,
            per_level,
            seeded(int(seed), device=self.model.device),
            task=self.task,
            options=GuideOptions(k, refine_steps, distance=distance, memory_budget=self.search_budget),
            progress=progress,
            on_best=preview if progress is not None else None,
        )
        images = e.inp.crop(found.images)
        # every figure on the page measured the same way: on the cropped images
        dists = hint_distance(images, hint_t, mask, distance)
        order = dists.argsort()
        images, codes, dists = images[order], latent.index(found.codes, order), dists[order]
        infos = self._infos(e, images)
        for info, d in zip(infos, dists.tolist()):
            info["distance"] = d
        kind = "reference" if mask is None else "hint"
        slugs = [f"guided{i + 1}-{kind}_seed{seed}" for i in range(k)]
        items = self._add(e, images, codes, [f"guided {i + 1}" for i in range(k)], infos, slugs)
        plain = [self.items[c] for c in (compare or []) if c in self.items and self.items[c].input == e.id]
        plain_d = hint_distance(torch.stack([p.image for p in plain]), hint_t, mask, distance).tolist() if plain else []
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
        save_code(buf, it.codes, meta)
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


def _data_url(image: Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(ex.to_png_bytes(image)).decode()


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


def _safe_name(name: str | None, default: str) -> str:
    """An uploaded file's name, safe in a path and a message: its last part, odd characters replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or default).name)[:80] or default


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
