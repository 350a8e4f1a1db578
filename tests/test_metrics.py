"""The papers' metrics (chimle.metrics) and the FID InceptionV3 (chimle.inception).

FID and KID are pinned to torchmetrics' doctests, replayed with the doctest's own inputs (made by
scripts/fetch_test_assets.sh), and checked against independent computations;
FwV and LPIPS diversity against hand-computed values; PRD at its extremes; IvO on a known code.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from chimle.evaluation import inception, metrics
from chimle.model import TowerConfig, TowerModel

ASSETS = Path(os.environ.get("CHIMLE_TEST_ASSETS", Path.home() / ".cache/chimle/test-assets"))
DOCTEST = ASSETS / "torchmetrics-doctest-seed42.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


def _missing(msg: str) -> None:
    # CI fetches the assets and installs the weights: a missing file there is a broken setup.
    pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)


@pytest.fixture(scope="module")
def doctest():
    """InceptionV3 features (64-d and 2048-d, float64) of the doctest's two uint8 batches, and the
    global RNG state right after the doctest drew them."""
    if not DOCTEST.is_file():
        _missing(f"{DOCTEST} is missing; run scripts/fetch_test_assets.sh")
    try:
        net = inception.load_inception()
    except FileNotFoundError as e:
        _missing(str(e))
    d = torch.load(DOCTEST, weights_only=True)
    assert d["real"].shape == d["fake"].shape == (100, 3, 299, 299) and d["real"].dtype == torch.uint8
    feats = {}
    for key in ("real", "fake"):  # one pass for both sizes, in CPU-friendly batches of 10
        parts = [inception.inception_features(net, d[key][i : i + 10], dims=(64, 2048)) for i in range(0, 100, 10)]
        feats[key] = {dim: torch.cat([p[dim] for p in parts]).double().numpy() for dim in (64, 2048)}
    return feats, d["rng_state"]


def test_fid_matches_torchmetrics_doctest(doctest):
    feats, _ = doctest
    real, fake = feats["real"][64], feats["fake"][64]
    assert real.shape == fake.shape == (100, 64)
    # torchmetrics: FrechetInceptionDistance(feature=64) on these batches -> tensor(12.6388)
    assert round(metrics.fid(real, fake), 4) == 12.6388
    # independently: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm, written out
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(s1.dot(s2)).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert metrics.fid(real, fake) == pytest.approx(expected, rel=1e-9)


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3  # the KID kernel, k(a, b) = (a.b / d + 1)^3


def _mmd_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices, the off-diagonal terms masked explicitly."""
    m, n = len(kxx), len(kyy)
    off_m, off_n = ~np.eye(m, dtype=bool), ~np.eye(n, dtype=bool)
    return kxx[off_m].sum() / (m * (m - 1)) + kyy[off_n].sum() / (n * (n - 1)) - 2 * kxy.sum() / (m * n)


def test_kid_matches_torchmetrics_doctest(doctest):
    feats, state = doctest
    real, fake = feats["real"][2048], feats["fake"][2048]
    # torchmetrics' KID draws its subsets from the global RNG, which continues after the doctest's draws
    g = torch.Generator()
    g.set_state(state)
    mean, std = metrics.kid(real, fake, subset_size=50, subsets=100, generator=g)
    # torchmetrics: KernelInceptionDistance(subset_size=50) -> (tensor(0.0312), tensor(0.0025))
    assert (round(mean, 4), round(std, 4)) == (0.0312, 0.0025)
    # independently: the same subsets (randperm(real) then randperm(fake)), MMD written out above
    g.set_state(state)
    kxx, kyy, kxy = _kernel(real, real), _kernel(fake, fake), _kernel(real, fake)
    scores = []
    for _ in range(100):
        i = torch.randperm(100, generator=g)[:50].numpy()
        j = torch.randperm(100, generator=g)[:50].numpy()
        scores.append(_mmd_unbiased(kxx[i][:, i], kyy[j][:, j], kxy[i][:, j]))
    assert mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert std == pytest.approx(np.std(scores), rel=1e-7)
    # the per-subset path kid takes for large sets
    x, y = real[:50], fake[50:]
    assert metrics.polynomial_mmd(x, y) == pytest.approx(
        _mmd_unbiased(_kernel(x, x), _kernel(y, y), _kernel(x, y)), rel=1e-9
    )


def test_inception_accepts_floats_and_resizes():
    """float [0, 1] input = the same 8-bit values as uint8; other sizes are resized to 299."""
    try:
        net = inception.load_inception()
    except FileNotFoundError as e:
        _missing(str(e))
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8, generator=g)
    a = inception.features(u8, dims=64)
    b = inception.features(u8.float() / 255, dims=64)
    assert a.shape == (2, 64) and np.array_equal(a, b)
    c = inception.inception_features(net, u8, dims=(64, 192))
    assert np.allclose(c[64].numpy(), a, atol=1e-5) and c[192].shape == (2, 192)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inception.features(u8.float(), dims=64)  # 0..255 floats are refused, not silently clipped


