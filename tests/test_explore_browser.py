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
from chimle.inference.explore import load_code, sample_with_code
from chimle.model import TowerConfig, TowerModel

pytestmark = pytest.mark.slow
TIMEOUT_MS = 60_000


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
    yield url
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

    def wait_cards(gallery: str, n: int) -> list[str]:
        page.wait_for_function(f"document.querySelectorAll('#{gallery} .card').length === {n}")
        return page.eval_on_selector_all(f"#{gallery} .card", "cs => cs.map(c => c.dataset.id)")

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


def _data_url(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])
