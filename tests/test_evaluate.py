"""chimle.evaluate and the quality benchmarks: `evaluate` end to end on real photos, the
sample-efficiency curve, and `chimle eval` / `chimle bench efficiency|ablation` through the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from chimle import latent, search
from chimle.apps.cli import main
from chimle.data import ImageDataset, make_task
from chimle.data.imageio import list_images, load_image
from chimle.distances.lpips import LPIPS
from chimle.evaluation import ablation, efficiency
from chimle.evaluation import evaluate as ev
from chimle.evaluation.efficiency import EfficiencyOptions
from chimle.evaluation.held_out import fresh_metrics
from chimle.inference.sample import generate
from chimle.inference.weights import load_with_task
from chimle.resample import resize as downsample
from chimle.rng import Stream, seeded
from chimle.search import ABLATIONS
from chimle.training.trainer import Trainer

TINY = ["--preset", "tiny", "--task", "sr", "--scale", "4", "--crop", "16"]
TINY_SET = [
    "--set",
    "train.pool_size=2",
    "--set",
    "search.samples_per_level=[2,2]",
    "--set",
    "search.distance=alex",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.sample_every=0",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, photo_dir):
    """A briefly trained tiny 4x SR tower (2 levels), as a training checkpoint."""
    out = tmp_path_factory.mktemp("run")
    assert (
        main(
            ["train", "--data", str(photo_dir), "--out", str(out), "--steps", "4", "--device", "cpu", *TINY, *TINY_SET]
        )
        == 0
    )
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, photo_dir):
    """Three of the photos, as a held-out folder."""
    d = tmp_path_factory.mktemp("held_out")
    for p in list_images(photo_dir)[:3]:
        shutil.copy(p, d / p.name)
    return d


def test_evaluate_writes_every_metric(ckpt, held_out, tmp_path):
    model, task_cfg = load_with_task(ckpt)
    task = make_task(**task_cfg)
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="FID from 3 real and 9 fake images with 2048-d features is unreliable"):
        ivo = ev.EvalOptions(ivo_runs=2, ivo_steps=15)
        r = ev.evaluate(model, task, held_out, num_samples=3, out_dir=out, crop=16, options=ivo)
    assert (r["images"], r["samples_per_input"], r["fake_images"], r["crop"]) == (3, 3, 9, 16)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(r))
    for f in ("metrics.md", "prd.png", "samples.png"):
        assert (out / f).stat().st_size > 500, f
    md = (out / "metrics.md").read_text()
    assert "| fwv_0.2 |" in md and "| fid |" in md and "unreliable" in md
    grid = load_image(out / "samples.png")
    assert grid.shape[-2] > 3 * 16 and grid.shape[-1] > 5 * 16  # 3 rows: input | 3 samples | target

    assert math.isfinite(r["fid"]) and r["fid"] > 0
    assert math.isfinite(r["kid"]) and r["kid_std"] >= 0 and r["kid_subset_size"] == 3
    # FwV: the weights exp(-d / (2 sigma^2)) grow with sigma, and stay below 1 (FwV < mean distance to the mean)
    assert 0 <= r["fwv_0.15"] <= r["fwv_0.2"] <= r["fwv_0.3"] < 1
    assert 0 < r["lpips_diversity"] < 1  # different samples of one input
    # samples differ, so the best of K is nearer the target than the average sample
    assert 0 < r["lpips_to_target_best_of_k"] < 0.99 * r["lpips_to_target_mean"] < 1
    assert r["ivo_mean"] > 0 and r["ivo_std"] >= 0 and (r["ivo_runs"], r["ivo_steps"], r["ivo_images"]) == (2, 15, 3)
    # IvO is an MSE x 1e3 after optimising the code: below the MSE x 1e3 of random samples
    ds = ImageDataset(held_out, task, crop=16, train=False)
    x, y = (torch.stack([ds[i][k] for i in range(3)]) for k in ("input", "target"))
    random_mse = float((generate(model, x, 4, torch.Generator().manual_seed(9)) - y).pow(2).mean()) * 1e3
    print(f"IvO {r['ivo_mean']:.3f} vs random samples {random_mse:.3f} (x 1e-3)")
    assert 0 < r["ivo_mean"] < random_mse
    assert any("FID from 3 real" in w for w in r["warnings"]) and any("KID" in w for w in r["warnings"])
    # consistency: the samples downsampled back to the inputs, against the inputs (recomputed here)
    samples = generate(model, x, 3, seeded(0, Stream.EVAL_SAMPLES))
    diff = torch.nn.functional.interpolate(samples.flatten(0, 1), size=x.shape[-2:], mode="bicubic", antialias=True)
    diff = diff.clamp(0, 1).view(3, *x.shape) - x
    assert r["consistency_mae"] == pytest.approx(float(diff.abs().mean()), rel=1e-4)
    assert r["consistency_shift"] == pytest.approx(diff.mean((0, 1, 3, 4)).tolist(), abs=1e-6)
    assert "| consistency_mae |" in md

    with pytest.raises(ValueError, match="num_samples"):
        ev.evaluate(model, task, held_out, num_samples=1, out_dir=out, crop=16)
    with pytest.raises(ValueError, match="train=False"):
        ev.evaluate(model, task, ImageDataset(held_out, task, crop=16, train=True), out_dir=out)


def test_evaluate_colorize_chroma_metrics(held_out, tmp_path):
    """For colourisation, evaluate reports the chroma distance to the photo (best of K and mean) and the
    chroma spread, equal to the metric functions on the same samples (an untrained tiny tower)."""
    from chimle.evaluation import metrics
    from chimle.model import TowerConfig, TowerModel

    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", levels=2, in_channels=1, out_channels=2, style_grid=2)).eval()
    task = make_task("colorize")
    with pytest.warns(UserWarning):
        r = ev.evaluate(
            model, task, held_out, num_samples=3, out_dir=tmp_path, crop=16, options=ev.EvalOptions(ivo_runs=0)
        )
    ds = ImageDataset(held_out, task, crop=16, train=False)
    x, y = (torch.stack([ds[i][k] for i in range(3)]) for k in ("input", "target"))
    samples = generate(model, x, 3, seeded(0, Stream.EVAL_SAMPLES), task=task)
    err, spread = metrics.chroma_error(samples, y), metrics.chroma_spread(samples)
    assert r["chroma_error_best_of_k"] == pytest.approx(err["best_of_k"], rel=1e-5)
    assert r["chroma_error_mean"] == pytest.approx(err["mean"], rel=1e-5)
    assert 0 < r["chroma_error_best_of_k"] < r["chroma_error_mean"]  # the samples differ in colour
    assert r["chroma_spread_regional"] == pytest.approx(spread["regional"], rel=1e-5)
    assert "| chroma_error_best_of_k |" in (tmp_path / "metrics.md").read_text()


def test_sample_efficiency_curve(ckpt, held_out, tmp_path):
    model, task_cfg = load_with_task(ckpt)
    task = make_task(**task_cfg)
    ds = ImageDataset(held_out, task, crop=16, train=False)
    x = torch.stack([ds[i]["input"] for i in range(len(ds))])
    y = torch.stack([ds[i]["target"] for i in range(len(ds))])
    d = LPIPS("alex")
    options = EfficiencyOptions(seeds=3, budgets=(1, 2, 4, 8), flat_max=48, schedules=[(3, 1)])
    r = efficiency.sample_efficiency(model, x, y, d, options)
    rows, levels = r["rows"], model.cfg.levels
    print(rows)
    assert [row["per_level_m"] for row in rows] == [1, 2, 4, 8, "3,1"]
    # the non-uniform schedule's row is search.hierarchical itself, one run per seed
    runs = [search.hierarchical(model, x, y, d, [3, 1], seeded(0, s, 2))[1].double().mean() for s in range(3)]
    assert rows[-1]["lpips_threshold"] == pytest.approx(float(np.mean(runs)), abs=1e-6)
    assert rows[-1]["threshold_std"] == pytest.approx(float(np.std(runs)), abs=1e-6) and rows[-1]["chimle_samples"] == 4
    # compute: every row's cost is search_cost on this model's per-level FLOPs; a flat sample costs 1
    costs = search.level_costs(model, tuple(x.shape[-2:]), d)
    for row, sched in zip(rows, [[m] * levels for m in (1, 2, 4, 8)] + [[3, 1]]):
        assert row["chimle_compute"] == round(search.search_cost(costs, sched), 3)
    rows = rows[:4]
    assert [row["chimle_samples"] for row in rows] == [levels * m for m in (1, 2, 4, 8)]
    t = [row["lpips_threshold"] for row in rows]
    assert all(a >= b for a, b in zip(t, t[1:])) and t[0] > t[-1]  # more candidates, closer
    curve = np.array(r["cimle_curve"])
    assert curve.shape == (48,) and np.all(np.diff(curve) <= 0)  # expected best-of-n only falls
    for row in rows:
        n = row["cimle_samples"]
        if isinstance(n, int):  # the smallest n whose best-of-n reaches the threshold
            assert 1 <= n <= 48 and curve[n - 1] <= row["lpips_threshold"]
            assert n == 1 or curve[n - 2] > row["lpips_threshold"]
            assert row["ratio_samples"] == pytest.approx(n / row["chimle_samples"])
            assert row["ratio_compute"] == pytest.approx(n / row["chimle_compute"], rel=1e-3)
        else:
            assert n == "> 48" and curve[-1] > row["lpips_threshold"]
    # one seed at the largest budget is exactly search.hierarchical with that seed's generator
    options = EfficiencyOptions(seeds=1, budgets=(2, 8), flat_max=4, seed=5)
    one = efficiency.sample_efficiency(model, x, y, d, options)
    _, dists = search.hierarchical(model, x, y, d, [8] * levels, seeded(5, 0, 0, device=model.device))
    assert one["rows"][-1]["lpips_threshold"] == pytest.approx(float(dists.double().mean()), abs=1e-6)
    assert efficiency.sample_efficiency(model, x, y, d, options) == one  # deterministic
    assert efficiency.plot_efficiency(r, tmp_path / "eff.png").stat().st_size > 1000
    table = ev.write_markdown_table(rows, tmp_path / "eff.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| 1 | 2 | ")


def test_level_diagnostics_match_direct_forward(ckpt, held_out):
    model, task_cfg = load_with_task(ckpt)
    ds = ImageDataset(held_out, make_task(**task_cfg), crop=16, train=False)
    x, y = (torch.stack([ds[i][k] for i in range(2)]) for k in ("input", "target"))
    d, draws = LPIPS("alex"), 5
    diag = efficiency.level_diagnostics(model, x, y, d, draws=draws, seed=4)
    # the same codes by hand (the function's documented draw order), scored by plain forward passes
    layout, g = model.latent_layout(tuple(x.shape[-2:])), seeded(4, 2, device=model.device)
    base = latent.repeat(layout.sample(2, g), draws)
    xr, yr = x.repeat_interleave(draws, 0), y.repeat_interleave(draws, 0)
    with torch.no_grad():
        for row in diag:
            codes = latent.replace(base, row["level"], layout.sample_level(row["level"], 2 * draws, g))
            outs = model(xr, codes)
            final = d(outs[-1], yr).view(2, draws).double()
            part = d(outs[row["level"] - 1], downsample(yr, tuple(outs[row["level"] - 1].shape[-2:])))
            corr = np.mean(
                [np.corrcoef(f, p)[0, 1] for f, p in zip(final.numpy(), part.view(2, draws).double().numpy())]
            )
            assert row["final_std"] == pytest.approx(final.std(1).mean().item(), rel=1e-4)
            assert row["partial_final_corr"] == pytest.approx(corr, abs=1e-4)


def test_cli_eval(ckpt, held_out, tmp_path, capsys):
    out = tmp_path / "cli_eval"
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "--data",
                str(held_out),
                "--num",
                "2",
                "--out",
                str(out),
                "--crop",
                "16",
                "--max-images",
                "2",
                "--seed",
                "3",
                "--ivo-runs",
                "1",
                "--ivo-steps",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    r = json.loads((out / "metrics.json").read_text())
    assert (r["images"], r["samples_per_input"], r["seed"], r["ivo_steps"]) == (2, 2, 3, 3)
    for key in ("fid", "kid", "fwv_0.2", "lpips_diversity"):
        assert f"{key}: {r[key]:.6g}" in printed
    assert "2 images x 2 samples" in printed and "unreliable" in printed
    assert (out / "metrics.md").exists() and (out / "prd.png").exists() and (out / "samples.png").exists()
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2  # one-line error


def test_cli_bench_efficiency(ckpt, held_out, tmp_path):
    out = tmp_path / "eff"
    assert (
        main(
            [
                "bench",
                "efficiency",
                str(ckpt),
                "--data",
                str(held_out),
                "--out",
                str(out),
                "--seeds",
                "2",
                "--images",
                "2",
                "--budgets",
                "1,4",
                "--flat-max",
                "24",
                "--schedule",
                "3,1",
            ]
        )
        == 0
    )
    r = json.loads((out / "efficiency.json").read_text())
    assert (r["seeds"], r["images"], r["budgets"], r["flat_max"], r["levels"]) == (2, 2, [1, 4], 24, 2)
    assert [row["chimle_samples"] for row in r["rows"]] == [2, 8, 4] and r["schedules"] == [[3, 1]]
    assert r["rows"][0]["lpips_threshold"] >= r["rows"][1]["lpips_threshold"] > 0
    header = (
        "| per_level_m | chimle_samples | chimle_compute | lpips_threshold | threshold_std | cimle_samples "
        "| ratio_samples | ratio_compute |"
    )
    assert (out / "efficiency.md").read_text().startswith(header)
    assert (out / "efficiency.png").stat().st_size > 1000
    # per-level diagnostics: at the last level the partial output is the final one (correlation 1);
    # every level's component moves the final distance
    diag = r["level_diagnostics"]
    assert [row["level"] for row in diag] == [1, 2]
    assert diag[-1]["partial_final_corr"] == pytest.approx(1.0, abs=1e-6)
    assert all(row["final_std"] > 1e-4 for row in diag)
    assert (out / "levels.md").read_text().startswith("| level | final_std | partial_final_corr |")


def test_cli_bench_ablation(held_out, tmp_path, monkeypatch):
    out = tmp_path / "abl"  # trains on the held-out photos too: this checks the plumbing, not generalisation

    def bench() -> int:
        return main(
            [
                "bench",
                "ablation",
                "--data",
                str(held_out),
                "--held-out",
                str(held_out),
                "--out",
                str(out),
                "--steps",
                "2",
                "--preset",
                "tiny",
                "--task",
                "sr",
                "--scale",
                "4",
                "--crop",
                "16",
                "--samples",
                "2",
                "--crops-per-image",
                "1",
                *TINY_SET,
            ]
        )

    assert bench() == 0
    rows = json.loads((out / "ablation.json").read_text())
    assert [row["ablation"] for row in rows] == list(ABLATIONS)
    for row in rows:
        assert math.isfinite(row["fid"]) and row["fid"] > 0 and math.isfinite(row["final_train_loss"])
        assert math.isfinite(row["kid"]) and row["kid_subsets_std"] >= 0
        assert 0 < row["lpips_best_of_k"] <= row["lpips_mean"] < 1 and (row["images"], row["samples"]) == (3, 2)
    assert len({row["lpips_mean"] for row in rows}) > 1  # each rung trained its own model
    assert (out / "ablation.md").read_text().count("\n") == len(rows) + 2 and (out / "ablation.png").exists()
    for rung in ABLATIONS:
        assert (out / rung / "checkpoints" / "last.pt").exists()
    # a rerun reuses every rung's weights and metrics
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail(f"{self.out} was trained again"))
    monkeypatch.setattr(ablation, "generate", lambda *a, **k: pytest.fail("a rung was sampled again"))
    assert bench() == 0 and json.loads((out / "ablation.json").read_text()) == rows


def test_fresh_metrics_only_for_these_weights_and_counts(tmp_path):
    ckpt, saved = tmp_path / "last.pt", tmp_path / "metrics.json"
    ckpt.write_bytes(b"weights")
    saved.write_text(json.dumps({"samples": 6, "images": 48, "kid": 0.1}))
    os.utime(ckpt, ns=(10**18, 10**18))
    os.utime(saved, ns=(10**18 + 10**6, 10**18 + 10**6))  # written 1 ms after the weights
    assert fresh_metrics(saved, ckpt, samples=6, images=48)["kid"] == 0.1
    assert fresh_metrics(saved, ckpt, samples=6, images=None)["kid"] == 0.1  # None: any
    assert fresh_metrics(saved, ckpt, samples=4, images=48) is None
    assert fresh_metrics(saved, ckpt, samples=6, other="x") is None  # a count it never saved
    os.utime(ckpt, ns=(10**18 + 10**9, 10**18 + 10**9))  # the weights trained on after the metrics
    assert fresh_metrics(saved, ckpt, samples=6) is None
    assert fresh_metrics(tmp_path / "none.json", ckpt) is None
