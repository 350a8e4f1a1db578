"""Latent search: Algorithm 1 (CHIMLE), Eq. 1 (cIMLE) and the ablations against brute force."""

import pytest
import torch

from chimle import latent
from chimle.memory import chunk_rows, parse_bytes
from chimle.model import TowerConfig, TowerModel
from chimle.search import Method, SearchOptions, ablation, choose, flat, hierarchical, reference_hierarchical, replay

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


def mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


@pytest.fixture(params=["same", "upscale"])
def setup(request):
    torch.manual_seed(0)
    layout = request.param
    model = TowerModel(TowerConfig.preset("tiny", layout=layout)).eval()
    hw = (16, 16) if layout == "same" else (4, 6)
    x = torch.rand(3, 3, *hw)
    with torch.no_grad():
        y = model(x, model.sample_codes(3, torch.Generator().manual_seed(99), input_hw=hw))[-1]
    y = (y + 0.05 * torch.randn_like(y)).clamp(0, 1)
    return model, x, y, hw


@pytest.mark.parametrize("iterative,partial", [(True, True), (False, True), (False, False), (True, False)])
def test_hierarchical_is_true_argmin(setup, iterative, partial):
    model, x, y, _ = setup
    counts = [5, 4, 3]
    codes, dists = hierarchical(
        model,
        x,
        y,
        mse,
        counts,
        torch.Generator().manual_seed(7),
        iterative=iterative,
        partial=partial,
        options=SearchOptions(memory_budget=50_000),
    )
    # Algorithm 1 written plainly: one full forward per candidate, drawing in the same order
    ref_codes, ref_final = reference_hierarchical(
        model, x, y, mse, counts, torch.Generator().manual_seed(7), iterative=iterative, partial=partial
    )
    for a, b in zip(codes, ref_codes):
        assert torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise)
    torch.testing.assert_close(dists, ref_final, atol=1e-6, rtol=1e-5)


def test_flat_is_true_argmin(setup):
    model, x, y, hw = setup
    codes, dists = flat(model, x, y, mse, 6, torch.Generator().manual_seed(3), options=SearchOptions(30_000))
    cands = model.latent_layout(hw).sample(3 * 6, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(3):
            rows = list(range(i * 6, i * 6 + 6))
            ds = torch.stack([mse(model(x[i : i + 1], latent.index(cands, [r]))[-1], y[i : i + 1])[0] for r in rows])
            j = int(ds.argmin())
            assert torch.equal(codes[0].style[i], cands[0].style[rows[j]])
            assert torch.equal(codes[-1].noise[i], cands[-1].noise[rows[j]])
            assert abs(dists[i].item() - ds[j].item()) < 1e-6
            assert dists[i] <= ds.min() + 1e-7


def test_deterministic_and_chunk_independent(setup):
    model, x, y, _ = setup
    a = hierarchical(model, x, y, mse, [4, 3, 2], torch.Generator().manual_seed(5), options=SearchOptions("1GB"))
    b = hierarchical(model, x, y, mse, [4, 3, 2], torch.Generator().manual_seed(5), options=SearchOptions(10_000))
    assert all(torch.equal(p.noise, q.noise) for p, q in zip(a[0], b[0]))
    torch.testing.assert_close(a[1], b[1])
    c = hierarchical(model, x, y, mse, [4, 3, 2], torch.Generator().manual_seed(6))
    assert not torch.equal(a[0][0].style, c[0][0].style)


def test_more_samples_get_closer(setup):
    model, x, y, _ = setup
    few = flat(model, x, y, mse, 2, torch.Generator().manual_seed(0))[1].mean()
    many = flat(model, x, y, mse, 64, torch.Generator().manual_seed(0))[1].mean()
    assert many < few


def test_ablation_ladder_and_zero_code(setup):
    model, x, y, _ = setup
    for name in ("full", "no_ic", "no_ic_pe", "no_ic_pe_cd"):
        codes, d = ablation(name, model, x, y, mse, [3, 3, 2], torch.Generator().manual_seed(1))
        assert len(codes) == 3 and d.shape == (3,)
        with torch.no_grad():
            torch.testing.assert_close(d, mse(model(x, codes)[-1], y), atol=1e-6, rtol=1e-5)
    zc, zd = flat(model, x, y, mse, 1, zero=True)
    assert all(float(c.style.abs().sum()) == 0 for c in zc)
    with pytest.raises(ValueError):
        ablation("no_everything", model, x, y, mse, [1, 1, 1])


def test_search_codes_are_trainable(setup):
    """Codes from the inference-mode search must be usable in a training forward/backward."""
    model, x, y, _ = setup
    codes, _ = hierarchical(model, x, y, mse, [2, 2, 2])
    model.train()
    loss = mse(model(x, codes)[-1], y).sum()
    loss.backward()
    assert model.levels[0].conv_in.parametrizations.weight.original1.grad is not None


def test_budget_helpers(setup):
    model, *_ = setup
    assert parse_bytes("2GB") == 2 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(10) == 10
    small = chunk_rows(model, range(1, 4), (16, 16), 10**6)
    big = chunk_rows(model, range(1, 4), (16, 16), 10**9)
    assert 1 <= small < big
    with pytest.raises(ValueError, match="one count per level"):
        hierarchical(model, torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), mse, [1, 1])


