"""Tower Implicit Model: shapes, ranges, partial evaluation, the latent division, init, presets."""

import pytest
import torch

import chimle
from chimle import latent
from chimle.model import TowerConfig, TowerModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


def tiny(layout="same", levels=3, **kw):
    torch.manual_seed(0)
    return TowerModel(TowerConfig.preset("tiny", layout=layout, levels=levels, **kw))


@pytest.mark.parametrize("layout", ["same", "upscale"])
@pytest.mark.parametrize("levels", [1, 2, 4])
def test_level_shapes_and_range(layout, levels):
    model = tiny(layout, levels)
    h, w = (16, 24) if layout == "same" else (5, 7)  # non-square, and odd sizes for upscaling
    if layout == "same" and levels == 4:
        h, w = 24, 32
    x = torch.rand(2, 3, h, w)
    outs = model(x, model.sample_codes(2, input_hw=(h, w)))
    assert len(outs) == levels
    expect = model.cfg.output_sizes(h, w)
    for l, o in enumerate(outs):
        assert tuple(o.shape) == (2, 3, *expect[l])
        assert o.min() >= 0 and o.max() <= 1
    if layout == "same":
        assert tuple(outs[-1].shape[-2:]) == (h, w)
        assert [s[0] for s in expect] == [h // 2 ** (levels - 1 - l) for l in range(levels)]
    else:
        assert tuple(outs[-1].shape[-2:]) == (h * 2**levels, w * 2**levels)


def test_colourization_channels():
    model = tiny("same", in_channels=1, out_channels=2)
    outs = model(torch.rand(1, 1, 16, 16), model.sample_codes(1, input_hw=(16, 16)))
    assert [o.shape[1] for o in outs] == [2, 2, 2]


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_partial_equals_full_bitwise(layout):
    model = tiny(layout).eval()
    hw = (16, 16) if layout == "same" else (8, 8)
    x = torch.rand(3, 3, *hw)
    codes = model.sample_codes(3, torch.Generator().manual_seed(1), input_hw=hw)
    with torch.no_grad():
        full = model(x, codes)
        for l in range(1, 4):
            assert torch.equal(model.partial(x, codes, level=l), full[l - 1])
            # partial evaluation must not need the later components at all
            assert torch.equal(model.partial(x, codes[:l], level=l), full[l - 1])


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_latent_division_is_real(layout):
    """Changing only level-k components leaves levels < k unchanged and changes level k."""
    model = tiny(layout).eval()
    hw = (16, 16) if layout == "same" else (8, 8)
    x = torch.rand(2, 3, *hw)
    g = torch.Generator().manual_seed(3)
    codes = model.sample_codes(2, g, input_hw=hw)
    with torch.no_grad():
        base = model(x, codes)
        for k in range(1, 4):
            new = latent.replace(codes, k, model.latent_layout(hw).sample_level(k, 2, g))
            outs = model(x, new)
            for l in range(k - 1):
                assert torch.equal(outs[l], base[l])
            assert (outs[k - 1] - base[k - 1]).abs().max() > 1e-4
            # both halves of the component matter: the global code and the spatial noise
            only_style = latent.replace(codes, k, latent.Component(new[k - 1].style, codes[k - 1].noise))
            only_noise = latent.replace(codes, k, latent.Component(codes[k - 1].style, new[k - 1].noise))
            assert (model(x, only_style)[k - 1] - base[k - 1]).abs().max() > 1e-5
            assert (model(x, only_noise)[k - 1] - base[k - 1]).abs().max() > 1e-5


def test_latent_layout_roundtrip_and_ops():
    layout = latent.LatentLayout(4, 2, ((2, 3), (4, 6)))
    g = torch.Generator().manual_seed(0)
    codes = layout.sample(5, g)
    assert layout.dims() == [4 + 12, 4 + 48]
    z = latent.flatten(codes)
    assert z.shape == (5, sum(layout.dims()))
    back = latent.unflatten(z, layout)
    assert all(torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise) for a, b in zip(back, codes))
    rep = latent.repeat(codes, 3)
    assert rep[1].noise.shape[0] == 15 and torch.equal(rep[1].noise[4], codes[1].noise[1])
    picked = latent.index(rep, [0, 3, 6])
    assert torch.equal(picked[0].style, codes[0].style[:3])
    both = latent.cat([codes, codes])
    assert both[0].style.shape[0] == 10
    # same generator seed -> same codes
    assert torch.equal(latent.flatten(layout.sample(5, torch.Generator().manual_seed(0))), z)
    with pytest.raises(ValueError):
        latent.unflatten(z[:, :-1], layout)


