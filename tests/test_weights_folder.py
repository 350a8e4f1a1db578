"""Model folders (config.json + model.safetensors + README.md): save_pretrained / from_pretrained round trips,
`chimle.load` and the commands take a folder, a folder in the weights directory loads by name, and a broken
folder is one line naming it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import chimle
from chimle.apps.cli import main
from chimle.inference.weights import (
    FOLDER_FILES,
    CheckpointError,
    available_models,
    load_with_task,
    model_card,
    save_pretrained,
)
from chimle.model import TowerConfig, TowerModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(a: TowerModel, b: TowerModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_tower_round_trips_with_its_config_task_and_card(tmp_path):
    torch.manual_seed(0)
    cfg = TowerConfig.preset("tiny", layout="upscale", levels=2, input_skip=True)
    model = TowerModel(cfg)
    card = {"summary": "a tiny 4x tower for a test", "data": "noise", "metrics": {"kid": 0.5}}
    folder = save_pretrained(model, tmp_path / "tiny", task={"name": "sr", "scale": 4}, card=card)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    back, task = load_with_task(folder)
    _same_weights(model, back)
    assert back.cfg == cfg and task == {"name": "sr", "scale": 4} and not back.training
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == cfg.to_dict() and config["card"] == card
    readme = (folder / "README.md").read_text()
    assert readme.startswith("# chimle sr (scale=4)\n") and "a tiny 4x tower for a test" in readme
    assert "| kid | 0.5 |" in readme and "- data: noise" in readme
    c = model_card(folder)
    assert c["summary"] == card["summary"] and c["task"] == task and c["model"] == cfg.to_dict()
    # the same sample from the folder as from the tower
    x, g = torch.rand(1, 3, 6, 6), torch.Generator().manual_seed(1)
    codes = model.sample_codes(1, g, input_hw=(6, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(x, codes)[-1], chimle.from_pretrained(folder)(x, codes)[-1])


def test_a_shipped_model_to_a_folder_and_back_is_the_same_files(tmp_path):
    """Name -> folder -> folder: the second copy is the first (weights, config, card text)."""
    a = save_pretrained("sr8-small", tmp_path / "a")
    b = save_pretrained(a, tmp_path / "b")
    for name in ("config.json", "README.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # (safetensors writes its metadata in hash order: the same file, not the same bytes)
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata() and json.loads(fa.metadata()["task"]) == {"name": "sr", "scale": 8}
        assert list(fa.keys()) == list(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    _same_weights(chimle.load("sr8-small"), chimle.load(b))
    config = json.loads((b / "config.json").read_text())
    assert config["task"] == {"name": "sr", "scale": 8} and config["step"] == 15000
    assert model_card(b)["metrics"] == model_card("sr8-small")["metrics"]
    # the folder's model.safetensors is an exported weights file on its own
    _same_weights(chimle.load("sr8-small"), chimle.load(b / "model.safetensors"))


def test_a_folder_in_the_weights_directory_loads_by_name_and_shipped_names_still_load(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "home"))
    save_pretrained("colorize-small", tmp_path / "home" / "weights" / "my-colorizer")
    models = available_models()
    assert models["my-colorizer"] == tmp_path / "home" / "weights" / "my-colorizer"
    assert {"sr8-small", "colorize-small"} <= set(models)
    _same_weights(chimle.load("colorize-small"), chimle.from_pretrained("my-colorizer"))
    assert chimle.load("sr8-small").cfg.layout == "upscale"


def test_the_cli_writes_a_folder_and_samples_from_it(photos, tmp_path, capsys):
    from chimle.resample import downsample

    folder = tmp_path / "sr8"
    assert main(["export", "sr8-small", str(folder)]) == 0
    assert f"exported {folder}" in capsys.readouterr().out
    src = tmp_path / "in"
    src.mkdir()
    chimle.save_image(downsample(photos[0][:, :64, :64], 8), src / "a.png")
    assert main(["sample", str(folder), str(src), "--num", "2", "--out", str(tmp_path / "out")]) == 0
    outs = sorted(p.name for p in (tmp_path / "out").rglob("*.png") if not p.name.endswith("_grid.png"))
    assert len(outs) == 2, outs
    # and back to one file, card and all
    assert main(["export", str(folder), str(tmp_path / "w.safetensors")]) == 0
    _same_weights(chimle.load("sr8-small"), chimle.load(tmp_path / "w.safetensors"))
    assert model_card(tmp_path / "w.safetensors")["summary"] == model_card("sr8-small")["summary"]


@pytest.mark.parametrize(
    "broken, message",
    [
        ("no_weights", "model folder '{f}' has no model.safetensors"),
        ("no_config", "model folder '{f}' has no config.json"),
        ("bad_json", "'{f}/config.json' is not valid JSON"),
        ("empty", "'{f}' is a folder with no model.safetensors"),
    ],
)
def test_a_broken_folder_is_one_line_naming_it(tmp_path, capsys, broken, message):
    folder = tmp_path / "m"
    if broken == "empty":
        folder.mkdir()
    else:
        save_pretrained(TowerModel(TowerConfig.preset("tiny", levels=1)), folder)
        if broken == "bad_json":
            (folder / "config.json").write_text('{"model": ')
        else:
            (folder / ("model.safetensors" if broken == "no_weights" else "config.json")).unlink()
    expected = message.format(f=folder)
    with pytest.raises(CheckpointError) as e:
        chimle.load(folder)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
    assert main(["sample", str(folder), str(tmp_path), "--num", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chimle sample: error: {expected}") and err.count("\n") == 1, err
