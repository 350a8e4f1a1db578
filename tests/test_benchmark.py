"""Speed benchmark: `chimle bench speed --quick` works and reports checkable numbers; the search embeds each
target once per level.

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

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: a second thread only waits


@pytest.fixture(scope="module")
def lpips():
    return LPIPS("alex")


def test_target_features_computed_once_per_level(lpips, monkeypatch):
    """The target of each level is downsampled and passed through LPIPS once, however many chunks."""
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout="upscale"))
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 64, 64)
    calls = []
    real = search.resize
    monkeypatch.setattr(search, "resize", lambda img, size: calls.append(tuple(size)) or real(img, size))
    search.hierarchical(
        model, x, y, lpips, [6, 4, 2], torch.Generator().manual_seed(0), options=search.SearchOptions(100_000)
    )
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
