"""Training pipeline: config validation, loss goes down, exact resume (and what resume refuses),
bounded checkpoints, crash-safe writes, export, every task end to end."""

from pathlib import Path

import pytest
import torch

from chimle import search
from chimle.data.imageio import load_image, read_csv_columns, save_image
from chimle.inference import weights as checkpoint
from chimle.inference.sample import generate
from chimle.loss import level_losses
from chimle.rng import seeded
from chimle.training.config import ConfigError, dump_config, load_config
from chimle.training.trainer import ConfigChanged, Trainer, train_or_reuse

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


def tiny_cfg(photo_dir, out, **extra):
    base = {
        "name": "t",
        "out": str(out),
        "preset": "tiny",
        "data.task": "sr",
        "data.scale": 4,
        "data.crop": 16,
        "data.data": str(photo_dir),
        "search.samples_per_level": [3, 2],
        "search.num_samples": 4,
        "search.distance": "alex",
        "train.steps": 12,
        "train.pool_size": 6,
        "train.steps_per_round": 5,
        "train.batch_size": 2,
        "train.checkpoint_every": 5,
        "train.sample_every": 0,
        "train.lr": 1e-3,
        "train.grid_inputs": 2,
        "train.grid_samples": 2,
        "train.device": "cpu",
    }
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
    tr.pool = tr.search_pool()
    x, y, _ = tr.pool.batch([0, 1, 2], tr.device)

    def imle_loss():  # the training objective: distance of the best of a fixed set of codes
        codes, _ = search.flat(tr.model, x, y, tr.distance, 8, seeded(1))
        with torch.no_grad():
            return float(level_losses(tr.model(x, codes), x, y, tr.distance, tr.task.rgb).sum(1).mean())

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
    la, lb = read_csv_columns(tmp_path / "a" / "log.csv"), read_csv_columns(tmp_path / "b" / "log.csv")
    assert la["step"] == lb["step"] == list(range(1, 13))  # the resumed log continues the first part's
    assert la["loss"] == lb["loss"]  # identical, step for step, across a search-round boundary
    for (k, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), k


def test_init_from_fine_tunes_a_trained_tower_and_refuses_another(photo_dir, tmp_path):
    src = Trainer(tiny_cfg(photo_dir, tmp_path / "a", **{"train.steps": 3}), quiet=True)
    src.run()
    ckpt = str(tmp_path / "a" / "checkpoints" / "last.pt")
    ft = Trainer(tiny_cfg(photo_dir, tmp_path / "b", **{"train.init_from": ckpt, "train.seed": 1}), quiet=True)
    assert ft.step == 0 and ft.opt.state == {}  # fresh optimizer and step count
    for (k, p), q in zip(src.model.state_dict().items(), ft.model.state_dict().values()):
        assert torch.equal(p, q), k
    fresh = Trainer(tiny_cfg(photo_dir, tmp_path / "c", **{"train.seed": 1}), quiet=True)
    assert not all(torch.equal(p, q) for p, q in zip(fresh.model.parameters(), ft.model.parameters()))
    ft.run()
    assert read_csv_columns(tmp_path / "b" / "log.csv")["step"][-1] == 12
    larger = Trainer(tiny_cfg(photo_dir, tmp_path / "g", **{"train.init_from": ckpt, "data.crop": 32}), quiet=True)
    assert larger.model_cfg.input_size != src.model_cfg.input_size  # another crop is the same tower
    assert torch.equal(next(larger.model.parameters()), next(src.model.parameters()))
    with pytest.raises(ConfigError, match=r"train.init_from .* another tower .*blocks"):
        Trainer(tiny_cfg(photo_dir, tmp_path / "d", **{"train.init_from": ckpt, "model.blocks": 3}), quiet=True)
    with pytest.raises(ConfigError, match="is a sr model; this config trains colorize"):
        Trainer(tiny_cfg(photo_dir, tmp_path / "e", **{"train.init_from": ckpt, "data.task": "colorize"}), quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match="nope.pt"):
        Trainer(tiny_cfg(photo_dir, tmp_path / "f", **{"train.init_from": str(tmp_path / "nope.pt")}), quiet=True)
    (tmp_path / "a" / "checkpoints" / "last.pt").unlink()  # a fine-tune resumes without its source
    again = {"train.init_from": ckpt, "train.seed": 1, "train.steps": 14}
    resumed = Trainer(tiny_cfg(photo_dir, tmp_path / "b", **again), resume=True, quiet=True)
    assert resumed.step == 12


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
    cfg = tiny_cfg(photo_dir, tmp_path, **{"search.method": "cimle", "search.zero_code_rounds": 1, "train.steps": 8})
    tr = Trainer(cfg, quiet=True)
    tr.run()
    assert tr.round == 1
    assert float(tr.pool.codes[0].style.abs().sum()) > 0  # round 1 searched real codes
    tr2 = Trainer(cfg, quiet=True)
    tr2.round = 0
    pool = tr2.search_pool()
    assert all(float(c.style.abs().sum() + c.noise.abs().sum()) == 0 for c in pool.codes)  # round 0: z = 0


