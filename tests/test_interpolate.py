"""One interpolation (chimle.latent.interpolate, slerp per level of the style and the noise): it stays on the
prior's shell where a straight line sags, and `chimle sample --interpolate` and the explorer page's walk between
two results give the same frames, pixel for pixel, for the same model, input and codes."""

import io
import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from chimle import latent
from chimle.data.tasks import make_task
from chimle.inference import weights as weights_io
from chimle.inference.codefile import save_code
from chimle.inference.explore import render
from chimle.inference.sample import interpolate
from chimle.model import TowerConfig, TowerModel
from chimle.rng import seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


def test_interpolation_stays_on_the_prior():
    g = seeded(3)
    layout = latent.LatentLayout(64, 2, ((16, 16), (32, 32)))
    a, b = layout.sample(1, g), layout.sample(1, g)
    walk = latent.interpolate(a, b, 9)
    frames = latent.cat(walk)
    assert len(walk) == 9 and frames[0].noise.shape[0] == 9
    for l in range(2):  # the ends exactly
        assert torch.equal(frames[l].noise[0], a[l].noise[0]) and torch.equal(frames[l].style[-1], b[l].style[0])
    mid = walk[4]
    for part_a, part_b, part_m in [(a[1].noise, b[1].noise, mid[1].noise), (a[0].style, b[0].style, mid[0].style)]:
        na, nb, nm = (float(t.norm()) for t in (part_a, part_b, part_m))
        assert abs(nm - (na + nb) / 2) < 1e-3 * nm  # on the shell, where a straight line would sag
        assert float(((part_a + part_b) / 2).norm()) < 0.8 * nm
    # parallel vectors: the arc is the segment
    v = torch.randn(1, 10, generator=g)
    assert torch.allclose(latent.slerp(v, 3 * v, 0.5), 2 * v, atol=1e-5)
    # a batch: row j walks to row j, each on its own arc
    a2, b2 = layout.sample(2, g), layout.sample(2, g)
    both = latent.interpolate(a2, b2, 5)[2]
    one = latent.interpolate(latent.index(a2, [1]), latent.index(b2, [1]), 5)[2]
    assert torch.equal(both[1].noise[1], one[1].noise[0]) and torch.equal(both[0].style[1], one[0].style[0])
    with pytest.raises(ValueError, match="at least 2"):
        latent.interpolate(a, b, 1)
    with pytest.raises(ValueError, match="different shapes"):
        latent.interpolate(a, latent.LatentLayout(64, 2, ((8, 8), (16, 16))).sample(1, g), 4)


@pytest.fixture()
def weights_and_photo(tmp_path, photos):
    """A random-init tiny 2-level 4x SR tower exported as a user's weights, and a small photo as its input."""
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", levels=2, layout="upscale")).eval()
    ckpt = {"model": model.state_dict(), "model_config": model.cfg.to_dict(), "step": 0}
    torch.save({**ckpt, "task_config": make_task("sr", scale=4).config()}, tmp_path / "last.pt")
    w = weights_io.export(tmp_path / "last.pt", tmp_path / "w.safetensors")
    photo = tmp_path / "photo.png"
    Image.fromarray((photos[1][:, 40:52, 60:70].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(photo)
    return w, photo


class _Server:
    """The page's app served by uvicorn in a thread on a free port (real HTTP, as the page talks to it)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def post(self, path: str, data: bytes | dict) -> dict:
        """POST a file (bytes) or a JSON body (dict); the JSON answer."""
        if isinstance(data, bytes):
            body, kind = data, "application/octet-stream"
        else:
            body, kind = json.dumps(data).encode(), "application/json"
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": kind}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def test_cli_and_page_walk_the_same_frames(weights_and_photo, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from chimle.apps.cli import main
    from chimle.apps.explore_page import Explorer
    from chimle.apps.explore_server import build_app

    w, photo = weights_and_photo
    walks = []  # every walk made, with its ends: the CLI's, then the page's
    real = latent.interpolate

    def spy(a, b, steps):
        walks.append((latent.to(a, "cpu"), latent.to(b, "cpu"), steps))
        return real(a, b, steps)

    monkeypatch.setattr(latent, "interpolate", spy)
    out = tmp_path / "cli"
    assert main(["sample", str(w), str(photo), "--interpolate", "--steps", "5", "--seed", "3", "--out", str(out)]) == 0
    assert len(walks) == 1
    a, b, _ = walks[0]
    cli = [np.asarray(Image.open(out / f"photo_{k:03d}.png")) for k in range(5)]
    assert cli[0].shape == (48, 40, 3) and not (out / "photo_005.png").exists()
    assert all(np.abs(cli[2].astype(int) - f.astype(int)).max() > 0 for f in (cli[0], cli[4]))  # a walk, not a still
    # its ends are samples 0 and 1 of `chimle sample` with the same seed
    assert main(["sample", str(w), str(photo), "--num", "2", "--seed", "3", "--out", str(tmp_path / "plain")]) == 0
    for k, frame in ((0, cli[0]), (1, cli[4])):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / f"photo_{k:03d}.png")), frame)

    # the page: the same photo as its input, the CLI's two codes uploaded as results, the walk between them
    model, task_cfg = weights_io.load_with_task(w)
    explorer = Explorer(model, make_task(**task_cfg), workdir=tmp_path)
    server = _Server(build_app(explorer))
    try:
        got = server.post("/api/input?name=photo.png&degrade=0", photo.read_bytes())
        ids = []
        for name, code in (("a.npz", a), ("b.npz", b)):
            buf = io.BytesIO()
            save_code(buf, code)
            ids.append(server.post(f"/api/code?input={got['input']}&name={name}", buf.getvalue())["items"][0]["id"])
        answer = server.post("/api/interpolate", {"a": ids[0], "b": ids[1], "steps": 5})
        page = [np.asarray(Image.open(io.BytesIO(server.get(f"/api/item/{it['id']}.png")))) for it in answer["items"]]
    finally:
        server.close()
        explorer.close()
    assert len(walks) == 2 and walks[1][2] == 5  # the page walked between the very codes the CLI drew
    assert all(torch.equal(p.noise, q.noise) and torch.equal(p.style, q.style) for p, q in zip(walks[1][0], a))
    assert len(page) == 5
    for k, (c, p) in enumerate(zip(cli, page)):
        assert np.array_equal(c, p), f"frame {k}: CLI and page differ by up to {np.abs(c.astype(int) - p).max()}"


def test_sample_interpolate_renders_what_the_page_renders(weights_and_photo):
    """The floats too, before 8-bit rounding: `sample.interpolate` against the page's `render` of the walk."""
    w, photo = weights_and_photo
    model, task_cfg = weights_io.load_with_task(w)
    task = make_task(**task_cfg)
    x = task.read_input(photo)[None]
    g = seeded(4)
    a, b = (model.sample_codes(1, g, input_hw=tuple(x.shape[-2:])) for _ in range(2))
    frames = interpolate(model, x, 6, task=task, codes=(a, b))[:, 0]
    page = render(model, x, latent.cat(latent.interpolate(a, b, 6)), task)
    assert frames.shape == (6, 3, 48, 40) and (frames - page).abs().max() <= 1e-6
    assert torch.equal(frames[0], render(model, x, a, task)[0])  # the ends are the two codes' outputs
