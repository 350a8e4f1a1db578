"""Consistency with the input (issue: shipped models keep the input's colours): the metric, the tower's
low-frequency path (`input_skip`), back-projection, and the shipped models themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import chimle
from chimle.data.tasks import make_task
from chimle.evaluation.metrics import consistency
from chimle.inference.sample import back_project, generate
from chimle.inference.weights import CheckpointError, available_models, model_card, shipped_dir
from chimle.model import TowerConfig, TowerModel
from chimle.resample import downsample

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = {"sr8-small": "sr", "colorize-small": "colorize"}


def _crop(photo: torch.Tensor, side: int) -> torch.Tensor:
    h, w = photo.shape[-2:]
    return photo[:, (h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]


# -- the metric: known answers ------------------------------------------------------------------


def test_exact_upsampler_is_consistent_and_a_tint_is_a_shift(photos):
    task = make_task("sr", scale=8)
    y = torch.stack([_crop(p, 128) for p in photos[:3]]) * 0.6 + 0.2  # away from 0 and 1: no clipping
    x = task.observe(y)
    c = consistency(y, x, task.observe)  # the target itself is an exact "upsampler" of its downsample
    assert c["mae"] < 1e-6 and c["max_abs_shift"] < 1e-6
    tinted = y.clone()
    tinted[:, 1] -= 0.08  # a sample whose green is too low, as the old demo's
    c = consistency(torch.stack([tinted, y]), x, task.observe)  # (K=2, N=3, ...): half the samples tinted
    assert c["shift"][1] == pytest.approx(-0.04, abs=1e-5)
    assert abs(c["shift"][0]) < 1e-6 and abs(c["shift"][2]) < 1e-6
    assert c["mae"] == pytest.approx(0.08 / 6, abs=1e-5)  # one channel of half the samples off by 0.08


def test_consistency_of_colourisation_and_jpeg(photos):
    y = torch.stack([_crop(p, 64) for p in photos[:2]])
    col = make_task("colorize")
    assert consistency(y, col.degrade(y), col.observe)["mae"] < 1e-5  # L of the photo is its input
    darker = consistency(y * 0.8, col.degrade(y), col.observe)
    assert darker["shift"][0] < -0.03  # a darker sample has a lower L than its input
    jpeg = make_task("jpeg", quality=10)
    assert consistency(y, jpeg.degrade(y), jpeg.observe)["mae"] == 0.0  # re-encoding is deterministic
    assert consistency(y.flip(-1), jpeg.degrade(y), jpeg.observe)["mae"] > 0.05


def test_consistency_refuses_tasks_without_an_observation():
    night = make_task("night")
    with pytest.raises(ValueError, match="no deterministic observation"):
        consistency(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), night.observe)
    sr = make_task("sr", scale=4)
    with pytest.raises(ValueError, match="observed samples are"):
        consistency(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 16), sr.observe)


# -- the tower's low-frequency path ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["upscale", "same"])
def test_input_skip_starts_from_the_input(layout, photos):
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout=layout, input_skip=True))
    with torch.no_grad():  # a head that adds nothing: every level returns its (upsampled) input image
        for level in model.levels:
            level.head.parametrizations.weight.original0.zero_()
            level.head.bias.zero_()
    y = torch.stack([_crop(p, 64) for p in photos[:2]]) * 0.9 + 0.05
    x = downsample(y, 8) if layout == "upscale" else y
    outs = model(x, model.sample_codes(2, input_hw=tuple(x.shape[-2:])))
    if layout == "same":
        assert torch.allclose(outs[-1], x, atol=1e-6)
    else:  # each level: its input, bilinearly upsampled x2
        up = x
        for out in outs:
            up = torch.nn.functional.interpolate(up, scale_factor=2, mode="bilinear")
            assert torch.allclose(out, up, atol=1e-5)
    # The default tower paints the output from features alone: at init it is far from its input.
    plain = TowerModel(TowerConfig.preset("tiny", layout=layout))
    out = plain(x, plain.sample_codes(2, input_hw=tuple(x.shape[-2:])))[-1]
    assert (downsample(out, size=tuple(x.shape[-2:])) - x).abs().mean() > 0.1


def test_input_skip_config():
    assert "input_skip" not in TowerConfig.preset("tiny").to_dict()  # configs of old runs are unchanged
    assert TowerConfig.preset("tiny", input_skip=True).to_dict()["input_skip"] is True
    with pytest.raises(ValueError, match="input_skip needs"):
        TowerConfig.preset("tiny", in_channels=1, out_channels=2, input_skip=True)
    with pytest.raises(ValueError, match="input_skip needs"):
        TowerConfig.preset("tiny", layout="upscale", feedback="tanh", input_skip=True)


def test_back_projection_makes_samples_consistent(photos):
    task = make_task("sr", scale=8)
    y = torch.stack([_crop(p, 128) for p in photos[:2]])
    x = task.degrade(y)
    drifted = (y * torch.tensor([1.0, 0.8, 1.0]).view(1, 3, 1, 1))[None]  # green 20 % too low
    before = consistency(drifted, x, task.observe)
    after = consistency(back_project(drifted, x, task), x, task.observe)
    assert before["shift"][1] < -0.04
    assert after["mae"] < 0.01 and after["max_abs_shift"] < 0.003
    # the detail stays: the projected sample is still far closer to the drifted one than to a blur
    blur = torch.nn.functional.interpolate(x, scale_factor=8, mode="bicubic")
    projected = back_project(drifted, x, task)[0]
    assert (projected - y).abs().mean() < (blur.clamp(0, 1) - y).abs().mean()
    with pytest.raises(ValueError, match="super-resolution"):
        back_project(drifted, x, make_task("colorize"))


# -- the shipped models --------------------------------------------------------------------------


def test_models_ship_inside_the_package():
    models = available_models()
    for name, task in SHIPPED.items():
        assert models[name].parent == shipped_dir()
        card = model_card(name)
        assert card["task"]["name"] == task and card["megabytes"] <= 10
        # the card states the run it describes: the steps and the wall time the docs quote
        shipped = json.loads((Path(__file__).parent.parent / "docs" / "models" / f"{name}.json").read_text())
        assert (card["step"], card["wall_minutes"]) == (shipped["step"], shipped["wall_minutes"])
        assert card["metrics"]["consistency_mae"] == pytest.approx(
            json.loads((Path(__file__).parent.parent / "docs" / "models" / f"{name}.json").read_text())["metrics"][
                "consistency_mae"
            ]
        )


def test_shipped_sr_model_keeps_the_input_colours(photos):
    model = chimle.load("sr8-small")
    task = make_task("sr", scale=8)
    y = _crop(photos[1], 256)[None]  # chelsea, held out of the training photos
    x = task.degrade(y)
    samples = generate(model, x, 4, torch.Generator().manual_seed(0), task=task)
    assert samples.shape == (4, 1, 3, 256, 256)
    c = consistency(samples, x, task.observe)
    assert c["mae"] <= 0.03 and c["max_abs_shift"] <= 0.02, c
    assert (samples[0] - samples[1]).abs().mean() > 0.005  # and the samples differ


def test_shipped_colorize_model_keeps_the_input_lightness(photos):
    model = chimle.load("colorize-small")
    task = make_task("colorize")
    # The goal is an average over held-out photos: one crop's few draws can clip more (README, model cards)
    y = torch.stack([_crop(p, 128) for p in photos])  # the six held-out photos
    x = task.degrade(y)
    samples = generate(model, x, 4, torch.Generator().manual_seed(0), task=task)
    assert consistency(samples, x, task.observe)["mae"] <= 0.01
    chroma = (samples - samples.mean(2, keepdim=True)).abs().mean()
    assert chroma > 0.01  # colour, not a grey copy of the input


def test_models_command_lists_the_shipped_models(capsys):
    from chimle.apps.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, task in SHIPPED.items():
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert f"name={task}" in line and "shipped" in line


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(CheckpointError, match="available: .*sr8-small"):
        chimle.load("sr9-huge")


def test_training_photos_keyword_says_how_to_fetch(tmp_path, monkeypatch):
    from chimle.data.imageio import wallpaper_photo_dir

    monkeypatch.setenv("CHIMLE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts/fetch_training_photos.sh"):
        wallpaper_photo_dir()


def test_sample_a_shipped_model_by_name(tmp_path, photos):
    from chimle.apps.cli import main
    from chimle.data.imageio import load_image, save_image

    save_image(_crop(photos[1], 32), tmp_path / "small.png")  # a 32 px low-resolution input
    out = tmp_path / "s"
    assert main(["sample", "sr8-small", str(tmp_path / "small.png"), "--num", "2", "--out", str(out)]) == 0
    a, b = (load_image(out / f"small_{k:03d}.png") for k in range(2))
    assert a.shape == (3, 256, 256) and (a - b).abs().mean() > 0.005
    assert (out / "small_grid.png").exists()
