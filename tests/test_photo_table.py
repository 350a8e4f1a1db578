"""`chimle reproduce --parts photos` (`chimle.evaluation.photo_table`) at QUICK size on a tiny folder of photos:
every number it writes recomputed from the towers' own files, the report's section, a rerun that reuses every
tower and evaluation, and the message when the photo corpus is missing."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import yaml

from chimle.apps import reproduce
from chimle.data.imageio import load_image, save_image
from chimle.data.tasks import make_task
from chimle.distances import make_distance
from chimle.evaluation import held_out, photo_table, stats
from chimle.inference.weights import load_with_task
from chimle.search import level_costs, search_cost
from chimle.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers: a second thread only adds waiting


@pytest.fixture(scope="module")
def run(tmp_path_factory, photo_dir):
    """One run of the part through `chimle reproduce`: (the report folder, its sizes, the part's result,
    report.md, the held-out photos). Two bundled photos train; two others, cropped small, are held out (the
    six whole photos give 1,548 tiles of 32 px: seconds to write and to check, for 3 tiles scored)."""
    tmp = tmp_path_factory.mktemp("photo_table")
    train, held = tmp / "train", tmp / "held_out"
    train.mkdir()
    for name in ("astronaut", "coffee"):
        shutil.copy(photo_dir / f"{name}.png", train)
    save_image(load_image(photo_dir / "chelsea.png")[:, :64, :96], held / "chelsea.png")  # 2 x 3 tiles
    save_image(load_image(photo_dir / "rocket.png")[:, :64, :64], held / "rocket.png")  # 2 x 2 tiles
    sizes = replace(reproduce.QUICK, photos=replace(photo_table.QUICK, data=str(train)))
    out = tmp / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(photo_table, "builtin_photo_dir", lambda: held)
        results = reproduce.run_report(out, sizes, parts=("photos",), quick=True)
    return out, sizes, results["photos"], (out / "report.md").read_text(), held


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def test_every_number_follows_from_the_towers_files(run):
    out, sizes, r, _, _ = run
    sz, part = sizes.photos, out / "photos"
    assert json.loads((part / "result.json").read_text()) == json.loads(json.dumps(r))
    # the held-out tiles: both photos cut, the first eval_images scored
    assert len(list((part / "tiles_32px").glob("*.png"))) == 10 and r["tiles"] == sz.eval_images == 3
    assert r["train_photos"] == 2 and r["level_px"] == [8, 16, 32] and r["input_px"] == 4
    # cIMLE's whole codes: what CHIMLE's schedule costs on this tower, and what its tower trained with
    model, task_cfg = load_with_task(part / "chimle_s0" / "checkpoints" / "last.pt")
    cost = search_cost(level_costs(model, (4, 4), make_distance("alex"), make_task(**task_cfg).rgb), sz.schedule)
    assert r["chimle_cost"] == pytest.approx(cost) and r["m_flat"] == max(1, round(cost))
    for seed in range(sz.seeds):
        search = yaml.safe_load((part / f"cimle_s{seed}" / "config.yaml").read_text())["search"]
        assert (search["method"], search["num_samples"]) == ("cimle", r["m_flat"])
    # every per-seed row is its tower's evaluation and training time
    assert [(x["method"], x["seed"]) for x in r["runs"]] == [(m, s) for s in range(2) for m in ("chimle", "cimle")]
    for x in r["runs"]:
        tower = part / f"{x['method']}_s{x['seed']}"
        saved = json.loads((tower / "eval" / "metrics.json").read_text())
        assert saved["images"] == 3 and saved["samples_per_input"] == sz.eval_samples and saved["crop"] == 32
        assert {k: x[k] for k in photo_table.METRICS} == {k: saved[k] for k in photo_table.METRICS}
        timing = json.loads((tower / "train_seconds.json").read_text())
        assert timing["step"] == sz.steps and x["train_seconds"] == timing["seconds"] > 0
    assert r["train_hours"] == pytest.approx(sum(x["train_seconds"] for x in r["runs"]) / 3600)
    # the rows: mean and spread over seeds, finite; the comparison: z from the rows, paired z from the seeds
    by = {x["method"]: x for x in r["rows"]}
    assert set(by) == {"chimle", "cimle"} and all(x["seeds"] == 2 for x in r["rows"])
    for method, row in by.items():
        for key in photo_table.METRICS:
            per_seed = [x[key] for x in r["runs"] if x["method"] == method]
            assert (row[key], row[f"{key}_std"]) == pytest.approx(mean_std(per_seed))
            assert math.isfinite(row[key]) and math.isfinite(row[f"{key}_std"]) and row[f"{key}_std"] >= 0
    assert [c["metric"] for c in r["comparison"]] == list(photo_table.METRICS)
    for c in r["comparison"]:
        key, a, b = c["metric"], by["chimle"], by["cimle"]
        z = stats.z_of_means(a[key], a[f"{key}_std"], b[key], b[f"{key}_std"], 2)
        assert c["z"] == pytest.approx(z) and c["diff"] == pytest.approx(a[key] - b[key])
        chimle, cimle = ([x[key] for x in r["runs"] if x["method"] == m] for m in ("chimle", "cimle"))
        d = [x - y for x, y in zip(chimle, cimle)]
        assert c["paired_z"] == pytest.approx(np.mean(d) / (np.std(d, ddof=1) / math.sqrt(2)))
        lower = photo_table.METRICS[key]
        want = "within noise" if abs(z) <= stats.VERDICT_Z else "CHIMLE" if (c["diff"] < 0) == lower else "cIMLE"
        assert c["better"] == want
    assert r["figure"] == "photos/photos.png" and (out / r["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_section_states_the_results(run):
    out, sizes, r, md, _ = run
    text = next(s for s in md.split("\n## ") if s.startswith("Table 1 where level 1 works at 64 px (photos)"))
    for row in r["rows"]:
        for key in photo_table.METRICS:
            assert f"{row[key]:.4g} +- {row[f'{key}_std']:.2g}" in text, (row["method"], key)
    for c in r["comparison"]:
        assert f"| {c['metric']} | {c['chimle']:.4g} | {c['chimle_std']:.4g} | {c['cimle']:.4g} |" in text
        assert f"| {c['z']:.4g} | {c['paired_z']:.4g} | {c['better']} |" in text
    assert f"m_l = 3,2,2 costs {r['chimle_cost']:.2f} full-forward equivalents" in text
    assert f"cIMLE draws m_flat = {r['m_flat']} whole codes" in text and f"| {r['m_flat']} whole codes |" in text
    assert "trained on 32 px crops (4 -> 32 px; the levels output 8, 16, 32 px, so level 1 works at 8 px;" in text
    assert f"{sizes.photos.steps} steps" in text and f"{sizes.photos.seeds} seeds" in text
    assert "Scores on 3 held-out tiles of 32 px" in text and photo_table.verdict(r["comparison"]) in text
    assert f"trained {r['train_hours']:.2f} h in all" in text
    assert re.search(r"of 5 metrics, \d favour CHIMLE beyond \|z\| = 2", text)
    assert "![photos/photos.png](photos/photos.png)" in text
    assert "| photos |" in md.split("## Time per part")[1]


def test_a_rerun_reuses_every_tower_and_evaluation(run, monkeypatch):
    out, sizes, r, _, held = run
    checkpoints = sorted((out / "photos").glob("*_s*/checkpoints/last.pt"))
    assert len(checkpoints) == 4
    before = [p.stat().st_mtime_ns for p in checkpoints]
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail(f"{self.out} was trained again"))
    monkeypatch.setattr(held_out, "evaluate", lambda *a, **k: pytest.fail("a tower was evaluated again"))
    monkeypatch.setattr(photo_table, "builtin_photo_dir", lambda: held)
    again = reproduce.run_report(out, sizes, parts=("photos",), quick=True)["photos"]
    assert [p.stat().st_mtime_ns for p in checkpoints] == before
    a, b = json.loads(json.dumps(again)), json.loads(json.dumps(r))
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0 and a == b  # the training times too: a reuse adds none


def test_a_missing_corpus_is_named_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no photo corpus in .*: run scripts/fetch_photos.sh first"):
        photo_table.run(tmp_path / "out", photo_table.QUICK)
    assert not (tmp_path / "out").exists()


def test_a_tower_another_process_holds_is_left_to_it(tmp_path, photo_dir, monkeypatch):
    """The same --resume line in two terminals: a tower whose folder is locked (here by this test, as another
    process's training would) is skipped, the others are trained and evaluated meanwhile, and it is taken up once free;
    its training-time record is not touched while another process holds it."""
    from chimle.training.faults import RunLock

    train, tiles = tmp_path / "train", tmp_path / "tiles"
    train.mkdir()
    shutil.copy(photo_dir / "coffee.png", train)
    for i, (r, c) in enumerate(((0, 0), (64, 32), (128, 96))):
        save_image(load_image(photo_dir / "chelsea.png")[:, r : r + 32, c : c + 32], tiles / f"t{i}.png")
    sz = replace(photo_table.QUICK, data=str(train), seeds=1)
    out = tmp_path / "photos"
    other = RunLock(out / "chimle_s0")
    other.acquire()
    seen = []

    def wait(seconds: float) -> None:  # the other process finishes CHIMLE's tower while this one waits
        seen.append({p.name: (p / "eval" / "metrics.json").exists() for p in (out / "chimle_s0", out / "cimle_s0")})
        other.release()

    monkeypatch.setattr(photo_table.time, "sleep", wait)
    r = photo_table.run(out, sz, tiles=tiles)
    assert seen == [{"chimle_s0": False, "cimle_s0": True}]  # cIMLE trained and evaluated while CHIMLE's was held
    assert [(x["method"], x["images"]) for x in r["runs"]] == [("chimle", 3), ("cimle", 3)]
    for name in ("chimle_s0", "cimle_s0"):
        assert json.loads((out / name / "train_seconds.json").read_text())["step"] == sz.steps
        assert not (out / name / "train.lock").exists()
