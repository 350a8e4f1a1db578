"""`TowerConfig.style_grid`: a G x G grid of style vectors per level, so the AdaINs' modulation differs by region.

G = 1 is the papers' tower, bit for bit; with G > 1 a change of one grid cell changes its region of the output and
not the far side of the image; the search, training, export, tiling and ONNX take the grid's codes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chimle import latent, search
from chimle.inference import codefile, guide
from chimle.inference import weights as checkpoint
from chimle.inference.tiling import tile_starts, tiled_forward
from chimle.latent import Component
from chimle.model import TowerConfig, TowerModel, style_map
from chimle.training.config import dump_config, load_config
from chimle.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting

HW = {"same": (16, 16), "upscale": (4, 6)}


def tiny(layout="same", grid=4, gain=1.0, seed=0, **extra):
    """The tiny tower; `gain` scales the AdaIN style layers (they start near zero, so an untrained tower's
    style barely shows)."""
    torch.manual_seed(seed)
    model = TowerModel(TowerConfig.preset("tiny", layout=layout, style_grid=grid, **extra)).eval()
    with torch.no_grad():
        for level in model.levels:
            for s in level.styles:
                s.weight.mul_(gain)
    return model


def test_grid_1_is_the_tower_without_the_option():
    for layout, hw in HW.items():
        torch.manual_seed(0)
        plain = TowerModel(TowerConfig.preset("tiny", layout=layout)).eval()
        one = tiny(layout, grid=1)
        a, b = plain.state_dict(), one.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        codes = plain.sample_codes(2, torch.Generator().manual_seed(1), input_hw=hw)
        assert tuple(codes[0].style.shape) == (2, 8)  # one style vector per level, as before
        x = torch.rand(2, 3, *hw)
        with torch.no_grad():
            assert all(torch.equal(p, q) for p, q in zip(plain(x, codes), one(x, codes)))
        assert "style_grid" not in one.cfg.to_dict() and one.cfg.to_dict() == plain.cfg.to_dict()
    # the grid adds no parameter: the mapping networks and style layers act on every cell
    four = tiny(grid=4).state_dict()
    assert {k: v.shape for k, v in four.items()} == {k: v.shape for k, v in tiny(grid=1).state_dict().items()}
    cfg = TowerConfig.preset("tiny", style_grid=4)
    assert cfg.to_dict()["style_grid"] == 4 and TowerConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="style_grid"):
            TowerConfig.preset("tiny", style_grid=bad)


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_grid_codes_and_outputs_have_the_right_shapes(layout):
    model, hw = tiny(layout, grid=4), HW[layout]
    layout_ = model.latent_layout(hw)
    codes = model.sample_codes(3, torch.Generator().manual_seed(0), input_hw=hw)
    assert [tuple(c.style.shape) for c in codes] == [(3, 8, 4, 4)] * 3
    assert layout_.dims() == [8 * 16 + 2 * h * w for h, w in layout_.sizes]
    with torch.no_grad():
        outs = model(torch.rand(3, 3, *hw), codes)
    assert [tuple(o.shape[-2:]) for o in outs] == model.cfg.output_sizes(*hw) and outs[-1].shape[:2] == (3, 3)
    z = latent.flatten(codes)
    assert z.shape == (3, sum(layout_.dims()))
    back = latent.unflatten(z, layout_)
    assert all(torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise) for a, b in zip(codes, back))
    assert [tuple(c.style.shape) for c in layout_.zeros(2)] == [(2, 8, 4, 4)] * 3
    frames = latent.interpolate(latent.index(codes, [0]), latent.index(codes, [1]), 3)
    assert frames[1][0].style.shape == (1, 8, 4, 4)
    assert latent.repeat(codes, 2)[0].style.shape == (6, 8, 4, 4) and latent.cat([codes, codes])[2].style.shape[0] == 6
    with pytest.raises(ValueError, match="style_grid"):
        latent.to_authors(codes)
    with pytest.raises(ValueError, match="style_grid"):
        latent.from_authors(latent.to_authors(tiny(layout, grid=1).sample_codes(1, input_hw=hw)), layout_)


def _quadrant_ratio(grid: int) -> float:
    """Mean change of the top-left quadrant of the output over that of the bottom-right one, when the
    top-left cell of every level's style grid (G = 1: the whole style vector) is drawn again."""
    model, hw = tiny("same", grid=grid, gain=100), (32, 32)
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    codes = model.sample_codes(1, torch.Generator().manual_seed(2), input_hw=hw)
    g = torch.Generator().manual_seed(5)
    changed = []
    for c in codes:
        style = c.style.clone()
        cell = (slice(None), slice(None), 0, 0) if grid > 1 else (slice(None),)
        style[cell] = torch.randn(style[cell].shape, generator=g)
        changed.append(Component(style, c.noise))
    with torch.no_grad():
        d = (model(x, codes)[-1] - model(x, changed)[-1]).abs()
    assert d.max() > 0.01  # the change shows at all
    return float(d[..., :16, :16].mean() / d[..., 16:, 16:].mean())