def test_resize_is_tensorflow1_bilinear():
    """Output pixel i samples the input at i * in / out (no half-pixel offset), as torch-fidelity's
    resize that torchmetrics feeds its InceptionV3 through: row [0, 10] -> [0, 5, 10, 10]."""
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).expand(1, 3, 2, 2)
    expected = torch.tensor([[0.0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]])
    out = inception.resize_tf1(x, 4)
    assert out.shape == (1, 3, 4, 4) and torch.equal(out[0, 1], expected)
    big = torch.arange(600.0).reshape(1, 1, 1, 600).expand(1, 1, 2, 600)
    assert torch.allclose(inception.resize_tf1(big, 299)[0, 0, 0, :3], torch.tensor([0.0, 600 / 299, 1200 / 299]))


def test_fid_warns_with_fewer_images_than_dims():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(10, 64)) + 0.3, 1.2 * rng.normal(size=(12, 64))
    with pytest.warns(UserWarning, match=r"FID from 10 real and 12 fake images with 64-d features is unreliable"):
        value = metrics.fid(real, fake)
    # rank-deficient covariances take the exact low-rank path; scipy's sqrtm, written out, agrees
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = (
        ((real.mean(0) - fake.mean(0)) ** 2).sum()
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    )
    assert value == pytest.approx(expected, rel=1e-6)
    with pytest.warns(UserWarning, match="subset size reduced from 50 to 10"):
        metrics.kid(rng.normal(size=(10, 8)), rng.normal(size=(12, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough images: no warning
        same = rng.normal(size=(200, 8))
        assert metrics.fid(same, same) == pytest.approx(0, abs=1e-6)


def _const(*values: float, size: int = 4) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), v) for v in values])


