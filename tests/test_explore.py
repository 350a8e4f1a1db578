"""The functions behind `chimle explore` (chimle.inference.explore, .guide, .codefile, chimle.latent.interpolate)
and the page's request handling (chimle.apps.explore_page.Explorer, without HTTP; its job queue,
chimle.apps.explore_jobs): samples keep their codes, variations share the kept levels, interpolation stays on
the prior, the guided search beats plain samples on the painted pixels, SR consistency, codes saved as .npz
reproduce their outputs exactly, bad input is one line."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import chimle
from chimle import latent
from chimle.data.tasks import make_task
from chimle.inference import codefile, guide
from chimle.inference import explore as ex
from chimle.inference import weights as weights_io
from chimle.inference.guide import GuideOptions as Opt
from chimle.model import TowerConfig, TowerModel
from chimle.rng import seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


@pytest.fixture(scope="module")
def sr():
    """A random-init 2-level 4x SR tower and its task."""
    torch.manual_seed(0)
    return TowerModel(TowerConfig.preset("tiny", levels=2, layout="upscale")).eval(), make_task("sr", scale=4)


@pytest.fixture(scope="module")
def inp(sr, photos):
    model, task = sr
    return ex.prepare(model, task, photos[0][:, 100:134, 100:142], degrade=True)  # 34x42 -> 32x40 target


def test_prepare_degrades_crops_and_pads(sr, photos):
    model, task = sr
    inp = ex.prepare(model, task, photos[0][:, :34, :42], degrade=True)
    assert inp.target.shape == (3, 32, 40) and inp.x.shape == (1, 3, 8, 10) and inp.output_hw == (32, 40)
    assert inp.degraded and ex.prepare(model, task, photos[0][:, :8, :10]).target is None
    # "same" layout: the input is padded for the tower and the outputs cropped back
    torch.manual_seed(0)
    col = TowerModel(TowerConfig.preset("tiny", in_channels=1, out_channels=2)).eval()
    cinp = ex.prepare(col, make_task("colorize"), photos[1][:, :30, :27])
    assert cinp.x.shape == (1, 1, 32, 28) and cinp.hw == (30, 27)
    assert cinp.crop(torch.zeros(2, 3, 32, 28)).shape == (2, 3, 30, 27)
    assert cinp.pad(torch.ones(1, 1, 30, 27)).sum() == 30 * 27
    ramp = torch.arange(27.0).expand(1, 3, 30, 27)  # a reference image: its edge repeated into the padding
    assert torch.equal(cinp.pad(ramp, edge=True)[..., 30:, :27], ramp[..., 29:, :].expand(1, 3, 2, 27))
    assert torch.equal(cinp.pad(ramp, edge=True)[..., :30, 27], ramp[..., 26])
    with pytest.raises(ValueError, match="degrading needs a task that makes inputs from photos"):
        ex.prepare(model, None, photos[0], degrade=True)


def test_samples_keep_their_codes(sr, inp):
    model, task = sr
    images, codes = ex.draw_samples(model, inp.x, 4, seeded(0), task=task)
    assert images.shape == (4, 3, 32, 40) and codes[0].style.shape[0] == 4
    assert torch.equal(ex.render(model, inp.x, latent.index(codes, [2]), task)[0], images[2])
    assert (images[0] - images[1]).abs().mean() > 0
    again, _ = ex.draw_samples(model, inp.x, 4, seeded(0), task=task)
    assert torch.equal(again, images)


def test_vary_keeps_the_coarse_levels(sr, inp):
    model, task = sr
    _, codes = ex.draw_samples(model, inp.x, 2, seeded(1), task=task)
    one = latent.index(codes, [1])
    images, var = ex.vary(model, inp.x, one, level=2, num=3, generator=seeded(2), task=task)
    assert images.shape == (3, 3, 32, 40)
    for i in range(3):
        assert torch.equal(var[0].style[i], one[0].style[0]) and torch.equal(var[0].noise[i], one[0].noise[0])
        assert not torch.equal(var[1].noise[i], one[1].noise[0])
    assert not torch.equal(var[1].style[0], var[1].style[1])
    _, redrawn = ex.vary(model, inp.x, one, level=1, num=2, generator=seeded(2), task=task)
    assert not torch.equal(redrawn[0].style[0], one[0].style[0])
    with pytest.raises(ValueError, match="level must be in 1..2"):
        ex.vary(model, inp.x, one, level=3, num=2)


def test_candidates_schedule():
    """One number m for the page: m candidates at level 1, a quarter as many at each finer level, at least 1."""
    assert guide.schedule(32, 4) == [32, 8, 2, 1] and guide.schedule(5, 1) == [5] and guide.schedule(1, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="candidates >= 1"):
        guide.schedule(0, 3)


def test_masked_l2_sees_only_the_painted_pixels():
    g = seeded(4)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 2:10] = 1
    d = guide.MaskedL2(mask)
    want = ((a - b)[..., 4:8, 2:10] ** 2).flatten(1).mean(1)
    assert torch.allclose(d(a, b.expand(2, -1, -1, -1)), want)
    changed = a.clone()
    changed[..., 10:, :] = 0  # outside the mask
    assert torch.equal(d(changed, b.expand(2, -1, -1, -1)), d(a, b.expand(2, -1, -1, -1)))
    assert d(a[..., ::2, ::2], b[..., ::2, ::2]).shape == (2,)  # any level's size
    assert torch.allclose(guide.hint_distance(a, b, mask), want)


def test_guided_search_beats_plain_samples_on_the_hint(sr, inp):
    model, task = sr
    images, _ = ex.draw_samples(model, inp.x, 8, seeded(5), task=task)
    hint = torch.zeros(1, 3, 32, 40)
    hint[:, 0] = 1  # "this region should be red"
    mask = torch.zeros(1, 1, 32, 40)
    mask[..., 8:20, 10:30] = 1
    plain = guide.hint_distance(images, hint, mask)
    found = guide.guided_search(model, inp.x, hint, mask, [12, 8], seeded(6), task=task, options=Opt(k=3))
    assert found.images.shape == (3, 3, 32, 40) and found.codes[0].style.shape[0] == 3
    assert torch.all(found.distances[:-1] <= found.distances[1:])  # best first
    assert torch.allclose(guide.hint_distance(found.images, hint, mask), found.distances, atol=1e-6)
    refined = guide.guided_search(
        model, inp.x, hint, mask, [12, 8], seeded(6), task=task, options=Opt(k=3, refine_steps=8)
    )
    assert refined.distances[0] <= found.distances[0] + 1e-6  # refinement keeps the best point of its path
    assert refined.distances[0] < plain.min()
    # the images are those of their codes, bit for bit (what `chimle sample --code` redraws), without a render
    assert torch.equal(ex.render(model, inp.x, found.codes, task), found.images)
    assert torch.equal(ex.render(model, inp.x, refined.codes, task), refined.images)
    # the k matches share level 1: their z_1 are the best 3 of the 12 candidates drawn first, judged once
    z1 = model.latent_layout(tuple(inp.x.shape[-2:])).sample_level(1, 12, seeded(6))
    level1 = guide.MaskedL2(mask)(
        model(inp.x.expand(12, -1, -1, -1), [z1])[0],
        hint.expand(12, -1, -1, -1)[..., ::2, ::2],
    )
    rows = [int((z1.style == s).all(1).nonzero()[0]) for s in found.codes[0].style]
    assert sorted(rows) == sorted(level1.argsort()[:3].tolist())
    with pytest.raises(ValueError, match="hint is empty"):
        guide.guided_search(model, inp.x, hint, torch.zeros_like(mask), [4, 4], task=task)
    with pytest.raises(ValueError, match="outputs are 32x40"):
        guide.guided_search(model, inp.x, hint[..., :16], mask[..., :16], [4, 4], task=task)


def test_guided_search_toward_a_reference_image(sr, inp):
    model, task = sr
    reference = inp.target[None]
    d = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731 - any callable distance works
    found = guide.guided_search(model, inp.x, reference, None, [8, 4], seeded(7), task=task, options=Opt(2, distance=d))
    images, _ = ex.draw_samples(model, inp.x, 4, seeded(8), task=task)
    assert found.distances[0] <= d(images, reference).min() + 0.05


def test_consistency_for_super_resolution(sr, inp):
    model, task = sr
    from chimle.resample import downsample

    y = inp.target[None]
    x = downsample(y, 4)  # unrounded: a sample that downsamples to the input exactly
    assert float(ex.consistency(y, x, task)[0]) < 1e-6
    noisy = (y + 0.2 * torch.randn(y.shape, generator=seeded(9))).clamp(0, 1)
    assert float(ex.consistency(torch.cat([y, noisy]), x, task)[1]) > 0.01
    with pytest.raises(ValueError, match="not defined for the 'night' task"):
        ex.consistency(y, x, make_task("night"))


def test_code_npz_round_trip_and_errors(sr, inp, tmp_path):
    model, task = sr
    _, codes = ex.draw_samples(model, inp.x, 2, seeded(10))
    one = latent.index(codes, [1])
    meta = ex.code_meta(model, task, inp, label="x")
    codefile.save_code(tmp_path / "c.npz", one, meta)
    buf = io.BytesIO()
    codefile.save_code(buf, one, meta)
    for src in (tmp_path / "c.npz", io.BytesIO(buf.getvalue())):
        back, m = codefile.load_code(src)
        assert m == meta and m["degrade"] is True and m["task"] == {"name": "sr", "scale": 4}
        assert all(torch.equal(p.style, q.style) and torch.equal(p.noise, q.noise) for p, q in zip(back, one))
    with pytest.raises(ValueError, match="one code"):
        codefile.save_code(tmp_path / "two.npz", codes)
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(ValueError, match="cannot be read") as err:
        codefile.load_code(tmp_path / "junk.npz")
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a chimle code"):
        codefile.load_code(tmp_path / "other.npz")


def test_sample_with_code_reproduces_the_exact_output(sr, photos, tmp_path):
    """What `chimle sample WEIGHTS INPUT --code CODE.npz` runs: the PNG of the page, bit for bit."""
    model, task = sr
    torch.save(
        {"model": model.state_dict(), "model_config": model.cfg.to_dict(), "task_config": task.config(), "step": 0},
        tmp_path / "last.pt",
    )
    w = weights_io.export(tmp_path / "last.pt", tmp_path / "w.safetensors")
    photo = tmp_path / "photo.png"
    Image.fromarray((photos[2][:, :42, :50].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(photo)
    from chimle.data.imageio import load_image

    loaded, _ = weights_io.load_with_task(w)
    inp = ex.prepare(loaded, task, load_image(photo), degrade=True)
    images, codes = ex.draw_samples(loaded, inp.x, 3, seeded(11), task=task)
    codefile.save_code(tmp_path / "pick.npz", latent.index(codes, [2]), ex.code_meta(loaded, task, inp))
    out = ex.sample_with_code(w, photo, tmp_path / "pick.npz", tmp_path / "out")
    assert out == tmp_path / "out" / "photo_pick.png"
    want = np.asarray(Image.open(io.BytesIO(ex.to_png_bytes(inp.crop(images)[2]))))
    assert np.array_equal(np.asarray(Image.open(out)), want)
    # the same code for another input size: one line saying so
    small = tmp_path / "small.png"
    Image.open(photo).crop((0, 0, 24, 24)).save(small)
    with pytest.raises(ValueError, match="another input size"):
        ex.sample_with_code(w, small, tmp_path / "pick.npz", tmp_path / "out")


# -- the page's request handling (chimle.apps.explore_page.Explorer), without HTTP ---------------------------


@pytest.fixture()
def explorer(sr, tmp_path):
    from chimle.apps.explore_page import Explorer

    model, task = sr
    e = Explorer(model, task, max_pixels=200 * 200, workdir=tmp_path)
    yield e
    e.close()  # its job queue's worker thread ends


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_input_is_one_line_and_the_next_request_works(explorer, photos):
    from chimle.apps.explore_jobs import BadRequest

    rgb = (photos[0][:, :40, :48].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    cases = [
        (b"hello, not an image", "bad image 'notes.png': not an image"),
        (_png(rgb)[:200], "bad image 'notes.png': truncated"),
        (_png(np.zeros((120, 120, 3), np.uint8)), "too large: 120x120 gives outputs of 0.2 MP"),
        (b"", "'notes.png' is empty"),
    ]
    for data, msg in cases:
        with pytest.raises(BadRequest) as err:
            explorer.add_input("notes.png", False, data)
        assert msg in str(err.value) and "\n" not in str(err.value), str(err.value)
    # grey 16-bit and RGBA are converted; the next requests work
    grey16 = (rgb.mean(2) * 257).astype(np.uint16)
    for data, mode in [(_png(grey16), "I;16"), (_png(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])), "RGBA")]:
        got = explorer.add_input("ok.png", False, data)
        assert "converted to RGB" in got["message"] and (got["width"], got["height"]) == (192, 160), (mode, got)
    answer = explorer.sample(got["input"], num=2, seed=0)
    assert len(answer["items"]) == 2 and "consistency" in answer["items"][0]
    ids = [it["id"] for it in answer["items"]]
    with pytest.raises(BadRequest, match="hint is empty"):
        explorer.guided(got["input"], hint=None, compare=ids)
    blank = "data:image/png;base64," + __import__("base64").b64encode(_png(np.zeros((160, 192, 4), np.uint8))).decode()
    with pytest.raises(BadRequest, match="hint is empty"):
        explorer.guided(got["input"], hint=blank, compare=ids)
    with pytest.raises(BadRequest, match="num must be in 1..64"):
        explorer.sample(got["input"], num=0)
    with pytest.raises(BadRequest, match="unknown result"):
        explorer.vary("nope")
    assert len(explorer.vary(ids[0], level=2, num=2)["items"]) == 2
    frames = explorer.interpolate(ids[0], ids[1], steps=3)["items"]
    assert explorer.item_png(frames[0]["id"]) == explorer.item_png(ids[0])
    code, meta = codefile.load_code(io.BytesIO(explorer.item_npz(ids[1])))
    assert meta["input_name"] == "ok.png" and len(code) == 2
    # a downloaded code uploaded again: the same result; a code of another input size, or no code, one line
    again = explorer.add_code(got["input"], "mine.npz", explorer.item_npz(ids[1]))["items"][0]
    assert explorer.item_png(again["id"]) == explorer.item_png(ids[1]) and again["label"] == "code mine"
    small = explorer.add_input("small.png", False, _png(rgb[:20, :24]))["input"]
    with pytest.raises(ValueError, match="code 'mine.npz' does not fit this model and input"):
        explorer.add_code(small, "mine.npz", explorer.item_npz(ids[1]))
    with pytest.raises(ValueError, match="code file 'junk.npz' cannot be read"):
        explorer.add_code(small, "junk.npz", b"junk")


def test_guided_request_reports_plain_distances(explorer, photos):
    rgb = (photos[1][:, :32, :40].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    got = explorer.add_input("p.png", True, _png(rgb))  # degraded: 8x10 input, 32x40 outputs
    ids = [it["id"] for it in explorer.sample(got["input"], num=4)["items"]]
    hint = np.zeros((32, 40, 4), np.uint8)
    hint[5:20, 5:30] = (0, 255, 0, 255)
    url = "data:image/png;base64," + __import__("base64").b64encode(_png(hint)).decode()
    answer = explorer.guided(got["input"], hint=url, k=2, samples=8, refine_steps=4, compare=ids)
    assert [p["id"] for p in answer["plain"]] == ids
    assert answer["items"][0]["distance"] < min(p["distance"] for p in answer["plain"])
    assert "masked L2" in answer["message"]


def test_explore_command_defaults_to_the_shipped_model(capsys):
    from chimle.apps.cli import build_parser, main
    from chimle.apps.explore_server import demo_model

    assert build_parser().parse_args(["explore"]).weights == "sr8-small"
    assert chimle.load("sr8-small").cfg.scale == 8  # the default loads with nothing downloaded or trained
    assert main(["explore", "sr9-huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chimle explore: error: no weights named 'sr9-huge'") and "\n" not in err
    assert main(["explore", str(Path("no/such/weights.safetensors"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    model, task = demo_model()
    assert model.cfg.scale == 8 and task.name == "sr"


def test_bundled_examples(explorer):
    from chimle.apps.explore_jobs import BadRequest

    got = explorer.add_example("astronaut", True)
    # centre 256 px, degraded 4x, scaled to fit the 40,000 px of this explorer's --max-pixels
    assert (got["width"], got["height"]) == (200, 200) and got["target_png"] and "scaled to 200x200" in got["message"]
    with pytest.raises(BadRequest, match="no example 'moon'"):
        explorer.add_example("moon", True)


def test_fields_are_named_when_empty_or_out_of_range(explorer, photos):
    """Issue 28: an empty seed field (null in JSON) was an internal TypeError, a negative one named no field."""
    from chimle.apps.explore_jobs import BadRequest

    got = explorer.add_example("astronaut", True)
    for seed, msg in [
        (None, "seed is empty: enter a whole number in 0..4294967295"),
        (-3, "seed must be in 0..4294967295, got -3"),
        (1.5, "seed must be a whole number"),
    ]:
        with pytest.raises(BadRequest) as err:
            explorer.sample(got["input"], num=1, seed=seed)
        assert str(err.value).startswith(msg), str(err.value)
    with pytest.raises(BadRequest, match="^k is empty"):
        explorer.guided(got["input"], hint="x", k=None)


def test_a_photo_too_large_is_scaled_when_degraded_and_reproduces(explorer, sr, photos, tmp_path):
    """Degraded, a photo over --max-pixels is scaled to fit (it was refused); the code's meta records the size,
    and `sample_with_code` scales the same file the same way, so the page's PNG comes back bit for bit."""
    from chimle.apps.explore_jobs import BadRequest

    model, task = sr
    rgb = (photos[0][:, :300, :250].permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # 75,000 px > 40,000
    with pytest.raises(BadRequest, match="tick 'degrade it first'"):
        explorer.add_input("big.png", False, _png(rgb))
    got = explorer.add_input("big.png", True, _png(rgb))
    assert "250x300 scaled to 182x219 to fit the server's 0.0 MP" in got["message"], got["message"]
    assert (got["width"], got["height"]) == (180, 216)  # cropped to a multiple of the scale
    item = explorer.sample(got["input"], num=1, seed=3)["items"][0]["id"]
    code, meta = codefile.load_code(io.BytesIO(explorer.item_npz(item)))
    assert meta["resize"] == [219, 182] and meta["threads"] == torch.get_num_threads()
    torch.save(
        {"model": model.state_dict(), "model_config": model.cfg.to_dict(), "task_config": task.config(), "step": 0},
        tmp_path / "last.pt",
    )
    w = weights_io.export(tmp_path / "last.pt", tmp_path / "w.safetensors")
    (tmp_path / "big.png").write_bytes(_png(rgb))
    (tmp_path / "code.npz").write_bytes(explorer.item_npz(item))
    out = ex.sample_with_code(w, tmp_path / "big.png", tmp_path / "code.npz", tmp_path / "out")
    assert Image.open(out).tobytes() == Image.open(io.BytesIO(explorer.item_png(item))).tobytes()


def test_examples_follow_degrade(explorer):
    got = explorer.add_example("astronaut", False)  # as it is: the input, scaled so that 4x outputs fit 40,000 px
    assert "scaled to 50x50" in got["message"] and got["target_png"] is None and got["width"] == 200


def test_job_queue_reports_progress_position_and_cancels():
    """The page's jobs (issue 28): run in order, a queued job knows how many run before it, a running one its
    fraction and an estimate of the time left; cancelling stops a running job at its next unit of work and
    takes a queued one out at once; an error is one line, the queue goes on."""
    import threading

    from chimle.apps.explore_jobs import BadRequest, JobQueue

    freed = []
    q = JobQueue(after=lambda: freed.append(1))
    half, release = threading.Event(), threading.Event()

    def slow(progress):
        for i in range(4):
            progress(i, 4, note=f"step {i}")
            if i == 2:
                half.set()
                release.wait(10)
        return {"message": "slow done"}

    first = q.submit("guided", "searching", slow)
    assert half.wait(10)
    second = q.submit("sample", "sampling", lambda progress: {"message": "second done"})
    third = q.submit("sample", "sampling", lambda progress: {"message": "third done"})
    st = q.status(first)
    assert st["state"] == "running" and st["fraction"] == 0.5 and st["note"] == "step 2" and st["eta_s"] >= 0
    assert q.status(second)["ahead"] == 1 and q.status(third)["ahead"] == 2 and "running_eta_s" in q.status(third)
    q.cancel(second.id)  # queued: out of the queue at once
    assert second.state == "cancelled" and q.status(third)["ahead"] == 1
    q.cancel(first.id)
    release.set()  # the running job stops at its next progress call
    assert third.ended.wait(10) and third.result == {"message": "third done"}
    assert first.state == "cancelled" and first.message.startswith("searching cancelled after")
    assert q.status(first)["status"] == 409 and q.status(third)["status"] == 200 and q.status(third)["fraction"] == 0
    bad = q.submit("sample", "sampling", lambda progress: (_ for _ in ()).throw(BadRequest("num must be in 1..64")))
    boom = q.submit("sample", "sampling", lambda progress: 1 / 0)
    assert boom.ended.wait(10) and bad.state == "error" and (bad.message, bad.status) == ("num must be in 1..64", 400)
    assert boom.status == 500 and boom.message == "internal error: ZeroDivisionError: division by zero"
    assert len(freed) == 4  # after every job that ran (the cancelled queued one never did)
    with pytest.raises(BadRequest, match="unknown job"):
        q.get("j0")
    q.close()


def test_render_and_guided_report_progress(sr, inp):
    model, task = sr
    seen = []
    ex.draw_samples(model, inp.x, 3, seeded(0), task=task, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    hint, mask = torch.zeros(1, 3, 32, 40), torch.zeros(1, 1, 32, 40)
    mask[..., 4:12, 4:20] = 1
    seen.clear()
    track = lambda d, t: seen.append(d / t)  # noqa: E731
    guide.guided_search(model, inp.x, hint, mask, [4, 2], seeded(1), task=task, options=Opt(2, 2), progress=track)
    assert seen[0] == 0 and seen[-1] == 1 and all(a <= b for a, b in zip(seen, seen[1:])) and len(seen) >= 6

    class Stop(Exception):
        pass

    def cancel(d, t):
        if d > 0:
            raise Stop

    with pytest.raises(Stop):  # a cancel raised from the callback stops the search
        guide.guided_search(model, inp.x, hint, mask, [4, 2], seeded(1), task=task, options=Opt(2), progress=cancel)
