"""cIMLE pieces: the paper's distances (chimle.distances.vgg), the noise encoder (chimle.model) and the
rebalancing (chimle.data.layouts)."""

import pytest
import torch

from chimle import latent
from chimle.data.layouts import (
    CategoryColours,
    category_mean_colours,
    loss_weight_map,
    rarity_weights,
    sample_pool,
    sampling_weights,
    top_categories,
)
from chimle.distances.vgg import PixelVGGDistance, VGGFeatureL1Distance, vgg_layer_names
from chimle.model import NoiseEncoder, TowerConfig, TowerModel
from chimle.search import flat

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: a second thread only waits


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def backbone():
    from chimle.distances.lpips import LPIPS

    return LPIPS("vgg").net


@pytest.fixture(scope="module", params=["pixel_vgg", "vgg_l1"])
def dist(request, backbone):
    if request.param == "pixel_vgg":
        return PixelVGGDistance(backbone=backbone)
    return VGGFeatureL1Distance(backbone=backbone)


def test_layer_names_are_vgg16(backbone):
    names = vgg_layer_names(backbone)
    assert names["conv1_2"] == 2 and names["relu1_2"] == 3 and names["relu5_2"] == 27 and names["relu5_3"] == 29
    assert "relu5_4" not in names  # VGG-16: hence the relu5_3 substitution