@pytest.mark.parametrize("iterative,partial", [(True, True), (False, False)])
def test_replay_rebuilds_the_chosen_codes(setup, iterative, partial):
    """The winners and the generator's seed are enough to redraw the codes (what checkpoints store)."""
    model, x, y, hw = setup
    chosen = hierarchical(
        model, x, y, mse, [5, 4, 3], torch.Generator().manual_seed(3), iterative=iterative, partial=partial
    )
    codes, picks = chosen.codes, chosen.picks
    layout = model.latent_layout(hw)
    method = Method((5, 4, 3), iterative=iterative, partial=partial)
    again = replay(layout, method, picks, torch.Generator().manual_seed(3))
    for a, b in zip(codes, again, strict=True):
        assert torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise)
    chosen = flat(model, x, y, mse, 6, torch.Generator().manual_seed(4))
    codes, picks = chosen.codes, chosen.picks
    cimle = choose("cimle", num_samples=6)
    again = replay(layout, cimle, picks, torch.Generator().manual_seed(4))
    assert all(torch.equal(a.noise, b.noise) for a, b in zip(codes, again, strict=True))
    wrong = replay(layout, cimle, (picks + 1) % 6, torch.Generator().manual_seed(4))
    assert not torch.equal(wrong[0].style, codes[0].style)


def test_compute_accounting_in_full_forward_equivalents():
    """flat with n codes costs n; hierarchical with m per level costs m plus the distance's share (and
    the prefix steps); every candidate of "no IC + no PE" is a whole forward, so that ladder rung
    costs sum(m_l). The per-level FLOPs add up to a full forward's."""
    from torch.utils.flop_counter import FlopCounterMode

    from chimle.distances.lpips import LPIPS
    from chimle.search import level_costs, search_cost

    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout="upscale"))
    lpips = LPIPS("alex")
    costs = level_costs(model, (8, 8), lpips)
    x, codes = torch.rand(1, 3, 8, 8), model.sample_codes(1, input_hw=(8, 8))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, codes)
    assert sum(c.step for c in costs) == fc.get_total_flops()
    assert costs[0].step < costs[1].step < costs[2].step  # each level works at 2x the resolution
    assert costs[0].distance > 0  # LPIPS-alex is convolutions
    full = sum(c.step for c in costs) + costs[-1].distance
    assert search_cost(costs, num_samples=37) == 37
    m = 10
    share = sum(c.distance for c in costs[:-1]) / full
    prefix = (costs[0].step + costs[1].step) / full
    assert search_cost(costs, [m] * 3) == pytest.approx(m * (1 + share) + prefix, rel=1e-9)
    assert m < search_cost(costs, [m] * 3) < 1.5 * m  # far from L * m = 30, the count in samples
    assert search_cost(costs, [4, 3, 2], iterative=False, partial=False) == pytest.approx(9, rel=1e-9)
    # with the distance free (pixel MSE: no convolutions), Algorithm 1 costs m + the prefix steps
    l2_costs = level_costs(model, (8, 8), mse)
    assert all(c.distance == 0 for c in l2_costs)
    assert search_cost(l2_costs, [m] * 3) == pytest.approx(m + prefix * full / sum(c.step for c in l2_costs))


@pytest.mark.parametrize("layout,hw", [("upscale", (8, 8)), ("same", (32, 32))])
def test_hierarchical_with_a_feature_distance_is_the_reference(layout, hw):
    """LPIPS (targets embedded once per level, candidates in chunks) picks what the plain loop picks."""
    from chimle.distances.lpips import LPIPS

    lpips = LPIPS("alex")
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout=layout))
    x = torch.rand(2, 3, *hw)
    y = torch.rand(2, 3, *model.cfg.output_sizes(*hw)[-1])
    counts = [4, 3, 2]
    # a small budget forces several chunks per level in the fast search
    fast_codes, fast_d = hierarchical(
        model, x, y, lpips, counts, torch.Generator().manual_seed(1), options=SearchOptions(200_000)
    )
    naive_codes, naive_d = reference_hierarchical(model, x, y, lpips, counts, torch.Generator().manual_seed(1))
    for a, b in zip(fast_codes, naive_codes, strict=True):
        assert torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise)
    torch.testing.assert_close(fast_d, naive_d, rtol=1e-4, atol=1e-6)
