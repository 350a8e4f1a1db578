"""`chimle reproduce` in reduced form: every part runs once at tiny sizes (one run shared by the tests); every
number the report states is recomputed from the files the run wrote (the per-seed evaluations and ladders,
the mnist metrics, the efficiency curve); a second run with --resume reuses the finished parts, one without it
the finished towers and evaluations."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from chimle.apps import reproduce
from chimle.evaluation import ablation, held_out
from chimle.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = Path(os.environ.get("CHIMLE_TEST_ASSETS", Path.home() / ".cache/chimle/test-assets")) / "mnist_5k.csv.gz"

TINY = replace(
    reproduce.QUICK,
    crop=16,
    mnist_steps=10,
    mnist_pool=16,
    mnist_eval_inputs=4,
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
    ablation_steps=2,
    ablation_seeds=2,  # a spread over seeds, so the ladder's z are numbers
    ablation_crops=1,
    table1_steps=2,
    table1_seeds=2,
    eval_samples=2,
    eval_images=2,
    pool=8,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of every part: (its folder, the results, report.md and report.html as first written)."""
    if not ASSET.exists():
        pytest.skip("MNIST digits: run scripts/fetch_test_assets.sh")
    tmp = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHIMLE_FASHION_MNIST", str(tmp / "no-fashion"))  # the note path; CI has none
        out = tmp / "report"
        results = reproduce.run_report(out, TINY, quick=True, mnist=ASSET)  # the digits passed, not through env
    return out, results, (out / "report.md").read_text(), (out / "report.html").read_text()


def section(md: str, title: str) -> str:
    """The text of the report's section whose heading contains `title`."""
    return next(s for s in md.split("\n## ") if s.startswith(title))


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def test_every_part_writes_its_result_and_figure(run):
    out, results, md, html = run
    assert [s.split("\n")[0] for s in md.split("\n## ")[1:]] == [
        "TIM Fig. 1: the MNIST illustration",
        "TIM Fig. 3 / CHIMLE Fig. 2: sample efficiency",
        "What makes the efficiency curve better or worse",
        "CHIMLE Fig. 7: ablations",
        "CHIMLE Table 1 at CPU scale, equal compute",
        "Time per part",
    ]
    for part in reproduce.PARTS:
        assert json.loads((out / part / "result.json").read_text())["seconds"] > 0
    times = section(md, "Time per part")
    for part, r in results.items():
        assert f"| {part} | {r['seconds']:.4g} |" in times
    figures = ("factors/factors.png", "table1/table1.png", "ablation/ablation.png", "efficiency/efficiency.png")
    for f in figures + ("mnist/fig1a_predictions.png", "mnist/fig1b_coordinates.png"):
        assert (out / f).stat().st_size > 1000 and f"![{f}]({f})" in md
    tables = sum(line.startswith("| --- |") for line in md.splitlines())
    assert html.count("data:image/png;base64,iVBOR") == 6 and html.count("<table>") == tables == 6


def test_mnist_numbers_are_the_runs(run):
    out, results, md, _ = run
    saved = json.loads((out / "mnist" / "metrics.json").read_text())  # what `chimle mnist`'s run wrote
    assert saved["steps"] == TINY.mnist_steps and saved["inputs"] == TINY.mnist_eval_inputs
    text = section(md, "TIM Fig. 1")
    m = re.search(
        r"of (\d+) unseen inputs: best of (\d+) predictions ([\d.]+), one prediction ([\d.]+), "
        r"the PCA input alone ([\d.]+)\. .* lie above (\d+)% .* above (\d+)% on average",
        text,
    )
    assert m, text
    assert m.groups() == (
        str(saved["inputs"]),
        str(saved["K"]),
        *(f"{saved[k]:.3f}" for k in ("rest_best_of_K", "rest_one_sample", "rest_pca_input")),
        *(f"{100 * saved[k]:.0f}" for k in ("real_density_percentile", "neighbours_density_percentile")),
    )
    assert results["mnist"]["rest_best_of_K"] == saved["rest_best_of_K"]


