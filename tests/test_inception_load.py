"""The FID InceptionV3 read out of its TorchScript archive without torch.jit: the same features as the
scripted network, no deprecation warning, and files that are not the network refused in one line."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch

from chimle.evaluation import inception


@pytest.fixture(scope="module")
def weights() -> str:
    try:
        return str(inception.find_inception())
    except FileNotFoundError as e:  # CI installs the weights: a missing file there is a broken setup
        pytest.fail(str(e)) if os.environ.get("CI") else pytest.skip(str(e))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8, generator=g)


def test_the_features_are_the_scripted_networks(weights, images, monkeypatch):
    if not hasattr(torch.jit, "load"):
        pytest.skip("torch.jit.load is gone: nothing left to compare with")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its deprecation is why the loader exists
        scripted = torch.jit.load(weights).eval()
    expected = inception.inception_features(scripted, images, dims=inception.DIMS)

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        net = inception._network(weights)
        got = inception.inception_features(net, images, dims=inception.DIMS)
    assert isinstance(net, torch.nn.Module) and not isinstance(net, torch.jit.ScriptModule)
    assert not any(p.requires_grad for p in net.parameters())
    for d in inception.DIMS:
        assert got[d].shape == (2, d)
        assert torch.allclose(got[d], expected[d], rtol=0, atol=1e-5), (d, (got[d] - expected[d]).abs().max())
    with torch.inference_mode():  # the whole forward too: (N, 3, 299, 299) in [-1, 1) -> (N, 2048)
        x = (torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1).clamp(max=0.99)
        assert torch.allclose(net(x), scripted(x), rtol=0, atol=1e-5)


def _archive(path, data_pkl: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("net/data.pkl", data_pkl)
    return str(path)


def _not_a_zip(path) -> str:
    path.write_bytes(b"not a zip")
    return str(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "make, problem",
    [
        (_not_a_zip, "is not a TorchScript archive of it: File is not a zip file"),
        (lambda p: _archive(p, pickle.dumps(_Evil())), "is not a TorchScript archive of it: unexpected object "),
        (lambda p: _archive(p, pickle.dumps({"x": 1})), "has no `layers` module"),
    ],
)
def test_other_files_are_refused_in_one_line(tmp_path, make, problem):
    path = make(tmp_path / "not_inception.pt")
    with pytest.raises(ValueError) as e:
        inception._network(path)
    assert str(e.value).startswith(f"InceptionV3 file {path} ") and problem in str(e.value)
    assert "\n" not in str(e.value)


class _ConvLayer(torch.nn.Module):
    """What the archive's Conv2dLayer holds, for a scripted stand-in of another network."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(32, 3, 3, 3))
        self.beta, self.mean, self.var = (torch.nn.Parameter(torch.zeros(32)) for _ in range(3))
        self.stride, self.padding = 2, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.weight, None, self.stride, self.padding)


class _OneConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(OrderedDict(conv=_ConvLayer()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_another_network_is_refused_by_its_first_missing_layer(tmp_path):
    path = tmp_path / "one_conv.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_OneConv()), str(path))
    with pytest.raises(ValueError) as e:
        inception._network(str(path))
    assert str(e.value) == f"InceptionV3 file {path} is not the FID InceptionV3: no conv_1.weight"
