"""Speed benchmark: the naive search agrees with the fast one, and `chimle bench speed --quick` works.

No timing thresholds here: speed targets belong to benchmarks/, not to tests.
"""

import json
import re

import pytest
import torch

from chimle import search
from chimle.apps import bench_speed as benchmark
from chimle.apps.cli import main as cli_main
from chimle.distances.lpips import LPIPS
from chimle.model import TowerConfig, TowerModel


@pytest.fixture(autouse=True)
def one_thread():
    # Small convolutions gain nothing from a second thread, and on a busy machine spinning OpenMP
    # workers can slow them down a hundredfold: keep this file fast everywhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lpips():
    return LPIPS("alex")


@pytest.mark.parametrize("layout,hw", [("upscale", (8, 8)), ("same", (32, 32))])
def test_naive_and_fast_search_choose_the_same_codes(lpips, layout, hw):
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout=layout))
    x = torch.rand(2, 3, *hw)
    y = torch.rand(2, 3, *model.cfg.output_sizes(*hw)[-1])
    counts = [4, 3, 2]
    # a small budget forces several chunks per level in the fast search
    fast_codes, fast_d = search.hierarchical(
        model, x, y, lpips, counts, torch.Generator().manual_seed(1), memory_budget=200_000
    )
    naive_codes, naive_d = search.reference_hierarchical(model, x, y, lpips, counts, torch.Generator().manual_seed(1))
    for a, b in zip(fast_codes, naive_codes, strict=True):
        assert torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise)
    torch.testing.assert_close(fast_d, naive_d, rtol=1e-4, atol=1e-6)


def test_target_features_computed_once_per_level(lpips, monkeypatch):
    """The target of each level is downsampled and passed through LPIPS once, however many chunks."""
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout="upscale"))
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 64, 64)
    calls = []
    real = search.resize
    monkeypatch.setattr(search, "resize", lambda img, size: calls.append(tuple(size)) or real(img, size))
    search.hierarchical(model, x, y, lpips, [6, 4, 2], torch.Generator().manual_seed(0), memory_budget=100_000)
    assert calls == [(16, 16), (32, 32), (64, 64)]


def test_bench_speed_quick(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert cli_main(["bench", "speed", "--quick", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("preset"))
    assert re.split(r"\s{2,}", header) == list(benchmark.COLUMNS)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"sr 8->64", "same 64"}
    metrics = {r["metric"] for r in rows}
    assert {
        "search L1",
        "search L2",
        "search L3",
        "search all",
        "search flat",
        "naive search",
        "train step",
        "sample",
        "sample latency",
    } <= metrics
    peak = result["matmul_peak_gflops"]
    for r in rows:
        assert r["metric"] in text
        if r["metric"] == "naive search":
            assert r["same_codes"]
        if r["metric"] in ("search all", "search flat"):
            # the FLOP count over the time can not beat this machine's matmul peak (a wrong count would)
            assert 1e-3 < r["peak_fraction"] < 1.2, r
            assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak, rel=1e-3)
            assert r["peak_mib"] < 2048  # within the search's default CPU budget
    by = {(r["case"], r["metric"]): r["value"] for r in rows}
    for case in ("sr 8->64", "same 64"):
        # batching cannot make sampling slower than one image at a time (a broken batch path would)
        assert by[case, "sample"] > 0.5 * 1000 / by[case, "sample latency"], by
    assert result["matmul_peak_gflops"] > 0 and result["memory"]