def test_efficiency_numbers_are_the_curves(run):
    out, results, md, _ = run
    curve = json.loads((out / "efficiency" / "efficiency.json").read_text())
    assert curve["rows"] == results["efficiency"]["rows"] and curve["seeds"] == TINY.efficiency_seeds
    assert [r["per_level_m"] for r in curve["rows"]] == [1, 2, "3,2,2"]
    stated = re.findall(
        r"at m = (\d+) CHIMLE reaches ([\d.e-]+) and cIMLE needs (\S+) times its samples \((\S+) times its compute\)",
        section(md, "TIM Fig. 3"),
    )
    fmt = lambda v: v if isinstance(v, str) else f"{v:.3g}"  # noqa: E731  ("> N": cIMLE never got there)
    uniform = [r for r in curve["rows"] if isinstance(r["per_level_m"], int)]
    assert stated == [
        (str(r["per_level_m"]), f"{r['lpips_threshold']:.4g}", fmt(r["ratio_samples"]), fmt(r["ratio_compute"]))
        for r in (uniform[0], uniform[-1])
    ]


def test_factors_every_setting(run):
    out, results, md, _ = run
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
    # each baseline repeats the last snapshot's rows; every setting's rows are cached in its own file
    last = [r for r in factors if r["setting"] == "6 steps"]
    for setting in ("6 steps, 16 px", "6 steps, image (chimle)"):
        again = [r for r in factors if r["setting"] == setting]
        assert [{**r, "factor": 0, "setting": 0} for r in again] == [{**r, "factor": 0, "setting": 0} for r in last]
    assert json.loads((out / "factors" / "rows" / "tanh.json").read_text()) == [
        r for r in factors if r["setting"] == "6 steps, tanh"
    ]
    (note,) = results["factors"]["notes"]  # no Fashion-MNIST here: its row is left out, and the report says so
    assert "no-fashion" in note and note in md and not any("Fashion" in r["setting"] for r in factors)


def test_ablation_numbers_follow_from_each_seeds_ladder(run):
    out, results, md, _ = run
    r = results["ablation"]
    per_seed = [json.loads((out / "ablation" / f"seed{s}" / "ablation.json").read_text()) for s in range(2)]
    assert r["images"] == 2 * TINY.ablation_crops and r["samples"] == TINY.eval_samples and r["seeds"] == 2
    kid = {row["ablation"]: mean_std([s[i]["kid"] for s in per_seed]) for i, row in enumerate(per_seed[0])}
    assert [(x["kid"], x["kid_std"]) for x in r["rows"]] == pytest.approx(list(kid.values()))
    assert [x["paper_fid_sr"] for x in r["rows"]] == list(reproduce.PAPER_ABLATION_FID_SR)
    assert all(math.isfinite(x["kid"]) and math.isfinite(x["fid"]) and x["kid_std"] >= 0 for x in r["rows"])
    # the prose: each rung's KID minus full's and its z over the seeds, then the paper's SR FID change in %
    text = section(md, "CHIMLE Fig. 7")
    stated = re.findall(r"(no_\w+) ([+-][\d.]+(?:e[+-]\d+)?) \(z ([+-][\d.]+|[+-]inf|nan)\)", text)
    (mf, sf), paper = kid["full"], reproduce.PAPER_ABLATION_FID_SR
    want = []
    for rung, (m, s) in list(kid.items())[1:]:
        z = (m - mf) / math.sqrt((s**2 + sf**2) / 2)
        want.append((rung, f"{m - mf:+.3g}", f"{z:+.2f}"))
    assert stated == want
    stated_paper = re.findall(r"(no_\w+) ([+-][\d.]+)%", text.split("the paper's SR FID")[1])
    assert stated_paper == [(n, f"{100 * (p / paper[0] - 1):+.1f}") for n, p in zip(list(kid)[1:], paper[1:])]
    counts = re.search(r"then (\d+) samples for each of (\d+) held-out crops; mean and spread over (\d+) seeds", text)
    assert counts.groups() == (str(TINY.eval_samples), str(r["images"]), "2")