def test_one_grid_cell_changes_its_region():
    # measured: 30 for G = 4 (0 would be a cell that reaches nothing; far from it the change is through the
    # statistics and the receptive field only); 1.0 for G = 1, whose style is the same everywhere
    assert _quadrant_ratio(4) > 3
    assert 0.5 < _quadrant_ratio(1) < 2


def test_style_map_window_is_the_crop_of_the_whole_map():
    grid = torch.randn(2, 5, 4, 4)
    full = F.interpolate(grid, size=(37, 23), mode="bilinear", align_corners=False)
    for y0, x0, h, w in ((0, 0, 37, 23), (5, 3, 10, 8), (30, 15, 7, 8)):
        window = style_map(grid, (h, w), (y0, x0, 37, 23))
        assert (window - full[..., y0 : y0 + h, x0 : x0 + w]).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_search_and_guided_search_on_a_grid(layout):
    model, hw = tiny(layout, grid=4, gain=10), HW[layout]
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = model(x, model.sample_codes(2, torch.Generator().manual_seed(9), input_hw=hw))[-1]

    def mse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    for found in (
        search.hierarchical(model, x, y, mse, [4, 3, 2], torch.Generator().manual_seed(3)),
        search.flat(model, x, y, mse, 5, torch.Generator().manual_seed(3)),
    ):
        assert [tuple(c.style.shape) for c in found.codes] == [(2, 8, 4, 4)] * 3
        with torch.no_grad():
            assert torch.allclose(mse(model(x, found.codes)[-1], y), found.dists, atol=1e-5)
    # the explorer's guided search, with its refinement of the flat code (style and noise parts)
    hint, mask = y[:1], torch.ones(1, 1, *y.shape[-2:])
    opts = guide.GuideOptions(k=2, refine_steps=2)
    got = guide.guided_search(model, x[:1], hint, mask, [4, 2, 2], torch.Generator().manual_seed(4), options=opts)
    assert [tuple(c.style.shape) for c in got.codes] == [(2, 8, 4, 4)] * 3 and torch.isfinite(got.distances).all()


def test_code_files_check_the_grid(tmp_path):
    model, hw = tiny("same", grid=4), (16, 16)
    x = torch.rand(1, 3, *hw)
    codes = model.sample_codes(1, torch.Generator().manual_seed(0), input_hw=hw)
    codefile.save_code(tmp_path / "c.npz", codes)
    back, _ = codefile.load_code(tmp_path / "c.npz")
    assert all(torch.equal(a.style, b.style) for a, b in zip(codes, back))
    codefile.check_code(model, back, x)
    with pytest.raises(ValueError, match="does not fit this model"):
        codefile.check_code(model, tiny("same", grid=1).sample_codes(1, input_hw=hw), x)


@pytest.fixture(scope="module")
def trained(photo_dir, tmp_path_factory):
    """Three steps of a tiny colourisation tower with a 4 x 4 style grid, set as `--set model.style_grid=4`."""
    out = tmp_path_factory.mktemp("grid_run")
    base = {
        "name": "g",
        "out": str(out),
        "preset": "tiny",
        "data.task": "colorize",
        "data.crop": 16,
        "data.data": str(photo_dir),
        "search.samples_per_level": [3, 2, 2],
        "search.num_samples": 4,
        "search.distance": "alex",
        "train.steps": 3,
        "train.pool_size": 4,
        "train.steps_per_round": 3,
        "train.batch_size": 2,
        "train.checkpoint_every": 2,
        "train.sample_every": 0,
        "train.lr": 1e-3,
        "train.grid_inputs": 2,
        "train.grid_samples": 2,
        "train.device": "cpu",
    }
    cfg = load_config(base=base, overrides=["model.style_grid=4", "train.steps=2"])
    tr = Trainer(cfg, quiet=True)
    assert tr.model_cfg.style_grid == 4 and "style_grid: 4" in dump_config(cfg)
    first = tr.run()
    resumed = Trainer(load_config(base=base, overrides=["model.style_grid=4"]), resume=True, quiet=True)
    assert resumed.step == 2
    last = resumed.run()
    return tr, resumed, first, last, out


