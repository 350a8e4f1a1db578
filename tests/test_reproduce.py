"""`chimle reproduce` in reduced form: every part runs at tiny sizes and every section of the report
is written with numbers; a second run with --resume reuses the finished parts, one without it the
finished towers and evaluations."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from chimle.apps import reproduce

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = Path(os.environ.get("CHIMLE_TEST_ASSETS", Path.home() / ".cache/chimle/test-assets")) / "mnist_5k.csv.gz"

TINY = replace(
    reproduce.QUICK,
    crop=16,
    mnist_steps=10,
    mnist_pool=16,
    mnist_eval_inputs=10,
    sr_steps=6,
    schedule=(3, 2, 2),
    efficiency_seeds=2,
    efficiency_images=2,
    efficiency_budgets=(1, 2),
    length_stages=(3,),
    resolution_crops=(16, 32),
    factor_budgets=(1, 2),
    factor_seeds=1,
    factor_images=2,
    ablation_steps=4,
    ablation_seeds=1,
    table1_steps=4,
    table1_seeds=2,
    eval_samples=2,
    eval_images=4,
    pool=8,
)


@pytest.mark.skipif(not ASSET.exists(), reason="MNIST digits: run scripts/fetch_test_assets.sh")
def test_reproduce_writes_every_section_with_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_MNIST", str(ASSET))
    monkeypatch.setenv("CHIMLE_FASHION_MNIST", str(tmp_path / "no-fashion"))  # the note path; CI has none
    out = tmp_path / "report"
    results = reproduce.run(out, TINY, quick=True)
    md = (out / "report.md").read_text()
    for title in ("TIM Fig. 1", "CHIMLE Fig. 2", "better or worse", "CHIMLE Fig. 7", "CHIMLE Table 1", "Time per part"):
        assert f"## {title}" in md or title in md, title
    # factors: every setting has its curve, ratios at equal compute beside those in samples
    factors = results["factors"]["rows"]
    settings = {(r["factor"], r["setting"], r["level1_px"]) for r in factors}
    assert settings == {
        ("training length", "3 steps", 4),
        ("training length", "6 steps", 4),
        ("resolution", "6 steps, 16 px", 4),
        ("resolution", "6 steps, 32 px", 8),
        ("resolution", "sr8-small, 16 px", 4),
        ("resolution", "sr8-small, 32 px", 8),
        ("tanh feedback", "6 steps, image (chimle)", 4),
        ("tanh feedback", "6 steps, tanh", 4),
        ("distance", "MNIST, pixel L2", 7),
    }
    for r in factors:
        assert r["lpips_threshold"] > 0 and -1 <= r["corr_level1"] <= 1
        assert isinstance(r["ratio_compute"], float) or r["ratio_compute"].startswith("> ")
    # the larger crop keeps m <= 4 and no schedule; the training crop has the schedule's row
    assert {r["per_level_m"] for r in factors if r["level1_px"] == 8} == {1, 2}
    assert "3,2,2" in {r["per_level_m"] for r in factors if r["setting"] == "6 steps, tanh"}
    assert "Fashion-MNIST not found" in md and (out / "factors" / "factors.png").stat().st_size > 1000
    # Table 1: both methods for every task, finite KID with a spread over seeds, the paper's FID beside
    rows = results["table1"]["rows"]
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in reproduce.TASKS for m in ("chimle", "cimle")}
    for r in rows:
        assert math.isfinite(r["kid"]) and r["kid_std"] >= 0 and 0 < r["lpips_to_target_best_of_k"] < 1
        assert r["paper_fid"] == reproduce.PAPER_TABLE1_FID[r["task"]][r["method"] == "cimle"]
    # cIMLE searched as many whole codes as CHIMLE's schedule costs (more than m_L, fewer than the sum)
    m_flat = int(next(r for r in rows if r["method"] == "cimle")["search"].split()[0])
    assert 2 <= m_flat <= sum(TINY.schedule) + 2
    table1 = md.split("CHIMLE Table 1")[1].split("## ")[0]
    assert len(re.findall(r"\| (sr|colorize|jpeg|night) \| (chimle|cimle) \|", table1)) == 8
    # CHIMLE minus cIMLE per task, in standard errors over the seeds, and the verdict that follows from it
    by = {(r["task"], r["method"]): r for r in rows}
    for c in results["table1"]["comparison"]:
        a, b = by[c["task"], "chimle"], by[c["task"], "cimle"]
        assert c["kid_diff"] == pytest.approx(a["kid"] - b["kid"])
        se = math.sqrt((a["kid_std"] ** 2 + b["kid_std"] ** 2) / TINY.table1_seeds)
        assert c["kid_z"] == pytest.approx(c["kid_diff"] / se)
        assert (c["kid_verdict"] == "within noise") == (abs(c["kid_z"]) <= 2)
    assert [c["task"] for c in results["table1"]["comparison"]] == list(reproduce.TASKS)
    assert len(re.findall(r"\| (sr|colorize|jpeg|night) \| -?\d", table1)) == 4  # the comparison's rows
    assert (out / "table1" / "table1.png").stat().st_size > 1000 and "table1/table1.png" in table1
    ablation = results["ablation"]["rows"]
    assert [r["paper_fid_sr"] for r in ablation] == list(reproduce.PAPER_ABLATION_FID_SR)
    assert all(math.isfinite(r["kid"]) and math.isfinite(r["fid"]) and r["kid_std"] >= 0 for r in ablation)
    assert "7.7%, 7.8% and 12.8%" in md and results["ablation"]["images"] == 2 * TINY.ablation_crops
    assert results["efficiency"]["rows"] and "efficiency.png" in md
    assert (out / "efficiency" / "efficiency.png").stat().st_size > 1000
    assert results["mnist"]["rest_best_of_K"] > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,iVBOR") == 6 and "<table>" in html  # figures inline
    assert (out / "ablation" / "ablation.png").stat().st_size > 1000
    for part in reproduce.PARTS:
        assert json.loads((out / part / "result.json").read_text())["seconds"] > 0
    # --resume: nothing is trained again, the report is the same
    before = {p: (out / p / "result.json").stat().st_mtime_ns for p in reproduce.PARTS}
    again = reproduce.run(out, TINY, resume=True, quick=True)
    assert again == json.loads(json.dumps(results, default=float))
    assert {p: (out / p / "result.json").stat().st_mtime_ns for p in reproduce.PARTS} == before
    assert (out / "report.md").read_text() == md
    # without --resume the parts run again, but finished towers and Table 1's evaluations are reused
    monkeypatch.setattr(reproduce.Trainer, "run", lambda self: pytest.fail(f"{self.out} was trained again"))
    monkeypatch.setattr(reproduce, "evaluate", lambda *a, **k: pytest.fail("an evaluation was run again"))
    monkeypatch.setattr(reproduce.bench_quality, "generate", lambda *a, **k: pytest.fail("a rung was sampled again"))
    rerun = reproduce.run(out, TINY, parts=("ablation", "table1"), quick=True)
    for part in ("ablation", "table1"):
        a, b = (json.loads(json.dumps(r[part], default=float)) for r in (rerun, results))
        assert a.pop("seconds") > 0 and b.pop("seconds") > 0 and a == b, part
    # the report states the counts each part ran with, also when it is recomposed under other sizes
    reproduce.run(out, replace(TINY, eval_samples=5), resume=True, quick=True)
    md = (out / "report.md").read_text()
    assert "then 2 samples for each of 16 held-out crops" in md and "(4 held-out tiles, 2 samples each)" in md
    assert "5 samples" not in md
