"""The GPU path: CUDA tests (marked `cuda`, skipped without a GPU; run them with `pytest -m cuda`), and
on every machine the CPU parts of `chimle bench gpu` and the arithmetic of its verdicts."""

import contextlib
import json

import pytest
import torch

from chimle import search
from chimle.apps import bench_gpu
from chimle.apps.cli import main
from chimle.data.imageio import read_csv_columns
from chimle.distances import make_distance
from chimle.evaluation import precision
from chimle.model import TowerConfig, TowerModel
from chimle.training.pool import Pool
from chimle.training.step import optimize_step


def gpu(test):
    """Marks a test `cuda` (selected by `pytest -m cuda`) and skips it where there is no GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


# -- everywhere: the bench's CPU parts ---------------------------------------------------------------


def test_bench_gpu_cpu_parts_report_checkable_numbers(tmp_path, capsys, one_thread):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--quick", "--device", "cpu", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    # what a CPU cannot run is named, with the reason, in the JSON and in the table
    assert set(r["skipped"]) == {"memory", "speed", "ddp", "tiling"}
    assert all(why == "needs CUDA (no GPU here)" for why in r["skipped"].values())
    assert text.count("needs CUDA (no GPU here)") == 4
    for s in r["checks"]["search"]:
        levels = s["levels"]
        assert [lv["m"] for lv in levels] == s["counts"]
        same = sum(p == q for lv in levels for p, q in zip(lv["picks_fp32"], lv["picks_bf16"]))
        assert (s["identical_picks"], s["picks"]) == (same, s["inputs"] * len(levels))
        assert s["identical_fraction"] == same / s["picks"] and f"{same}/{s['picks']}" in text
        for lv in levels:
            assert all(0 <= p < lv["m"] for p in lv["picks_fp32"] + lv["picks_bf16"])
            # float32's pick is the float32 minimum: bf16's pick can only be as far or farther
            assert all(b >= a for a, b in zip(lv["d_fp32_at_fp32_pick"], lv["d_fp32_at_bf16_pick"]))
            assert all(med >= a for a, med in zip(lv["d_fp32_at_fp32_pick"], lv["d_fp32_median"]))
            # bf16 did run: its distances are off by rounding (float32 "bf16" would be off by 0)
            assert 1e-5 < lv["bf16_rel_err_mean"] <= lv["bf16_rel_err_max"] < 0.05
        # on a CPU the search itself runs in float32: it picks what the reference picks at level 1
        assert s["production_level1_same"] == s["inputs"]
        assert {k: s[k] for k in precision.summarize_search(levels)} == precision.summarize_search(levels)
    t = r["checks"]["train"]
    curves = t["curves"]
    assert [len(c) for c in curves.values()] == [t["steps"]] * 3
    assert curves["fp32"] != curves["fp32_other_order"]  # another batch order: another curve
    assert 1e-6 < t["first_step_rel_diff"] < 0.05  # same weights and batch: only the precision differs
    assert {k: t[k] for k in precision.summarize_train(curves, t["window"])} == precision.summarize_train(
        curves, t["window"]
    )
    assert t["passed"] == (t["window_gap_max"] <= t["tolerance"])


def test_search_summary_arithmetic():
    levels = [
        {  # input 1 differs: bf16 took a candidate 10% farther; the search gained 0.2 + 0.4 over the median
            "picks_fp32": [0, 2],
            "picks_bf16": [0, 1],
            "d_fp32_at_fp32_pick": [1.0, 2.0],
            "d_fp32_at_bf16_pick": [1.0, 2.2],
            "d_fp32_median": [1.2, 2.4],
        },
        {"picks_fp32": [1, 1], "picks_bf16": [1, 1], "d_fp32_at_fp32_pick": [1.0, 1.0]}
        | {"d_fp32_at_bf16_pick": [1.0, 1.0], "d_fp32_median": [1.0, 1.4]},
    ]
    s = precision.summarize_search(levels)
    assert (s["identical_picks"], s["picks"], s["identical_fraction"]) == (3, 4, 0.75)
    assert s["identical_codes_fraction"] == 0.5
    assert s["gap_rel_mean_when_different"] == pytest.approx(0.1) == s["gap_rel_max"]
    assert s["search_gain_kept"] == pytest.approx(1 - 0.2 / 1.0) and not s["passed"]  # kept 80% < 95%


def test_train_summary_arithmetic():
    fp32 = [1.0, 0.9, 0.8, 0.7]  # windows of 2: 0.95, 0.75
    ok = precision.summarize_train({"fp32": fp32, "bf16": [1.001, 0.9, 0.81, 0.7], "fp32_other_order": [1.1] * 4}, 2)
    assert ok["first_step_rel_diff"] == pytest.approx(1e-3)
    assert ok["window_gap_max"] == pytest.approx(0.005 / 0.75)  # windows 0.9505, 0.755
    assert ok["tolerance"] == pytest.approx(0.35 / 0.75) and ok["passed"]
    assert ok["fp32_drop"] == pytest.approx(1 - 0.75 / 0.95)
    drift = precision.summarize_train({"fp32": fp32, "bf16": [1.0, 0.9, 1.2, 1.3], "fp32_other_order": fp32[::-1]}, 2)
    assert drift["window_gap_max"] == pytest.approx(0.5 / 0.75) and drift["tolerance"] == pytest.approx(0.2 / 0.75)
    assert not drift["passed"]


# -- CUDA ------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_fast_step_matches_plain_step(amp):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("small", layout="upscale", levels=3)).to(dev)
    plain = TowerModel(model.cfg).to(dev)
    plain.load_state_dict(model.state_dict())
    d = make_distance("vgg").to(dev)
    x, y = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 64, 64)
    codes = model.sample_codes(5, torch.Generator(device=dev).manual_seed(1), input_hw=(8, 8))
    pool = Pool(0, x, y, codes, torch.zeros(5), torch.zeros(5, 3, dtype=torch.long))
    rows = [3, 0, 4]
    xb, yb, cb = pool.batch(rows, dev)
    with precision.float32(dev) if not amp else contextlib.nullcontext():  # float32: TF32 off, a tight check
        ref = optimize_step(plain, torch.optim.SGD(plain.parameters(), lr=0.0), xb, yb, cb, d, amp=amp)
        got = optimize_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            xb,
            pool.loss_targets(rows, model.cfg.output_sizes(8, 8), d, dev),
            cb,
            d,
            amp=amp,
        )
    assert pool.target_cache and all(t.image.device.type == "cuda" for t in pool.target_cache[0])
    tol = 2e-2 if amp else 1e-4  # bf16: both are bf16 forwards (cuDNN may pick other kernels run to run)
    torch.testing.assert_close(got, ref, rtol=tol, atol=1e-6)
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=tol * 10, atol=tol * scale, msg=name)


@gpu
def test_cuda_bench_gpu_quick_passes(tmp_path):
    """The whole GPU check suite, small: every check runs (none skipped) and passes."""
    out = tmp_path / "gpu.json"
    rc = main(["bench", "gpu", "--quick", "--json", str(out), "--budget", "900"])
    r = json.loads(out.read_text())
    assert not r["skipped"], r["skipped"]
    assert set(r["checks"]) == set(bench_gpu.CHECKS)
    assert rc == 0, bench_gpu.failed(r)


@gpu
def test_cuda_trainer_resume_replays_the_pool(photo_dir, tmp_path):
    """Training on CUDA: the search draws its candidates with generators on the GPU, and a resumed run
    redraws the same pool codes bit for bit (and continues at the same losses, up to cuDNN's choices)."""
    from test_train import tiny_cfg

    from chimle.training.trainer import Trainer

    cfg = lambda out, **kw: tiny_cfg(photo_dir, out, **{"train.device": "cuda", **kw})  # noqa: E731
    full = Trainer(cfg(tmp_path / "a"), quiet=True)
    full.run()
    part = Trainer(cfg(tmp_path / "b", **{"train.steps": 7}), quiet=True)
    part.run()
    resumed = Trainer(cfg(tmp_path / "b"), resume=True, quiet=True)
    for a, b in zip(part.pool.codes, resumed.pool.codes, strict=True):
        assert a.style.device.type == "cuda" and torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise)
    resumed.run()
    la, lb = read_csv_columns(tmp_path / "a" / "log.csv"), read_csv_columns(tmp_path / "b" / "log.csv")
    assert la["step"] == lb["step"] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor(lb["loss"]), torch.tensor(la["loss"]), rtol=5e-2, atol=0)


@gpu
def test_cuda_search_accepts_a_cpu_generator():
    """A CPU generator with a CUDA model: the codes are drawn on the CPU and moved (chimle/latent.py)."""
    dev = torch.device("cuda")
    model = TowerModel(TowerConfig.preset("tiny", layout="upscale", levels=2)).to(dev)
    x, y = torch.rand(1, 3, 8, 8, device=dev), torch.rand(1, 3, 32, 32, device=dev)
    search.hierarchical(model, x, y, make_distance("alex").to(dev), [2, 2], torch.Generator().manual_seed(0))