def test_table1_numbers_follow_from_each_towers_evaluation(run):
    out, results, md, _ = run
    r = results["table1"]
    rows = r["rows"]
    assert {(x["task"], x["method"]) for x in rows} == {(t, m) for t in reproduce.TASKS for m in ("chimle", "cimle")}
    # cIMLE searched as many whole codes as CHIMLE's schedule costs (more than m_L, fewer than the sum)
    m_flat = int(next(x for x in rows if x["method"] == "cimle")["search"].split()[0])
    assert 2 <= m_flat <= sum(TINY.schedule) + 2
    for x in rows:
        assert x["paper_fid"] == reproduce.PAPER_TABLE1_FID[x["task"]][x["method"] == "cimle"]
        assert 0 < x["lpips_to_target_best_of_k"] < 1
    text = section(md, "CHIMLE Table 1")
    assert len(re.findall(r"\| (sr|colorize|jpeg|night) \| (chimle|cimle) \|", text)) == 8
    # every mean, spread and z from the towers' own metrics.json (one per task, method and seed)
    evals = {
        (t, m): [json.loads((out / "table1" / t / f"{m}_s{s}" / "eval" / "metrics.json").read_text()) for s in (0, 1)]
        for t in reproduce.TASKS
        for m in ("chimle", "cimle")
    }
    by = {(x["task"], x["method"]): x for x in rows}
    zs = {}
    for c in r["comparison"]:
        t = c["task"]
        for key, short in (("kid", "kid"), ("lpips_to_target_best_of_k", "lpips")):
            (ma, sa), (mb, sb) = (mean_std([e[key] for e in evals[t, m]]) for m in ("chimle", "cimle"))
            assert (by[t, "chimle"][key], by[t, "chimle"][f"{key}_std"]) == pytest.approx((ma, sa))
            z = (ma - mb) / math.sqrt((sa**2 + sb**2) / 2)
            assert c[f"{short}_diff"] == pytest.approx(ma - mb) and c[f"{short}_z"] == pytest.approx(z)
            assert c[f"{short}_verdict"] == ("CHIMLE lower" if z < -2 else "cIMLE lower" if z > 2 else "within noise")
            zs[t, short] = z
        row = f"| {t} | {c['kid_diff']:.4g} | {c['kid_z']:.4g} | {c['kid_verdict']} | {c['lpips_diff']:.4g} |"
        assert row in text
    assert [c["task"] for c in r["comparison"]] == list(reproduce.TASKS)
    stated = re.findall(r"is lower on (\d) of 4 tasks, beyond \|z\| = 2 on (\d), cIMLE's beyond it on (\d)", text)
    assert stated == [
        tuple(
            str(sum(f(zs[t, short]) for t in reproduce.TASKS))
            for f in (lambda z: z < 0, lambda z: z < -2, lambda z: z > 2)
        )
        for short in ("kid", "lpips")
    ]
    counts = re.search(r"over (\d+) seeds \((\d+) held-out tiles, (\d+) samples each\)", text)
    assert counts.groups() == ("2", str(TINY.eval_images), str(TINY.eval_samples))


def test_resume_reuses_every_part_and_a_rerun_every_tower(run, monkeypatch):
    out, results, md, _ = run
    # --resume: nothing is trained again, the report is the same
    before = {p: (out / p / "result.json").stat().st_mtime_ns for p in reproduce.PARTS}
    again = reproduce.run_report(out, TINY, resume=True, quick=True, mnist=ASSET)
    assert again == json.loads(json.dumps(results, default=float))
    assert {p: (out / p / "result.json").stat().st_mtime_ns for p in reproduce.PARTS} == before
    assert (out / "report.md").read_text() == md
    # without --resume the parts run again, but finished towers and Table 1's evaluations are reused
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail(f"{self.out} was trained again"))
    monkeypatch.setattr(held_out, "evaluate", lambda *a, **k: pytest.fail("an evaluation was run again"))
    monkeypatch.setattr(ablation, "generate", lambda *a, **k: pytest.fail("a rung was sampled again"))
    rerun = reproduce.run_report(out, TINY, parts=("ablation", "table1"), quick=True)
    for part in ("ablation", "table1"):
        a, b = (json.loads(json.dumps(r[part], default=float)) for r in (rerun, results))
        assert a.pop("seconds") > 0 and b.pop("seconds") > 0 and a == b, part
    # the report states the counts each part ran with, also when it is recomposed under other sizes
    reproduce.run_report(out, replace(TINY, eval_samples=5), resume=True, quick=True)
    md = (out / "report.md").read_text()
    assert "then 2 samples for each of 2 held-out crops" in md and "(2 held-out tiles, 2 samples each)" in md
    assert "5 samples" not in md