def test_init_reaches_weight_normalised_convs():
    model = tiny()
    conv = model.levels[0].conv_in
    w = conv.weight  # the effective weight g * v / ||v||
    fan_in = w[0].numel()
    expected_std = (2 / (1 + 0.2**2) / fan_in) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.25
    inner = model.levels[0].rrdbs[0].body[0].convs[0].weight
    expected_inner = 0.1 * (2 / (1 + 0.2**2) / inner[0].numel()) ** 0.5
    assert abs(inner.std().item() / expected_inner - 1) < 0.25
    assert hasattr(conv, "parametrizations")  # weight norm is really on


def test_paper_preset_parameter_count(capsys):
    model = TowerModel(TowerConfig.preset("paper", layout="upscale"))
    n = model.num_parameters()
    assert abs(n / 1e6 - 210.6) < 0.5
    assert abs(model.num_parameters(1) / 1e6 - 112.0) < 0.1
    # `chimle presets` (the default "same" layout): one line per preset with its total
    from chimle.apps.cli import main

    assert main(["presets"]) == 0
    totals = {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()}
    assert set(totals) == {"paper", "small", "tiny"}
    assert abs(totals["paper"] - 210.55) < 0.01 and totals["tiny"] < totals["small"] < 5


def test_config_validation():
    with pytest.raises(ValueError, match="channels"):
        TowerConfig(levels=2, channels=(8,), growth=(8, 8))
    with pytest.raises(ValueError, match="layout"):
        TowerConfig.preset("tiny", layout="sideways")
    with pytest.raises(ValueError, match="preset"):
        TowerConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown TowerConfig keys"):
        TowerConfig.from_dict({"levels": 2, "bogus": 1})
    cfg = TowerConfig.preset("small", levels=5)
    assert len(cfg.channels) == 5 and TowerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        tiny()(torch.rand(1, 3, 10, 10), tiny().sample_codes(1, input_hw=(8, 8)))


def test_public_api_names():
    """Every name `chimle` exports is the object its home module defines, and nothing else is exported
    by accident (a lazy table pointing at the wrong module or name fails here)."""
    import importlib

    from chimle.data.imageio import save_image
    from chimle.distances.lpips import LPIPS
    from chimle.inference import weights

    homes = {
        "TowerConfig": TowerModel.__module__,
        "TowerModel": TowerModel.__module__,
        "LPIPS": LPIPS.__module__,
        "load": weights.__name__,
        "save_pretrained": weights.__name__,
        "from_pretrained": weights.__name__,
        "save_image": save_image.__module__,
    }
    for name, module in homes.items():
        assert getattr(chimle, name) is getattr(importlib.import_module(module), name), name
    assert chimle.search is importlib.import_module("chimle.search")
    assert chimle.latent is importlib.import_module("chimle.latent")
    assert chimle.sample.__module__ == "chimle.inference.files" and chimle.sample.__name__ == "sample_image"
    assert set(chimle.__all__) >= set(homes) | {"search", "latent", "sample", "__version__"}
    assert all(hasattr(chimle, n) for n in chimle.__all__)


def test_recorded_norm_stats_reproduce_forward():
    from chimle.model import NormStats

    model = tiny().eval()
    x = torch.rand(2, 3, 16, 16)
    codes = model.sample_codes(2, input_hw=(16, 16))
    with torch.no_grad():
        rec = [NormStats() for _ in range(3)]
        base = model(x, codes, stats=rec)
        assert all(len(s.values) == model.cfg.blocks for s in rec)
        fixed = model(x, codes, stats=[NormStats(s.values, fixed=True) for s in rec])
        assert torch.equal(base[-1], fixed[-1])
        other = [NormStats([(m + 1, v) for m, v in s.values], fixed=True) for s in rec]
        assert (model(x, codes, stats=other)[-1] - base[-1]).abs().max() > 1e-4
