"""Training pipeline: config validation, loss goes down, exact resume, crash-safe checkpoints, export."""

from pathlib import Path

import pytest
import torch

from chimle import checkpoint, search
from chimle.config import ConfigError, dump_config, load_config
from chimle.train import Trainer, level_losses, seeded


def tiny_cfg(photo_dir, out, **extra):
    base = {"name": "t", "out": str(out), "preset": "tiny", "data.task": "sr", "data.scale": 4, "data.crop": 16,
            "data.data": str(photo_dir), "search.samples_per_level": [3, 2], "search.num_samples": 4,
            "search.distance": "alex", "train.steps": 12, "train.pool_size": 6, "train.steps_per_round": 5,
            "train.batch_size": 2, "train.checkpoint_every": 5, "train.sample_every": 0, "train.lr": 1e-3,
            "train.grid_inputs": 2, "train.grid_samples": 2, "train.device": "cpu"}
    base.update(extra)
    return load_config(base=base)


def test_config_errors_name_the_key(photo_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(overrides=["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(overrides=["train.steps=many"])
    with pytest.raises(ConfigError, match="search.samples_per_level"):
        load_config(overrides=["search.samples_per_level=[3, 0]"])
    with pytest.raises(ConfigError, match="data.task"):
        load_config(overrides=["data.task=paint"])
    with pytest.raises(ConfigError, match="model.widgets"):
        load_config(overrides=["model.widgets=3"])
    with pytest.raises(ConfigError, match="data.scale"):
        load_config(overrides=["data.scale=6"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(bad)
    cfg = tiny_cfg(photo_dir, tmp_path)
    # the resolved config round-trips: the model fields are written out in full
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert dump_config(load_config(again)) == dump_config(cfg)
    assert cfg.data.scale == 4 and load_config(again).model["levels"] == 2


def test_every_config_in_repo_loads():
    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 4
    for p in configs:
        load_config(p)


def test_training_lowers_imle_loss_on_fixed_batch(photo_dir, tmp_path):
    cfg = tiny_cfg(photo_dir, tmp_path, **{"train.steps": 40, "train.steps_per_round": 10})
    tr = Trainer(cfg, quiet=True)
    x, y = tr.pool_batch([0, 1, 2])

    def imle_loss():  # the training objective: distance of the best of a fixed set of codes
        codes, _ = search.flat(tr.model, x, y, tr.distance, 8, seeded(1))
        with torch.no_grad():
            return float(level_losses(tr.task, tr.distance, tr.model(x, codes), x, y).sum(1).mean())

    before = imle_loss()
    tr.run()
    after = imle_loss()
    assert after < 0.9 * before, (before, after)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "log.csv").exists()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "samples").glob("step_*.png"))


def test_resume_follows_same_trajectory(photo_dir, tmp_path):
    full = Trainer(tiny_cfg(photo_dir, tmp_path / "a"), quiet=True)
    full.run()
    part = Trainer(tiny_cfg(photo_dir, tmp_path / "b", **{"train.steps": 7}), quiet=True)
    part.run()
    resumed = Trainer(tiny_cfg(photo_dir, tmp_path / "b"), resume=True, quiet=True)
    assert resumed.step == 7
    resumed.run()
    la = [h["loss"] for h in full.history]
    lb = [h["loss"] for h in resumed.history]
    assert len(la) == len(lb) == 12
    assert la == lb  # identical, step for step, across a search-round boundary
    for (k, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), k


def test_interrupted_checkpoint_write_keeps_previous(photo_dir, tmp_path, monkeypatch):
    tr = Trainer(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 5}), quiet=True)
    tr.run()
    path = tr.checkpoint_path
    before = checkpoint.load_state(path)["step"]

    def dying_save(obj, f):  # the process "dies" halfway through writing
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    tr.step = 99
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.undo()
    assert checkpoint.load_state(path)["step"] == before == 5
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_export_and_load_by_path_and_name(photo_dir, tmp_path, monkeypatch):
    tr = Trainer(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 2}), quiet=True)
    tr.run()
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "home"))
    out = checkpoint.export(tr.checkpoint_path, checkpoint.weights_dir() / "sr4-tiny.safetensors")
    for ref in (out, "sr4-tiny", tr.checkpoint_path):
        model, task = checkpoint.load_with_task(ref)
        assert task == {"name": "sr", "scale": 4}
        x = torch.rand(1, 3, 4, 4)
        codes = model.sample_codes(1, seeded(0), input_hw=(4, 4))
        with torch.no_grad():
            torch.testing.assert_close(model(x, codes)[-1], tr.model.eval()(x, codes)[-1])
    with pytest.raises(checkpoint.CheckpointError, match="no weights named 'nope'"):
        checkpoint.load("nope")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="bad.pt"):
        checkpoint.load(bad)


def test_cimle_method_and_zero_code_pretraining(photo_dir, tmp_path):
    cfg = tiny_cfg(photo_dir, tmp_path, **{"search.method": "cimle", "search.zero_code_rounds": 1,
                                           "train.steps": 8})
    tr = Trainer(cfg, quiet=True)
    tr.run()
    assert tr.round == 1
    assert float(tr.pool["codes"].abs().sum()) > 0  # round 1 searched real codes
    tr2 = Trainer(cfg, quiet=True)
    tr2.round = 0
    pool = tr2.search_pool()
    assert float(pool["codes"].abs().sum()) == 0  # round 0 trains with z = 0