def test_distance_properties(dist):
    a, b = rand(3, 3, 32, 32, seed=1), rand(3, 3, 32, 32, seed=2)
    with torch.no_grad():
        d_ab, d_ba, d_aa = dist(a, b), dist(b, a), dist(a, a)
        assert d_ab.shape == (3,) and (d_ab > 0).all()
        torch.testing.assert_close(d_ab, d_ba)
        assert torch.equal(d_aa, torch.zeros(3))
        one_by_one = torch.cat([dist(a[i : i + 1], b[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(d_ab, one_by_one, rtol=1e-5, atol=1e-6)
        # the chimle.search contract: target features once, rows selected, candidates measured against them
        ft = dist.features(b)
        rows = torch.tensor([2, 0])
        via = dist.distance_from_features(dist.features(a[[2, 0]]), [f.index_select(0, rows) for f in ft])
        torch.testing.assert_close(via, d_ab[[2, 0]], rtol=1e-5, atol=1e-6)
        # a single target broadcasts against many candidates
        torch.testing.assert_close(
            dist(a, b[:1]), torch.cat([dist(a[i : i + 1], b[:1]) for i in range(3)]), rtol=1e-5, atol=1e-6
        )


def test_gradients_reach_inputs(dist):
    a = rand(2, 3, 16, 16, seed=3).requires_grad_()
    dist(a, rand(2, 3, 16, 16, seed=4)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and torch.isfinite(a.grad).all()
    assert not any(p.requires_grad for p in dist.parameters())  # the metric stays frozen


def test_range_and_shape_checks(dist):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dist(rand(1, 3, 16, 16) * 2 - 1, rand(1, 3, 16, 16))
    with pytest.raises(ValueError):
        dist(rand(2, 3, 16, 16), rand(2, 3, 8, 8))


def test_pixel_term_is_l2(backbone):
    a, b = rand(2, 3, 16, 16, seed=5), rand(2, 3, 16, 16, seed=6)
    by_hand = ((a - b) ** 2).flatten(1).sum(1).sqrt() / (3 * 16 * 16) ** 0.5
    torch.testing.assert_close(PixelVGGDistance(2.0, 0.0, backbone=backbone)(a, b), 2 * by_hand)
    squared = PixelVGGDistance(1.0, 0.0, squared=True, backbone=backbone)(a, b)
    torch.testing.assert_close(squared, by_hand**2)


def test_mask_weights_the_differences(backbone):
    d = VGGFeatureL1Distance(backbone=backbone)
    a, b = rand(2, 3, 32, 32, seed=7), rand(2, 3, 32, 32, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(d(a, b, mask=torch.ones(2, 1, 32, 32)), d(a, b))
        assert torch.equal(d(a, b, mask=torch.zeros(1, 1, 32, 32)), torch.zeros(2))
        half = torch.ones(2, 1, 32, 32)
        half[..., 16:] = 0.5
        assert (d(a, b, mask=half) < d(a, b)).all()


def test_balance_equalises_terms(backbone):
    d = VGGFeatureL1Distance(backbone=backbone)
    a, b = rand(2, 3, 32, 32, seed=9), rand(2, 3, 32, 32, seed=10)
    d.balance_(a, b)
    with torch.no_grad():
        t = d.terms(d.features(a), d.features(b)).mean(0) * torch.tensor(d.weights)
    torch.testing.assert_close(t, torch.ones(5))


def test_flat_search_with_pixel_vgg_is_true_argmin(backbone):
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout="same")).eval()
    x, y = rand(2, 3, 16, 16, seed=11), rand(2, 3, 16, 16, seed=12)
    d, m = PixelVGGDistance(backbone=backbone), 5
    codes, dists = flat(model, x, y, d, m, torch.Generator().manual_seed(3))
    cands = model.latent_layout((16, 16)).sample(2 * m, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(2):
            rows = range(i * m, i * m + m)
            ds = torch.stack([d(model(x[i : i + 1], latent.index(cands, [r]))[-1], y[i : i + 1])[0] for r in rows])
            j = int(ds.argmin())
            assert torch.equal(codes[0].style[i], cands[0].style[i * m + j])
            assert torch.equal(codes[-1].noise[i], cands[-1].noise[i * m + j])
            assert abs(dists[i].item() - ds[j].item()) < 1e-5


def test_noise_encoder():
    enc = NoiseEncoder(seg_channels=5)
    seg = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 8, 12)), 5).permute(0, 3, 1, 2).float()

    def g(s):
        return torch.Generator().manual_seed(s)

    z1, z2 = enc(seg, generator=g(0)), enc(seg, generator=g(1))
    assert z1.shape == (2, 10, 8, 12)
    assert torch.equal(z1, enc(seg, generator=g(0)))
    assert (z1 - z2).abs().mean() > 1e-3  # the noise matters ...
    noise = torch.randn(2, 10, 8, 12, generator=g(2))
    assert (enc(seg, noise) - enc(seg.flip(0), noise)).abs().mean() > 1e-3  # ... and so does the layout
    assert NoiseEncoder(30, 10, out_channels=4, hidden=7)(torch.zeros(1, 30, 4, 4)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError):
        enc(seg, torch.randn(2, 3, 8, 12))


def synthetic(n=12, rare=5, seed=0):
    """n images: top half category 0 ("sky"), blue-ish except image `rare` (red); bottom half category 1
    ("road"), grey; a small patch of category 2 in the first three images only."""
    g = torch.Generator().manual_seed(seed)
    segs = torch.zeros(n, 8, 8, dtype=torch.long)
    segs[:, 4:] = 1
    segs[:3, 6:, :2] = 2
    images = torch.empty(n, 3, 8, 8)
    for k in range(n):
        sky = torch.tensor([0.9, 0.1, 0.1]) if k == rare else torch.tensor([0.2, 0.3, 0.8])
        images[k, :, :4] = (sky + 0.03 * torch.randn(3, generator=g)).view(3, 1, 1)
        images[k, :, 4:] = (0.5 + 0.03 * torch.randn(3, generator=g)).view(3, 1, 1)
    return segs, images.clamp(0, 1)


def test_category_mean_colours():
    segs, images = synthetic()
    stats = category_mean_colours(segs, images)
    assert sorted(stats) == [0, 1, 2]
    assert stats[2].images.tolist() == [0, 1, 2] and stats[2].pixels.tolist() == [4, 4, 4]
    k = 7
    expected = images[k][:, segs[k] == 1].double().mean(1)
    torch.testing.assert_close(stats[1].colours[k], expected)
    assert top_categories(stats, 2) == [0, 1]
    ignored = category_mean_colours(list(segs), list(images), ignore_index=2)
    assert sorted(ignored) == [0, 1]


def test_kde_matches_scipy():
    from scipy.stats import gaussian_kde

    colours = rand(40, 3, seed=13).double()
    stats = {0: CategoryColours(torch.arange(40), colours, torch.ones(40, dtype=torch.long))}
    ours = rarity_weights(stats, 40, ridge=0.0)[:, 0]
    theirs = 1 / gaussian_kde(colours.numpy().T)(colours.numpy().T)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-9, atol=0)


def test_rebalancing_upweights_rare_colour():
    rare = 5
    segs, images = synthetic(rare=rare)
    stats = category_mean_colours(segs, images)
    R = rarity_weights(stats, len(images))
    assert R.shape == (12, 3) and (R[:, :2] > 0).all() and (R[3:, 2] == 0).all()
    assert int(R[:, 0].argmax()) == rare and R[rare, 0] > 2 * R[:, 0].median()
    assert (R[:3, 2] == R[:3, :2].amax(1)).all()  # category 2 is in < 5 images: the documented fallback

    p = sampling_weights(R, stats, top_k=2)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert int(p.argmax()) == rare and (p > 0).all()
    p0 = sampling_weights(R, stats, top_k=1)  # all of the pool for category 0: proportional to R[:, 0]
    torch.testing.assert_close(p0, R[:, 0] / R[:, 0].sum())

    pool = sample_pool(R, stats, 400, top_k=2, generator=torch.Generator().manual_seed(0))
    assert pool.shape == (400,) and pool.min() >= 0 and pool.max() < 12
    # even slots belong to category 0 and draw images in proportion to R[:, 0], odd ones to R[:, 1]
    for slots, p_cat in ((pool[0::2], R[:, 0]), (pool[1::2], R[:, 1])):
        freq = torch.bincount(slots, minlength=12).double() / len(slots)
        assert (freq - p_cat / p_cat.sum()).abs().max() < 0.1

    mask = loss_weight_map(segs[rare], R[rare])
    assert mask.shape == (1, 1, 8, 8) and mask.max() == 1 and (mask > 0).all()
    assert (mask[0, 0][segs[rare] == 0] == 1).all() and (mask[0, 0][segs[rare] == 1] < 1).all()
    masks = loss_weight_map(segs, R)
    assert masks.shape == (12, 1, 8, 8) and torch.equal(masks[rare], mask[0])
    assert (masks.flatten(1).amax(1) == 1).all()
