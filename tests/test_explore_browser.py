"""`chimle explore` end to end, in a real browser (Debian's Chromium driven by Playwright).

Starts the server as a subprocess on a free port with a tiny random-init 8x SR tower (exported as
safetensors, as a user's weights would be), then, in the page: uploads a held-out photo, draws 8
samples, varies one from level 2 (its codes, downloaded, share z_1), interpolates between two, runs a
guided search on a painted region (its best result is closer to the hint there than every plain sample
shown), downloads a result with its code and reproduces it as `chimle sample --code` does, uploads a
non-image (a one-line message) and then a 16-bit grey photo (converted; samples again). Every network
request of the page is recorded: any host other than the local server fails the test.

Screenshots of each state (the whole page) go to the test's tmp dir; CHIMLE_EXPLORE_SCREENSHOTS=DIR also
writes the part of the page that changed to DIR, in 256 colours (docs/explore, for the README), and
CHIMLE_EXPLORE_WEIGHTS=PATH runs the page on other 8x SR weights (a trained model makes screenshots
worth looking at).

Without Chromium or Playwright the test is skipped, with the reason, except in CI (CI=true): it fails.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from chimle.inference import weights as weights_io
from chimle.inference.codefile import load_code
from chimle.inference.explore import sample_with_code
from chimle.model import TowerConfig, TowerModel

pytestmark = pytest.mark.slow
TIMEOUT_MS = 60_000


def _memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in f if ln.startswith(("VmRSS:", "VmHWM:"))}


def _need(what: str) -> None:
    """Missing browser tooling: a failure in CI, where .ci/run installs it, a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs it: apt-get install chromium; pip install playwright '.[app]')")
    pytest.skip(what)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    _need("no system Chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("Playwright for Python is not installed (pip install playwright)")
    path = chromium()
    with sync_playwright() as pw:
        # the system Chromium, no browser download; no sandbox: CI runs as root
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random-init tiny 8x SR tower (3 levels) exported as safetensors, like a user's weights."""
    given = os.environ.get("CHIMLE_EXPLORE_WEIGHTS")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    cfg = TowerConfig.preset("tiny", layout="upscale")
    model = TowerModel(cfg)
    state = {
        "model": model.state_dict(),
        "model_config": cfg.to_dict(),
        "task_config": {"name": "sr", "scale": 8},
        "step": 0,
    }
    torch.save(state, out / "last.pt")
    return weights_io.export(out / "last.pt", out / "tiny_sr8.safetensors")


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        _need("the app extra is not installed (pip install -e '.[app]')")
    cmd = [sys.executable, "-m", "chimle", "explore", str(weights), "--port", "0", "--threads", "1"]
    cmd += ["--models", str(weights.parent)]  # the model menu: the shipped models and this folder's
    tmp = tmp_path_factory.mktemp("server_tmp")  # the server's temp folder: its upload folder goes there
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []

    def read() -> None:  # keep draining the pipe so the server never blocks on a full one
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    url, t0 = None, time.monotonic()
    while url is None and time.monotonic() - t0 < 60 and proc.poll() is None:
        url = next((w for line in lines for w in line.split() if w.startswith("http://")), None)
        time.sleep(0.1)
    if url is None:
        proc.kill()
        pytest.fail("the server did not start: " + "".join(lines)[-2000:])
    assert len(list(tmp.glob("chimle-explore-*"))) == 1
    start = _memory(proc.pid)
    yield url
    # the server's memory over the whole session, printed (a figure, not a test: see benchmarks/explore_latency.py)
    end = _memory(proc.pid)
    print(
        f"\nserver RSS: start {start['VmRSS']:.0f} MB, peak {end['VmHWM']:.0f} MB, at the end {end['VmRSS']:.0f} MB"
        f" (load {' '.join(f'{v:.1f}' for v in os.getloadavg())})"
    )
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    # SIGTERM (a service manager's stop) ends the server with 143 and its upload folder removed
    assert proc.returncode == 143 and not list(tmp.glob("chimle-explore-*")), proc.returncode


@pytest.fixture(scope="module")
def files(tmp_path_factory, photo_dir):
    """A held-out photo (a crop of scikit-image's cat, which `chimle demo` holds out: 256x192, so 32x24
    inputs once degraded), the same as a 16-bit grey PNG, and a text file named like an image."""
    d = tmp_path_factory.mktemp("explore_files")
    cat = np.asarray(Image.open(photo_dir / "chelsea.png").convert("RGB"))[40:232, 110:366]
    Image.fromarray(cat).save(d / "cat.png")
    grey16 = (cat.astype(np.float64).mean(2) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(d / "cat_grey16.png")
    assert Image.open(d / "cat_grey16.png").mode.startswith("I")
    (d / "notes.png").write_text("not an image, whatever the name says\n")
    # 200x160: as it is, outputs of 2.0 MP, over the server's 1 MP (--max-pixels); degraded, 200x160 outputs
    Image.fromarray(cat[:160, :200]).save(d / "small.png")
    # a photo of 1400x1000 (1.4 MP): over the limit even degraded, so the server scales it to fit
    Image.fromarray(cat).resize((1400, 1000), Image.BICUBIC).save(d / "photo.jpg", quality=85)
    return d


def test_explore_in_a_browser(browser, server, files, weights, tmp_path):
    host = urlsplit(server).netloc
    docs = Path(os.environ["CHIMLE_EXPLORE_SCREENSHOTS"]) if os.environ.get("CHIMLE_EXPLORE_SCREENSHOTS") else None
    requests: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("request", lambda r: requests.append(r.url))

    def shot(name: str, part: str | None = None) -> None:
        """The whole page into the tmp dir; for the docs, only the part that changed, in 256 colours."""
        page.wait_for_function("[...document.images].every(i => i.complete)")
        page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        if docs:
            docs.mkdir(parents=True, exist_ok=True)
            if part is None:
                page.evaluate("window.scrollTo(0, 0)")  # the top: the message line and the input
            png = page.locator(part).screenshot() if part else page.screenshot()
            Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(docs / f"{name}.png", optimize=True)

    def message() -> str:
        return page.inner_text("#message")

    def wait_cards(gallery: str, n: int) -> list[str]:  # results, not the previews of a running search
        page.wait_for_function(f"document.querySelectorAll('#{gallery} .card:not(.preview)').length === {n}")
        return page.eval_on_selector_all(f"#{gallery} .card:not(.preview)", "cs => cs.map(c => c.dataset.id)")

    def get(path: str) -> bytes:
        r = page.request.get(server + path)
        assert r.ok, (path, r.status)
        return r.body()

    t_start = time.monotonic()
    page.goto(server)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('levels')")
    shot("01_start")

    # a held-out photo, degraded by the task (8x down), the real image shown beside the samples
    page.check("#degrade")
    page.set_input_files("#file", str(files / "cat.png"))
    page.wait_for_function("document.getElementById('message').textContent.includes('-> outputs 256x192')")
    assert page.is_visible("#target-img")

    # N samples
    page.fill("#seed", "0")
    page.click("#sample")
    samples = wait_cards("samples", 8)
    assert "8 samples" in message()
    shot("02_samples", "#samples-panel")

    # vary from level 2: every variation keeps the selected sample's z_1 and redraws z_2, z_3
    page.click(f'#samples .card[data-id="{samples[2]}"]')
    page.select_option("#level", "2")
    page.click("#vary")
    variations = wait_cards("variations", 8)
    base, _ = load_code(io.BytesIO(get(f"api/item/{samples[2]}.npz")))
    for v in variations:
        code, meta = load_code(io.BytesIO(get(f"api/item/{v}.npz")))
        assert torch.equal(code[0].style, base[0].style) and torch.equal(code[0].noise, base[0].noise)
        assert not torch.equal(code[1].noise, base[1].noise) and not torch.equal(code[2].noise, base[2].noise)
        assert meta["degrade"] is True
    shot("03_vary_level2", "#explore-panel")

    # interpolate between two samples: the strip starts and ends on them exactly
    page.click(f'#samples .card[data-id="{samples[0]}"]')
    page.click(f'#samples .card[data-id="{samples[1]}"]', modifiers=["Shift"])
    page.fill("#steps", "8")
    page.click("#interpolate")
    frames = wait_cards("frames", 8)
    assert get(f"api/item/{frames[0]}.png") == get(f"api/item/{samples[0]}.png")
    assert get(f"api/item/{frames[-1]}.png") == get(f"api/item/{samples[1]}.png")
    shot("04_interpolate", "#explore-panel")

    # an empty hint: a message, nothing breaks
    page.click("#clear-hint")
    page.click("#guided")
    page.wait_for_selector("#message.error")
    assert "hint is empty" in message()

    # paint a red patch on A and search
    box = page.locator("#paint").bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.25
    for i in range(6):
        y = y0 + i * box["height"] * 0.05
        page.mouse.move(x0, y)
        page.mouse.down()
        page.mouse.move(x0 + box["width"] * 0.35, y, steps=6)
        page.mouse.up()
    page.fill("#k", "2")
    page.fill("#candidates", "16")
    page.fill("#refine", "5")
    page.click("#guided")
    guided = wait_cards("guided-results", 2)
    page.wait_for_function("document.getElementById('message').textContent.includes('guided search')")
    best = float(page.get_attribute(f'#guided-results .card[data-id="{guided[0]}"]', "data-distance"))
    shown = samples + variations + frames
    plain = {i: float(page.get_attribute(f'.card[data-id="{i}"]', "data-distance")) for i in shown}
    assert best < min(plain.values()), (best, sorted(plain.values())[:3])
    # the same comparison recomputed here from the PNGs and the painted canvas
    hint = np.asarray(Image.open(io.BytesIO(_data_url(page.evaluate("document.getElementById('paint').toDataURL()")))))
    mask = hint[..., 3:] > 0
    assert 0.01 < mask.mean() < 0.5

    def masked(item: str) -> float:
        img = np.asarray(Image.open(io.BytesIO(get(f"api/item/{item}.png"))).convert("RGB")) / 255.0
        return float(((img - hint[..., :3] / 255.0) ** 2 * mask).sum() / (3 * mask.sum()))

    assert masked(guided[0]) < min(masked(i) for i in shown)
    assert abs(masked(guided[0]) - best) < 1e-3  # the page's figure is the masked distance (up to 8-bit rounding)
    shot("05_guided", "#guided-panel")

    # download a result with its code; `chimle sample --code` reproduces it exactly
    png, npz = get(f"api/item/{guided[0]}.png"), get(f"api/item/{guided[0]}.npz")
    (tmp_path / "best.npz").write_bytes(npz)
    again = sample_with_code(weights, files / "cat.png", tmp_path / "best.npz", tmp_path / "cli")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(io.BytesIO(png))))

    # a non-image upload: one line on the page; then a 16-bit grey photo works (converted)
    page.set_input_files("#file", str(files / "notes.png"))
    page.wait_for_selector("#message.error")
    assert message() == "bad image 'notes.png': not an image (unrecognised format)"
    shot("06_bad_upload")
    page.set_input_files("#file", str(files / "cat_grey16.png"))
    page.wait_for_function("document.getElementById('message').textContent.includes('converted to RGB')")
    page.click("#sample")
    wait_cards("samples", 8)
    shot("07_after_bad_upload", "#samples-panel")
    took = time.monotonic() - t_start

    outside = sorted({u for u in requests if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != host})
    assert not outside, f"the page reached outside the local server: {outside}"
    assert len(requests) > 20  # the recording did see the page's own requests
    print(f"browser session {took:.1f} s, {len(requests)} requests, all to {host}")


