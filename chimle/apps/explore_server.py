"""`chimle explore`: a web page to explore the modes of a model, with guided search toward a user's hint.

    chimle explore [WEIGHTS] [--host 127.0.0.1] [--port 7860]    # default: the shipped sr8-small
    chimle explore colorize-small                                # any name `chimle models` lists, or a file
    chimle explore --demo                                        # a random-init tiny 8x SR tower: a smoke run
    chimle explore --models runs/exported                        # that folder's weights in the page's model menu

A small FastAPI app (the `app` extra: `pip install "chimle[app]"`) serving one static page
(chimle/apps/static/) and a JSON API over an `Explorer` (`chimle.apps.explore_page`: the page's state and
operations, on `chimle.inference.explore`, `.guide` and `.codefile`), whose work runs as jobs
(`chimle.apps.explore_jobs`). Why FastAPI rather than Gradio: docs/explore.md.

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
    POST /api/code?input=I&name=F        (file)      -> an item from a downloaded code (.npz), rendered again
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
import re
import signal
import socket
import sys
from importlib import resources
from pathlib import Path

import torch

from ..data.tasks import Task, make_task
from ..inference.weights import load_with_task
from ..model import TowerConfig, TowerModel
from .explore_jobs import BadRequest, one_line
from .explore_page import Explorer

__all__ = ["cmd_explore", "build_app", "demo_model", "model_menu"]

STATIC = ("explore.html", "explore.js", "explore.css")


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
        msg = one_line(err)
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

    @app.post("/api/code")
    async def code(request: Request, input: str = "", name: str = "code.npz"):
        return await upload_then(request, explorer.add_code, input or None, name, what="drawing the code")

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


def cmd_explore(a: argparse.Namespace) -> int:
    """`chimle explore` (its options: `chimle.apps.cli`): load the model, print the page's address, serve it
    until Ctrl-C or SIGTERM."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ValueError(f"needs the app extra ({err.name} is missing): pip install 'chimle[app]'") from None
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