def mad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image: (N,)."""
    return (a - b).abs().flatten(1).mean(1)


def test_fwv_and_lpips_diversity_by_hand():
    # samples (K=2, N=2): input 0 gets 0.2 and 0.6 (target 0.2), input 1 gets 0.1 and 0.9 (target 0.5)
    samples = torch.stack([_const(0.2, 0.1), _const(0.6, 0.9)])
    targets = _const(0.2, 0.5)
    # means 0.4 and 0.5: d(sample, mean) = 0.2, 0.2 | 0.4, 0.4; d(sample, target) = 0, 0.4 | 0.4, 0.4
    for sigma in (0.3, 0.2, 0.15):
        w = math.exp(-0.4 / (2 * sigma**2))
        expected = (0.2 * 1 + 0.2 * w + 0.4 * w + 0.4 * w) / 4
        assert metrics.fwv(samples, targets, sigma, distance=mad) == pytest.approx(expected, rel=1e-6)
    assert metrics.fwv(samples, targets, 0.2, distance=mad) == pytest.approx((0.2 + math.exp(-5)) / 4, rel=1e-6)
    # a non-constant sample: zeros vs ones on the left half -> mean 0.5 on the left half, d(., mean) = 0.25
    half = torch.zeros(1, 3, 4, 4)
    half[..., :2] = 1
    s2 = torch.stack([torch.zeros(1, 3, 4, 4), half])
    assert metrics.fwv(s2, torch.zeros(1, 3, 4, 4), 0.2, distance=mad) == pytest.approx(
        (0.25 * 1 + 0.25 * math.exp(-0.5 / 0.08)) / 2, rel=1e-6
    )
    # LPIPS diversity, K=3: pairs of input 0 (0.1, 0.4, 0.9) = 0.3, 0.8, 0.5; of input 1 (0, 0, 1) = 0, 1, 1
    samples3 = torch.stack([_const(0.1, 0.0), _const(0.4, 0.0), _const(0.9, 1.0)])
    assert metrics.lpips_diversity(samples3, distance=mad) == pytest.approx((1.6 / 3 + 2 / 3) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.fwv(samples * 2, targets, distance=mad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.lpips_diversity(samples[:1], distance=mad)


def test_fwv_and_diversity_with_default_lpips(photos):
    """The default distance is LPIPS-alex; its fast path (features once) equals plain LPIPS calls."""
    from chimle.distances.lpips import LPIPS

    crops = torch.stack([p[:, 100:132, 100:132] for p in photos[:2]])  # N=2 real 32 px crops
    shifts = [crops, crops.flip(-1), crops.roll(5, -2), crops * 0.7]
    samples = torch.stack(shifts[:3])  # (K=3, N=2, 3, 32, 32)
    targets = shifts[3]
    d = LPIPS("alex")
    with torch.no_grad():
        mean = samples.mean(0)
        to_mean = torch.stack([d(samples[k], mean) for k in range(3)]).double()
        to_target = torch.stack([d(samples[k], targets) for k in range(3)]).double()
        pairs = [d(samples[a], samples[b]).double() for a, b in ((0, 1), (0, 2), (1, 2))]
    expected_fwv = float((torch.exp(-to_target / (2 * 0.2**2)) * to_mean).mean())
    assert metrics.fwv(samples, targets, 0.2) == pytest.approx(expected_fwv, rel=1e-4)
    assert metrics.lpips_diversity(samples) == pytest.approx(float(torch.stack(pairs).mean()), rel=1e-4)
    assert metrics.lpips_diversity(torch.stack([crops, crops])) == pytest.approx(0, abs=1e-6)


def test_prd_extremes_and_mode_dropping():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(6, 8))
    cloud = centres[rng.integers(6, size=400)] + rng.normal(size=(400, 8))
    f8, f1_8 = metrics.prd(cloud, cloud.copy(), num_clusters=10, num_runs=3)
    assert f8 == pytest.approx(1, abs=1e-6) and f1_8 == pytest.approx(1, abs=1e-6)
    f8, f1_8 = metrics.prd(cloud, cloud + 1000, num_clusters=10, num_runs=3)  # disjoint, far apart
    assert f8 < 1e-6 and f1_8 < 1e-6
    # fake covers only the modes of half the real points: precise (F1/8 high) but low recall (F8 ~ 0.5)
    two = np.concatenate([rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 50])
    only_one = rng.normal(size=(600, 8))
    f8, f1_8 = metrics.prd(two, only_one, num_clusters=10, num_runs=3)
    assert f1_8 > 0.9 and 0.4 < f8 < 0.6, (f8, f1_8)


def test_ivo_recovers_a_known_code():
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny")).eval()
    x = torch.rand(2, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        y = model(x, model.sample_codes(2, g, input_hw=(16, 16)))[-1]  # a target the model can make exactly
        random = np.mean(
            [float((model(x, model.sample_codes(2, g, input_hw=(16, 16)))[-1] - y).pow(2).mean()) for _ in range(8)]
        )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mean, std = metrics.ivo(model, x, y, runs=2, steps=60, lr=0.05, generator=torch.Generator().manual_seed(2))
    print(f"IvO MSE {mean:.2e} +- {std:.1e}; random codes {random:.2e}")
    assert 0 <= mean < 0.1 * random and std >= 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_chroma_spread_tells_tints_from_regions():
    """Two samples, the same picture in two tints: all spread is tint; two samples that colour the top
    and bottom halves oppositely (same mean chroma): all spread is regional. In Lab units."""
    from chimle.data.tasks import lab_to_rgb, rgb_to_lab

    g = torch.Generator().manual_seed(0)
    lab = torch.cat([torch.full((1, 1, 16, 16), 60.0), 8 * torch.randn(1, 2, 16, 16, generator=g)], 1)
    base = lab_to_rgb(lab)
    lab = rgb_to_lab(base)  # what the sRGB image holds (in gamut at these values)

    def with_ab(delta):
        return lab_to_rgb(lab + torch.cat([torch.zeros(1, 1, 16, 16), delta], 1))

    tinted = with_ab(torch.tensor([6.0, -8.0]).view(1, 2, 1, 1).expand(1, 2, 16, 16))
    r = metrics.chroma_spread(torch.stack([base, tinted]))
    assert r["tint"] == pytest.approx(5.0, rel=0.02)  # half of |(6, -8)|: two samples at +-d/2
    assert r["regional"] < 0.05 * r["tint"]
    halves = torch.zeros(1, 2, 16, 16)
    halves[:, 0, :8], halves[:, 0, 8:] = 6.0, -6.0
    r = metrics.chroma_spread(torch.stack([base, with_ab(halves)]))
    assert r["regional"] == pytest.approx(3.0, rel=0.02) and r["tint"] < 0.05
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.chroma_spread(base[None])


def test_chroma_error_best_of_k_and_mean():
    """The photo itself scores 0; a sample with its chroma moved by (6, -8) Lab units everywhere scores 10;
    best of K takes the closer per input, the mean averages both."""
    from chimle.data.tasks import lab_to_rgb, rgb_to_lab

    g = torch.Generator().manual_seed(1)
    lab = torch.cat([torch.full((2, 1, 16, 16), 55.0), 8 * torch.randn(2, 2, 16, 16, generator=g)], 1)
    photo = lab_to_rgb(lab)
    lab = rgb_to_lab(photo)
    moved = lab_to_rgb(lab + torch.tensor([0.0, 6.0, -8.0]).view(1, 3, 1, 1))
    r = metrics.chroma_error(torch.stack([moved, photo]), photo)
    assert r["best_of_k"] == pytest.approx(0.0, abs=1e-3)
    assert r["mean"] == pytest.approx(5.0, rel=0.02)
    r = metrics.chroma_error(moved[None], photo)
    assert r["best_of_k"] == pytest.approx(10.0, rel=0.02)