def test_a_grid_tower_trains_and_resumes(trained, tmp_path):
    tr, resumed, first, last, out = trained
    assert math.isfinite(first["loss"]) and math.isfinite(last["loss"]) and resumed.step == 3
    assert resumed.model.cfg.style_grid == 4
    # the same option from a YAML file
    (tmp_path / "c.yaml").write_text("preset: tiny\ndata:\n  task: colorize\nmodel:\n  style_grid: 4\n")
    assert load_config(tmp_path / "c.yaml").model == {"style_grid": 4}


def test_a_grid_tower_round_trips_through_safetensors(trained, tmp_path):
    from chimle.apps.cli import main

    _, resumed, _, _, _ = trained
    dest = tmp_path / "grid.safetensors"
    assert main(["export", str(resumed.checkpoint_path), str(dest)]) == 0
    model, task = checkpoint.load_with_task(dest)
    assert model.cfg == resumed.model.cfg and model.cfg.style_grid == 4
    assert task["name"] == "colorize"
    x = torch.rand(2, 1, 32, 32)  # lightness
    codes = model.sample_codes(2, torch.Generator().manual_seed(0), input_hw=(32, 32))
    with torch.no_grad():
        ref = resumed.model.eval()(x, codes)[-1]
        assert torch.equal(model(x, codes)[-1], ref)


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_tiles_read_their_window_of_the_style_grid(photos, layout):
    """Tiled inference with whole-image statistics equals the untiled pass away from the seams: each tile
    uses its window of the grid's gamma and beta, not the whole grid stretched over the tile."""
    from chimle.resample import resize

    model = tiny(layout, grid=2, gain=30)
    hw, tile, overlap, margin = {"same": ((96, 64), 64, 16, 20), "upscale": ((40, 24), 24, 8, 8)}[layout]
    x = torch.cat([resize(p[None], hw) for p in photos[:1]])
    codes = model.sample_codes(1, torch.Generator().manual_seed(1), input_hw=hw)
    with torch.no_grad():
        ref = model(x, codes)[-1]
    y = tiled_forward(model, x, codes, tile, overlap, stats="full")
    align, s = (4 if layout == "same" else 1), model.cfg.scale
    far = []
    for size in hw:  # output pixels at least `margin` input px from every tile edge inside the image
        t = min(tile, size)
        edges = {e for s0 in tile_starts(size, t, overlap, align) for e in (s0, s0 + t)} - {0, size}
        idx = torch.arange(size * s) / s
        far.append(torch.stack([(idx - e).abs() for e in edges]).amin(0) >= margin if edges else idx >= 0)
    far = far[0][:, None] & far[1][None, :]
    assert far.float().mean() > 0.2
    assert (y - ref).abs()[..., far].max() < 1e-5


def test_onnx_export_takes_the_grid(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'chimle[onnx]'")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'chimle[onnx]'")
    from chimle.inference.onnx_export import export_onnx, onnx_feed

    model = tiny("upscale", grid=2, gain=100)
    path = export_onnx(model, tmp_path / "g.onnx", size=(4, 6))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for hw, n in (((4, 6), 1), ((6, 5), 3)):  # the graph's size and batch are dynamic
        x = torch.rand(n, 3, *hw)
        codes = model.sample_codes(n, torch.Generator().manual_seed(1), input_hw=hw)
        with torch.no_grad():
            ref = model(x, codes)[-1].numpy()
        out = session.run(["output"], onnx_feed(x, codes))[0]
        assert out.shape == ref.shape and np.ptp(ref) > 0.1 and np.abs(out - ref).max() < 1e-4
