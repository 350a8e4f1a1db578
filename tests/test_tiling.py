"""Tiled inference against the untiled pass: exact away from seams, and whole-image statistics shared.

Tolerances were calibrated on the random-init "tiny" tower with the bundled photos (measured values
in the comments); the untiled pass is the reference everywhere.
"""

import pytest
import torch

from chimle.inference.tiling import auto_tile, blend_ramp, padded_hw, tile_starts, tiled_forward
from chimle.model import TowerConfig, TowerModel
from chimle.resample import resize as downsample

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting

# layout: (input h, w), tile, overlap, margin (input px kept clear of every inner tile edge). Two tiles
# down, one across: the margin then leaves about half of the image to compare.
SEAM_CASES = {"same": ((160, 96), 96, 32, 24), "upscale": ((40, 24), 24, 8, 8)}


def tiny(layout):
    torch.manual_seed(0)
    return TowerModel(TowerConfig.preset("tiny", layout=layout)).eval()


def photo_batch(photos, hw, n=2):
    return torch.cat([downsample(p[None], hw) for p in photos[:n]])


def inner_edge_distance(h, w, tile, overlap, align, scale):
    """(H*s, W*s) map: distance in input px from each output pixel to the nearest tile edge inside the image."""
    maps = []
    for size, t in ((h, min(tile, h)), (w, min(tile, w))):
        edges = {e for s0 in tile_starts(size, t, overlap, align) for e in (s0, s0 + t)} - {0, size}
        idx = torch.arange(size * scale) / scale
        maps.append(torch.stack([(idx - e).abs() for e in edges]).amin(0) if edges else torch.full_like(idx, 1e9))
    return torch.minimum(maps[0][:, None], maps[1][None, :])


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_full_stats_match_untiled_away_from_seams(photos, layout):
    model = tiny(layout)
    hw, tile, overlap, margin = SEAM_CASES[layout]
    x = photo_batch(photos, hw)
    codes = model.sample_codes(2, torch.Generator().manual_seed(1), input_hw=hw)
    with torch.no_grad():
        ref = model(x, codes)[-1]
    y = tiled_forward(model, x, codes, tile, overlap, stats="full")
    assert y.shape == ref.shape and y.min() >= 0 and y.max() <= 1
    align = 4 if layout == "same" else 1
    far = inner_edge_distance(*hw, tile, overlap, align, model.cfg.scale) >= margin
    assert far.float().mean() > 0.3  # the comparison covers a good part of the image
    err = (y - ref).abs()
    # Measured: ~2e-7 beyond the margin; up to 5e-3 ("same") / 8e-3 (SR) at the seams themselves.
    assert err[..., far].max() < 1e-5
    assert err.max() < 2e-2


@pytest.mark.parametrize("layout,hw,tile,overlap", [("same", (384, 384), 128, 32), ("upscale", (128, 128), 48, 12)])
def test_shared_statistics_fix_tone_drift(photos, layout, hw, tile, overlap):
    model = tiny(layout)
    x = photo_batch(photos, hw, n=1)
    codes = model.sample_codes(1, torch.Generator().manual_seed(1), input_hw=hw)
    with torch.no_grad():
        ref = model(x, codes)[-1]
    mae = {
        s: (tiled_forward(model, x, codes, tile, overlap, stats=s) - ref).abs().mean().item()
        for s in ("full", "lowres", "aggregate", "tile")
    }
    print(layout, {k: f"{v:.2e}" for k, v in mae.items()})
    # Measured (same / SR): full 1.2e-4 / 2.7e-5, lowres 1.9e-3 / 1.1e-3, aggregate 1.9e-3 / 4.6e-4,
    # tile 1.1e-2 / 2.2e-3.
    assert mae["full"] < 3e-4
    assert mae["lowres"] < 5e-3 and mae["aggregate"] < 5e-3
    assert mae["lowres"] < mae["tile"] and mae["aggregate"] < mae["tile"]


@pytest.mark.parametrize("layout,hw", [("same", (50, 37)), ("upscale", (13, 10))])
def test_odd_sizes_are_padded_and_cropped_back(photos, layout, hw):
    model = tiny(layout)
    x = photo_batch(photos, hw)
    phw = padded_hw(model, hw)
    codes = model.sample_codes(2, torch.Generator().manual_seed(2), input_hw=phw)
    y = tiled_forward(model, x, codes, tile=24 if layout == "same" else 8, overlap=8 if layout == "same" else 3)
    s = model.cfg.scale
    assert tuple(y.shape) == (2, 3, hw[0] * s, hw[1] * s)
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    # With one tile covering everything, tiling is the untiled pass on the reflect-padded input, cropped.
    one = tiled_forward(model, x, codes, tile=max(phw), overlap=0, stats="tile")
    xp = torch.nn.functional.pad(x, (0, phw[1] - hw[1], 0, phw[0] - hw[0]), mode="reflect")
    with torch.no_grad():
        ref = model(xp, codes)[-1][..., : hw[0] * s, : hw[1] * s]
    torch.testing.assert_close(one, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="padded_hw"):
        tiled_forward(model, x, model.sample_codes(2, input_hw=(phw[0] + 8, phw[1])), tile=16, overlap=4)


def test_tile_starts_and_blend_weights():
    for size, tile, overlap, align in [(160, 96, 32, 4), (1000, 256, 64, 8), (37, 8, 3, 1), (64, 64, 16, 1)]:
        starts = tile_starts(size, tile, overlap, align)
        assert starts[0] == 0 and starts[-1] == max(0, size - tile)
        assert all(s % align == 0 for s in starts)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap >= requested
    w = blend_ramp(16, 4, 6)
    assert w[4:10].eq(1).all() and 0 < w[0] < w[1] < w[3] < 1 and 0 < w[-1] < w[-2] < 1
    # Two tiles overlapping by k: ramps are complementary, so the weights already sum to 1.
    k = 8
    a, b = blend_ramp(24, 0, k), blend_ramp(24, k, 0)
    torch.testing.assert_close(a[-k:] + b[:k], torch.ones(k))


def test_auto_tile_grows_with_budget():
    model = tiny("same")
    small, big = auto_tile(model, (1024, 1024), "2MB"), auto_tile(model, (1024, 1024), "64MB")
    assert 4 <= small < big <= 1024 and small % 4 == 0 and big % 4 == 0
    assert auto_tile(model, (64, 64), "1GB") == 64