@pytest.mark.parametrize(
    "extra", [{}, {"search.method": "cimle"}, {"search.ablation": "no_ic_pe"}, {"search.ablation": "no_ic_pe_cd"}]
)
def test_checkpoint_stores_recipe_and_replays_codes(photo_dir, tmp_path, extra):
    """The checkpoint keeps the winners, not the codes; resume redraws the same codes bit for bit."""
    tr = Trainer(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 3, **extra}), quiet=True)
    tr.run()
    state = checkpoint.load_state(tr.checkpoint_path)
    assert set(state["pool"]) == {"round", "picks", "dists"} and state["pool"]["picks"].shape[0] == 6
    assert "history" not in state and set(state["last"]) == {"loss", "level1", "level2"}
    back = Trainer(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 3, **extra}), resume=True, quiet=True)
    for a, b in zip(tr.pool.codes, back.pool.codes, strict=True):
        assert torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise)
    assert torch.equal(tr.pool.inputs, back.pool.inputs) and torch.equal(tr.pool.targets, back.pool.targets)


def test_checkpoint_size_does_not_grow_with_pool_or_steps(photo_dir, tmp_path):
    sizes = {}
    for pool, steps in ((6, 3), (60, 3), (6, 30)):
        tr = Trainer(
            tiny_cfg(photo_dir, tmp_path / f"{pool}-{steps}", **{"train.pool_size": pool, "train.steps": steps}),
            quiet=True,
        )
        tr.run()
        sizes[pool, steps] = tr.checkpoint_path.stat().st_size
    # codes of 60 crops would add 60 x (8 + 2*4*4 + 8 + 2*8*8) floats = 50 KB; the recipe adds < 1 KB
    assert sizes[60, 3] - sizes[6, 3] < 2000, sizes
    assert abs(sizes[6, 30] - sizes[6, 3]) < 2000, sizes  # no per-step history


def test_resume_refuses_a_changed_trajectory(photo_dir, tmp_path):
    Trainer(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 2}), quiet=True).run()
    changed = tiny_cfg(photo_dir, tmp_path, **{"train.seed": 1, "search.samples_per_level": [4, 2]})
    with pytest.raises(ValueError) as e:
        Trainer(changed, resume=True, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "train.seed: 0 -> 1" in msg and "search.samples_per_level: [3, 2] -> [4, 2]" in msg
    assert "train.steps:" not in msg  # 2 -> 12 is allowed, so not listed
    longer = Trainer(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 4}), resume=True, quiet=True)  # extending is fine
    assert longer.step == 2


def test_train_or_reuse_leaves_finished_runs_and_names_the_folder(photo_dir, tmp_path):
    """What reports and ablations train with: a finished run is left untouched, a longer one continues it,
    and one with other settings is refused naming the folder (their caller never said --resume)."""
    train_or_reuse(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 2}), quiet=True)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    written = ckpt.stat().st_mtime_ns
    assert train_or_reuse(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 2}), quiet=True).step == 2
    assert ckpt.stat().st_mtime_ns == written
    with pytest.raises(ConfigChanged) as e:
        train_or_reuse(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 2, "train.seed": 1}), quiet=True)
    msg = str(e.value)
    assert msg.startswith(f"'{tmp_path}' holds a run trained with other settings (train.seed: 0 -> 1)")
    assert "--resume" not in msg and "\n" not in msg and e.value.changes == ["train.seed: 0 -> 1"]
    assert train_or_reuse(tiny_cfg(photo_dir, tmp_path, **{"train.steps": 3}), quiet=True).step == 3


def test_generate_leaves_the_model_mode_as_it_found_it():
    from chimle.model import TowerConfig, TowerModel

    model = TowerModel(TowerConfig.preset("tiny", layout="upscale", levels=2))
    x = torch.rand(1, 3, 4, 4)
    for mode in (True, False):
        model.train(mode)
        generate(model, x, 2, seeded(0))
        assert model.training is mode


@pytest.mark.parametrize("task,extra", [("colorize", {}), ("jpeg", {"data.quality": 5}), ("night", {}), ("paired", {})])
def test_every_same_layout_task_trains_and_samples(photo_dir, tmp_path, task, extra):
    """End to end on the "same" layout: a few steps, then `chimle sample` on one of the photos."""
    from chimle.apps.cli import main

    data = photo_dir
    cfg_extra = {"data.task": task, "data.crop": 16, "search.samples_per_level": [3, 2, 2], **extra}
    if task == "paired":  # real pairs: darker copies of the photos as inputs, matched by name
        data = tmp_path / "inputs"
        data.mkdir()
        for p in sorted(photo_dir.iterdir()):
            save_image(load_image(p) * 0.5, data / p.name)
        cfg_extra["data.target"] = str(photo_dir)
    cfg = tiny_cfg(data, tmp_path / "run", **{"train.steps": 3, **cfg_extra})
    tr = Trainer(cfg, quiet=True)
    assert tr.model_cfg.layout == "same" and tr.model_cfg.in_channels == (1 if task == "colorize" else 3)
    last = tr.run()
    assert last["loss"] > 0 and (tmp_path / "run" / "samples" / "step_0000003.png").exists()
    photo = sorted(photo_dir.iterdir())[0]
    assert main(["sample", str(tr.checkpoint_path), str(photo), "--num", "2", "--out", str(tmp_path / "s")]) == 0
    out = load_image(tmp_path / "s" / f"{photo.stem}_000.png")
    assert out.shape == load_image(photo).shape  # same layout: the output has the input's size
    if task == "colorize":  # the sample keeps the photo's lightness (the model predicts only ab)
        from chimle.data.tasks import rgb_to_l01

        assert (rgb_to_l01(out) - rgb_to_l01(load_image(photo))).abs().mean() < 0.02