@pytest.fixture()
def fresh(browser, server):
    """A new page on the server, its model info loaded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('levels')")
    yield page
    page.close()


def _wait_message(page, text: str) -> str:
    page.wait_for_function(f"document.getElementById('message').textContent.includes({text!r})")
    return page.inner_text("#message")


# The bugs of issue 28, each as a new user met it.


def test_bug_empty_or_negative_seed_names_the_field(fresh):
    page = fresh
    page.click("#load-example")
    _wait_message(page, "-> outputs")
    page.get_by_label("seed", exact=True).fill("")  # was: "internal error: TypeError: int() argument must be..."
    page.click("#sample")
    page.wait_for_selector("#message.error")
    assert page.inner_text("#message").startswith("seed is empty"), page.inner_text("#message")
    page.get_by_label("seed", exact=True).fill("-3")  # was: "expected non-negative integer", no field named
    page.click("#sample")
    assert _wait_message(page, "-3") == "seed must be in 0..4294967295, got -3"


def test_bug_too_large_advice_can_be_followed(fresh, files):
    page = fresh
    degrade = page.get_by_label("degrade it first")
    degrade.uncheck()
    page.set_input_files("#file", str(files / "small.png"))
    page.wait_for_selector("#message.error")
    msg = page.inner_text("#message")
    assert "over the limit of 1.0 MP (--max-pixels)" in msg and "tick 'degrade it first'" in msg, msg
    degrade.check()  # no new choice of file (was: no request, the old error stayed): sent again, degraded
    assert "input 'small.png': 25x20 -> outputs 200x160" in _wait_message(page, "-> outputs")
    assert page.is_visible("#target-img") and not page.is_visible("#message.error")


def test_bug_large_photo_degraded_is_scaled_to_fit(fresh, files):
    page = fresh
    page.get_by_label("degrade it first").check()
    page.set_input_files("#file", str(files / "photo.jpg"))  # was: "89.6 MP, over the limit of 1.0 MP"
    got = _wait_message(page, "photo.jpg")
    assert "1400x1000 scaled to 1211x865 to fit the server's 1.0 MP" in got and "-> outputs 1208x864" in got, got


def test_bug_examples_follow_degrade(fresh):
    page = fresh
    degrade = page.get_by_label("degrade it first")
    ticked = degrade.is_checked()
    degrade.uncheck()  # was: the examples were degraded whatever the box said
    page.select_option("#example", "astronaut")
    page.click("#load-example")
    got = _wait_message(page, "astronaut")
    assert "scaled to 128x128" in got and "-> outputs 1024x1024" in got and not page.is_visible("#target-img"), got
    degrade.check()  # read again, degraded: the real image beside it
    got = _wait_message(page, "-> outputs 256x256")
    assert "32x32 -> outputs 256x256" in got and page.is_visible("#target-img"), got
    assert ticked  # ticked from the start for a super-resolution model (the examples were always degraded)


def _doc_shot(page, name: str, part: str | None = None) -> None:
    """With CHIMLE_EXPLORE_SCREENSHOTS=DIR: the part of the page (or the window) in 256 colours, for the docs."""
    if not os.environ.get("CHIMLE_EXPLORE_SCREENSHOTS"):
        return
    docs = Path(os.environ["CHIMLE_EXPLORE_SCREENSHOTS"])
    docs.mkdir(parents=True, exist_ok=True)
    png = page.locator(part).screenshot() if part else page.screenshot()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(docs / f"{name}.png", optimize=True)


def _paint(page, fx: float = 0.2, fy: float = 0.25, strokes: int = 6) -> None:
    """Strokes across the paint canvas, from (fx, fy) of its box: a painted patch."""
    box = page.locator("#paint").bounding_box()
    x0, y0 = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
    for i in range(strokes):
        y = y0 + i * box["height"] * 0.05
        page.mouse.move(x0, y)
        page.mouse.down()
        page.mouse.move(x0 + box["width"] * 0.35, y, steps=6)
        page.mouse.up()


def _in_view(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    view = page.viewport_size
    return box is not None and 0 <= box["y"] and box["y"] + box["height"] <= view["height"]


def test_status_progress_cancel_and_queue(browser, server, fresh):
    """Issue 28: the status stays in view from the guided-search section (an error, a running search), a search
    shows its fraction and an estimate of the time left fed by the server, Cancel stops it, and a job waiting
    behind it (another page) shows its place in the queue, then runs."""
    page = fresh
    other = browser.new_page(viewport={"width": 1280, "height": 900})
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(server)
    other.wait_for_function("document.getElementById('model-info').textContent.includes('levels')")
    for p in (page, other):
        p.click("#load-example")
        _wait_message(p, "-> outputs 256x256")
    page.fill("#num", "2")
    page.click("#sample")
    page.wait_for_function("document.querySelectorAll('#samples .card').length === 2")

    # an error from the guided-search section, scrolled to the bottom: the line is in view
    page.locator("#guided").scroll_into_view_if_needed()
    page.click("#clear-hint")
    page.click("#guided")
    page.wait_for_selector("#message.error")
    assert "hint is empty" in page.inner_text("#message") and _in_view(page, "#message")

    # a long search: its progress (fraction, time left) in view, fed by the server as it runs
    _paint(page)
    page.get_by_label("candidates").fill("64")
    page.get_by_label("refinement steps").fill("200")
    page.click("#guided")
    page.wait_for_function(
        "/searching: [1-9][0-9]*%.*about .* left/.test(document.getElementById('progress-text').textContent)"
    )
    assert _in_view(page, "#progress") and _in_view(page, "#cancel")
    page.wait_for_selector("#guided-results .card.preview")  # the best so far, once level 1 is judged
    assert "best so far, level" in page.inner_text("#guided-results .card.preview figcaption")
    _doc_shot(page, "08_search_progress")  # the window: the guided-search section and the status bar
    assert (
        0
        < float(page.get_attribute("#progress", "value") or page.evaluate("document.getElementById('progress').value"))
        < 1
    )

    # another page's job waits behind it and says so
    other.click("#sample")
    other.wait_for_function(
        "/waiting in the queue, 1 job ahead/.test(document.getElementById('progress-text').textContent)"
    )
    assert page.is_enabled("#cancel") and page.is_disabled("#sample")
    page.get_by_role("button", name="Cancel").click()
    assert _wait_message(page, "cancelled").startswith("searching cancelled after")
    other.wait_for_function("document.querySelectorAll('#samples .card').length === 8")  # then it ran
    assert page.is_enabled("#guided") and page.is_hidden("#cancel") and page.is_hidden("#progress")
    other.close()


def test_full_size_compare_models_reference_brush_names(fresh, files, weights):
    """Issue 28's missing pieces: a full-size view of any result beside the input or B, the model menu
    (shipped and --models DIR), the reference image beside its results, a brush sized in input pixels,
    download names that say input, model, seed and level; every control has an accessible name."""
    page = fresh
    unnamed = page.evaluate(
        """[...document.querySelectorAll('input, select, button, canvas, textarea')].filter(el =>
            !((el.labels && el.labels.length) || el.getAttribute('aria-label') || el.textContent.trim()))
            .map(el => el.id || el.outerHTML)"""
    )
    assert unnamed == []
    me = weights.stem
    menu = page.get_by_label("model", exact=True)
    options = menu.evaluate("s => [...s.options].map(o => o.value)")
    assert {"sr8-small", "colorize-small", me} <= set(options) and menu.input_value() == me, options
    menu.select_option("colorize-small")  # another model: its facts on the page
    assert _wait_message(page, "model colorize-small loaded").endswith("colorize task")
    assert "task colorize" in page.inner_text("#model-info") and page.get_by_label("degrade it first").is_checked()
    menu.select_option(me)
    _wait_message(page, f"model {me} loaded")

    page.get_by_label("example", exact=True).select_option("astronaut")
    page.get_by_role("button", name="Use example").click()
    _wait_message(page, "-> outputs 256x256")
    page.get_by_label("number of samples").fill("2")
    page.get_by_label("seed", exact=True).fill("5")
    page.get_by_role("button", name="Draw samples").click()
    page.wait_for_function("document.querySelectorAll('#samples .card').length === 2")
    ids = page.eval_on_selector_all("#samples .card", "cs => cs.map(c => c.dataset.id)")

    # download names: input (degraded), model, what made it, seed; the vary level too
    r = page.request.get(
        page.url + page.get_attribute(f'.card[data-id="{ids[0]}"] a[aria-label^="download PNG"]', "href")
    )
    assert (
        r.headers["content-disposition"] == f'attachment; filename="astronaut_degraded_{me}_sample1_seed5_{ids[0]}.png"'
    )
    page.get_by_label("vary from level").select_option("2")
    page.get_by_role("button", name="Vary A").click()
    page.wait_for_function("document.querySelectorAll('#variations .card').length === 2")
    vid = page.get_attribute("#variations .card", "data-id")
    r = page.request.get(page.url + f"api/item/{vid}.npz")
    want = f"astronaut_degraded_{me}_sample1_seed5_vary-level2-seed6-1_{vid}.npz"
    assert r.headers["content-disposition"] == f'attachment; filename="{want}"'

    # full size, then beside the input (enlarged, pixel for pixel) and beside B
    page.get_by_role("button", name="full size: sample 1 (seed 5)", exact=True).click()
    viewer = page.locator("#viewer")
    assert viewer.is_visible() and page.evaluate(
        "(i => [i.naturalWidth, i.clientWidth])(document.getElementById('viewer-img'))"
    ) == [256, 256]
    compare = page.get_by_label("compare with")
    compare.select_option("input")
    assert (
        page.is_visible("#viewer-other") and page.evaluate("document.getElementById('viewer-other').clientWidth") == 256
    )
    assert "api/input/" in page.get_attribute("#viewer-other", "src")
    _doc_shot(page, "09_full_size_compare", "#viewer")
    compare.select_option("b")
    assert page.get_attribute("#viewer-other", "src") == f"api/item/{ids[1]}.png"
    page.get_by_role("button", name="Close").click()
    assert not viewer.is_visible()

    # the brush in input pixels: 2 input px are 16 output px at 8x, in the chosen colour
    page.get_by_label("brush (input pixels)").fill("2")
    assert page.inner_text("#brush-out") == "2 input px = 16 output px"
    page.get_by_label("brush colour").fill("#00ff00")
    box = page.locator("#paint").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=5)
    page.mouse.up()
    hint = np.asarray(Image.open(io.BytesIO(_data_url(page.evaluate("document.getElementById('paint').toDataURL()")))))
    column = hint[:, 128]
    painted = column[:, 3] > 127
    assert 15 <= painted.sum() <= 17 and (column[painted, :3] == (0, 255, 0)).all(), painted.sum()

    # a reference image: shown, and beside the results searched for it
    page.get_by_label("reference image").set_input_files(str(files / "cat.png"))
    _wait_message(page, "reference 'cat.png'")
    assert page.is_visible("#reference-img") and page.get_by_label("use the reference").is_checked()
    page.get_by_label("best k").fill("1")
    page.get_by_label("candidates").fill("4")
    page.get_by_label("refinement steps").fill("0")
    page.get_by_role("button", name="Search").click()
    page.wait_for_function(
        "document.querySelectorAll('#guided-results .card:not(.preview):not(.reference)').length === 1"
    )
    assert page.is_visible("#guided-results .card.reference img") and "LPIPS" in page.inner_text("#message")
    _doc_shot(page, "10_reference", "#guided-panel")
    page.get_by_role("button", name="Clear hint").click()
    alpha = "(c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 === 3 && v))"
    assert page.evaluate(f"{alpha}(document.getElementById('paint')).length") == 0
    page.get_by_label("use the reference").uncheck()  # back to the painted hint, and there is none
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#message.error")
    assert "hint is empty" in page.inner_text("#message")


def _data_url(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])
