"""Scene layouts as a task (cIMLE Sect. 4.2): label maps in, one-hot encoding, palettes, bad input,
the noise encoder wired into the tower and the search, rebalancing in the pool and the loss, and a
tiny end-to-end train + sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chimle import latent
from chimle.apps.cli import main as cli
from chimle.data import layouts
from chimle.data.dataset import ImageDataset
from chimle.data.imageio import ImageError, load_image
from chimle.data.tasks import make_task
from chimle.loss import l2
from chimle.model import TowerConfig, TowerModel
from chimle.search import flat, hierarchical, reference_hierarchical
from chimle.training.config import ConfigError, load_config
from chimle.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(40, 120, 40), (120, 160, 230), (150, 110, 70), (220, 60, 50)]  # grass, sky, earth, a red object


def _save_ids(path, ids: np.ndarray, mode: str = "L") -> None:
    """Class ids as a grey PNG, or as a palette-mode PNG (indices = ids, shown in COLOURS)."""
    a = np.ascontiguousarray(ids.astype(np.uint8))
    img = Image.frombytes(mode, (a.shape[1], a.shape[0]), a.tobytes())
    if mode == "P":
        img.putpalette([v for c in COLOURS for v in c])
    img.save(path)


def synthetic_scenes(root, n: int = 6, side: int = 32, seed: int = 0, red_in: tuple[int, ...] = (0,)):
    """n label maps (ids 0-3, a void border of 255) and their photos: each class a colour (shifted a
    little per image) with pixel noise; class 3 (a red object) appears only in the images `red_in`."""
    rng = np.random.default_rng(seed)
    (root / "labels").mkdir(parents=True)
    (root / "photos").mkdir()
    for k in range(n):
        ids = np.zeros((side, side), np.int64)
        ids[: side // 3] = 1  # sky on top
        ids[side // 3 : side // 2] = 2
        if k in red_in:
            ids[side // 2 :, : side // 2] = 3
        ids[:, -2:] = 255  # void
        colours = np.array(COLOURS, np.float64) + rng.normal(0, 8, (4, 3))  # each image's own shades
        photo = colours[ids.clip(0, 3)] + rng.normal(0, 12, (side, side, 3))
        photo[ids == 255] = 0
        _save_ids(root / "labels" / f"s{k}.png", ids)
        Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(root / "photos" / f"s{k}.png")
    return root / "labels", root / "photos"


# -- input: one-hot, palettes, bad files -----------------------------------------------------------


def test_one_hot_with_void_and_detected_classes(tmp_path):
    labels, _ = synthetic_scenes(tmp_path)
    assert layouts.count_classes(labels) == 4  # ids 0..3, 255 is void
    task = make_task("layout", num_classes=4)
    x = task.read_input(labels / "s0.png")
    assert x.shape == (4, 32, 32) and task.in_channels == 4
    assert torch.equal(x[:, 0, 0], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # sky
    assert torch.equal(x[:, -1, 0], torch.tensor([0.0, 0.0, 0.0, 1.0]))  # the red object
    assert x[:, :, -1].abs().sum() == 0  # void: no class
    ids = task.labels(x)
    assert ids[0, 0] == 1 and ids[-1, 0] == 3 and ids[0, -1] == -1
    pic = task.show_input(x)
    assert pic.shape == (3, 32, 32) and not torch.equal(pic[:, 0, 0], pic[:, -1, 0]) and pic[:, 0, -1].sum() == 0


def test_palette_png_and_colour_maps_with_a_palette_file(tmp_path):
    ids = np.array([[0, 1], [2, 3]])
    _save_ids(tmp_path / "p.png", ids, mode="P")  # a palette-mode PNG holds the ids as its indices
    task = make_task("layout", num_classes=4)
    assert torch.equal(task.labels(task.read_input(tmp_path / "p.png")), torch.tensor(ids))
    rgb = np.array(COLOURS, np.uint8)[ids]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    pal = tmp_path / "palette.txt"
    pal.write_text("# id r g b\n" + "\n".join(f"{k} {r} {g} {b}" for k, (r, g, b) in enumerate(COLOURS)) + "\n")
    task = make_task("layout", num_classes=4, palette=str(pal))
    assert torch.equal(task.labels(task.read_input(tmp_path / "c.png")), torch.tensor(ids))
    assert torch.allclose(task.colours()[3], torch.tensor(COLOURS[3]) / 255.0)
    rgb[1, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(ImageError, match=r"bad.png.*colour \(1, 2, 3\) at pixel \(x=0, y=1\) is not in the palette"):
        task.read_input(tmp_path / "bad.png")
    with pytest.raises(ImageError, match="needs a palette file"):
        make_task("layout", num_classes=4).read_input(tmp_path / "c.png")
    pal.write_text("0 1 2\n")
    with pytest.raises(ImageError, match=r"palette.txt.*line 1: expected 'id r g b'"):
        make_task("layout", num_classes=4, palette=str(pal))


def test_bad_layout_inputs_name_the_file(tmp_path):
    labels, photos = synthetic_scenes(tmp_path)
    task = make_task("layout", num_classes=3)  # id 3 is now out of range
    with pytest.raises(ImageError, match=r"s0.png.*class id 3 at pixel \(x=0, y=16\) is outside 0..2"):
        task.read_input(labels / "s0.png")
    task = make_task("layout", num_classes=4)
    Image.open(photos / "s1.png").resize((40, 32)).save(photos / "s1.png")
    with pytest.raises(ImageError, match=r"labels/s1.png.*input is 32x32 but its target .*s1.png' is 32x40"):
        ImageDataset(photos, task, crop=16, levels=2, input_root=labels)
    (labels / "extra.png").write_bytes((labels / "s2.png").read_bytes())
    with pytest.raises(ValueError, match=r"no partner with the same name.*extra \(input only\)"):
        ImageDataset(photos, task, crop=16, levels=2, input_root=labels)


# -- the noise encoder ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_tower():
    torch.manual_seed(0)
    cfg = TowerConfig.preset("tiny", levels=2, in_channels=4, noise_encoder=True, encoder_noise=3)
    model = TowerModel(cfg).eval()
    ids = torch.zeros(3, 16, 16, dtype=torch.long)
    ids[:, 8:] = torch.arange(3).view(3, 1, 1) + 1  # three layouts: the lower half is class 1, 2 or 3
    x = torch.stack([make_task("layout", num_classes=4).one_hot(i) for i in ids])
    return model, x, torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_noise_encoder_maps_low_dimensional_noise_to_the_noise_channels(encoder_tower):
    model, x, _ = encoder_tower
    layout = model.latent_layout((16, 16))
    assert layout.noise_channels == 3  # the code holds the low-dimensional noise
    codes = layout.sample(3, torch.Generator().manual_seed(0))
    enc = model.levels[1].noise_encoder
    raw = enc(x, codes[1].noise)
    assert raw.shape == (3, model.cfg.noise_channels, 16, 16)  # the raw noise's shape
    other = [codes[0], latent.Component(codes[1].style, torch.randn(3, 3, 16, 16))]
    with torch.no_grad():
        a, b = model(x, codes)[-1], model(x, other)[-1]
    assert (a - b).abs().mean() > 1e-3  # the output moves with the encoder's noise
    assert "noise_encoder" not in TowerConfig.preset("tiny").to_dict()


def test_searches_over_the_encoder_noise_find_the_argmin(encoder_tower):
    model, x, y = encoder_tower
    codes, dists = flat(model, x, y, l2, 5, torch.Generator().manual_seed(3))
    cands = model.latent_layout((16, 16)).sample(3 * 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(3):
            outs = [model(x[i : i + 1], latent.index(cands, [i * 5 + r]))[-1] for r in range(5)]
            ds = torch.stack([l2(o, y[i : i + 1])[0] for o in outs])
            assert torch.equal(codes[-1].noise[i], cands[-1].noise[i * 5 + int(ds.argmin())])
            assert abs(float(dists[i]) - float(ds.min())) < 1e-6
    got, d = hierarchical(model, x, y, l2, [4, 3], torch.Generator().manual_seed(5))
    ref, d_ref = reference_hierarchical(model, x, y, l2, [4, 3], torch.Generator().manual_seed(5))
    assert all(torch.equal(p.noise, q.noise) for p, q in zip(got, ref))
    torch.testing.assert_close(d, d_ref, atol=1e-6, rtol=1e-5)


# -- rebalancing ----------------------------------------------------------------------------------


def test_a_rare_category_is_drawn_more_and_weighs_more(tmp_path):
    """Class 2 ("earth") has one colour in 19 images and another in image 5: by the KDE of its mean
    colours (Sect. 4.2.3) image 5 is rare for it, R_2(5) = 1 / D_2(c_5(2)) >> R_2(k), so it is drawn
    more often (P(k) = sum_p R_p(k) / sum_k' R_p(k') / top_k) and its earth pixels weigh more."""
    n = 20
    labels, photos = synthetic_scenes(tmp_path, n=n, red_in=tuple(range(n)))
    img = np.asarray(Image.open(photos / "s5.png")).copy()
    ids = np.asarray(Image.open(labels / "s5.png"))
    img[ids == 2] = (60, 60, 200)
    Image.fromarray(img).save(photos / "s5.png")
    task = make_task("layout", num_classes=4)
    segs = [task.labels(task.read_input(labels / f"s{k}.png")) for k in range(n)]
    ys = [load_image(photos / f"s{k}.png") for k in range(n)]
    stats = layouts.category_mean_colours(segs, ys, ignore_index=-1)
    rarity = layouts.rarity_weights(stats, n, 4)
    others = torch.cat([rarity[:5, 2], rarity[6:, 2]])
    assert rarity[5, 2] > others.max() and rarity[5, 2] > 2.5 * others.mean()
    p = layouts.sampling_weights(rarity, stats, top_k=4)
    share = rarity / rarity.sum(0)  # per category: P(k | p) in proportion to R_p(k)
    torch.testing.assert_close(p, share.mean(1))  # equal portions for the 4 categories
    assert int(share[:, 2].argmax()) == 5 and float(p.sum()) == pytest.approx(1.0)
    m5 = layouts.loss_weight_map(segs[5], rarity[5])[0, 0]
    m0 = layouts.loss_weight_map(segs[0], rarity[0])[0, 0]
    # M^k = R_p(k) per pixel / max: earth weighs more against the sky in the rare image than in another
    ratio5 = m5[segs[5] == 2].mean() / m5[segs[5] == 1].mean()
    ratio0 = m0[segs[0] == 2].mean() / m0[segs[0] == 1].mean()
    assert float(ratio5) == pytest.approx(float(rarity[5, 2] / rarity[5, 1]), rel=1e-5)
    assert ratio5 > 2 * ratio0 and m5[segs[5] == -1].sum() == 0 and float(m5.max()) == 1.0


# -- end to end -----------------------------------------------------------------------------------


def test_runs_saved_before_the_layout_options_still_resume():
    import yaml

    from chimle.training.checkpoint import trajectory_changes
    from chimle.training.config import dump_config

    current = dump_config(load_config(base={"data.task": "sr", "data.data": "photos"}))
    saved = yaml.safe_load(current)
    for key in ("num_classes", "ignore_index", "palette", "rebalance"):
        del saved["data"][key]  # what an older chimle wrote
    del saved["train"]["loss_rebalance"]
    assert trajectory_changes(yaml.safe_dump(saved), current) == []
    saved["data"]["rebalance"] = True
    assert trajectory_changes(yaml.safe_dump(saved), current) == ["data.rebalance: True -> False"]


def test_layout_config_checks():
    with pytest.raises(ConfigError, match="for the layout task"):
        load_config(base={"data.task": "sr", "data.rebalance": True})
    with pytest.raises(ConfigError, match="loss_rebalance weights the feature differences of vgg_l1 or pixel_vgg"):
        load_config(base={"data.task": "layout", "train.loss_rebalance": True, "search.distance": "alex"})


def test_train_and_sample_layouts_end_to_end(tmp_path, capsys):
    labels, photos = synthetic_scenes(tmp_path, n=6, red_in=(0,))
    cfg = load_config(
        base={
            "out": str(tmp_path / "run"),
            "preset": "tiny",
            "model": {"levels": 2, "noise_encoder": True, "encoder_noise": 2},
            "data.task": "layout",
            "data.data": str(labels),
            "data.target": str(photos),
            "data.crop": 16,
            "data.rebalance": True,
            "search.distance": "vgg_l1",
            "search.samples_per_level": [3, 2],
            "train.loss_rebalance": True,
            "train.steps": 6,
            "train.pool_size": 12,
            "train.steps_per_round": 3,
            "train.batch_size": 2,
            "train.checkpoint_every": 6,
            "train.sample_every": 0,
        }
    )
    tr = Trainer(cfg, quiet=True)
    assert cfg.data.num_classes == 4 and tr.model.cfg.in_channels == 4  # counted from the label maps
    # dataset rebalancing: the only image with the red object fills more of the pool than 1/6
    _, _, masks = tr.pool_crops(0)
    order = layouts.sample_pool(tr.rarity, tr.layout_stats, 600, min(5, len(tr.layout_stats)))
    assert (order == 0).float().mean() > 1 / 6 + 0.05
    assert masks.shape == (12, 1, 16, 16) and float(masks.max()) == 1.0 and float(masks.min()) == 0.0
    tr.run()
    assert tr.step == 6 and np.isfinite(tr.last["loss"])
    out = tmp_path / "samples"
    assert cli(["sample", str(tr.checkpoint_path), str(labels / "s0.png"), "--num", "3", "--out", str(out)]) == 0
    samples = [load_image(out / f"s0_{k:03d}.png") for k in range(3)]
    assert all(s.shape == (3, 32, 32) for s in samples)  # the whole 32 px map, not the 16 px crop
    assert (samples[0] - samples[1]).abs().mean() > 1e-3  # different outputs for one layout
    assert (out / "s0_grid.png").exists()
    assert cli(["sample", str(tr.checkpoint_path), str(photos / "s0.png"), "--num", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # a photo given as a label map: one line naming it
    assert "s0.png" in err and "needs a palette file" in err and err.count("\n") == 1
