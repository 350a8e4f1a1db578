"""The training step: the fast one (targets prepared once per pool round, channels-last tower, fused
Adam) computes the loss and gradients of the plain one (`chimle.loss.level_losses` + backward); the
commands' host memory setting stops a step's page faults."""

import copy
import subprocess
import sys

import pytest
import torch

from chimle.data.tasks import make_task
from chimle.distances import make_distance
from chimle.loss import LevelTarget, level_losses, level_targets
from chimle.model import TowerConfig, TowerModel
from chimle.training.pool import Pool
from chimle.training.step import optimize_step, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _setup(task: str, distance: str, entries: int = 5):
    torch.manual_seed(0)
    if task == "sr":
        cfg, hw, t = TowerConfig.preset("tiny", layout="upscale", levels=3), (4, 4), make_task("sr", scale=8)
    else:  # colourisation: 1 channel in, ab out, the loss on Lab -> RGB (to_rgb)
        cfg = TowerConfig.preset("tiny", layout="same", levels=3, in_channels=1, out_channels=2)
        hw, t = (32, 32), make_task("colorize")
    model = TowerModel(cfg)
    x = torch.rand(entries, cfg.in_channels, *hw)
    y = torch.rand(entries, 3, *cfg.output_sizes(*hw)[-1])
    codes = model.sample_codes(entries, torch.Generator().manual_seed(1), input_hw=hw)
    pool = Pool(0, x, y, codes, torch.zeros(entries), torch.zeros(entries, 3, dtype=torch.long))
    return model, pool, make_distance(distance), t, cfg.output_sizes(*hw)


@pytest.mark.parametrize(
    "task,distance,pixel_weight", [("sr", "vgg", 0.0), ("colorize", "alex", 0.5), ("sr", "l2", 0.0)]
)
def test_fast_step_computes_the_plain_loss_and_gradients(task, distance, pixel_weight):
    plain, pool, d, t, sizes = _setup(task, distance)
    fast = copy.deepcopy(plain)
    rows = [3, 0, 4]  # not in pool order: a mix-up of the cached rows would show
    x, y, codes = pool.batch(rows, CPU)

    plain.train()
    expected = level_losses(plain(x, codes), x, y, d, t.rgb, pixel_weight)
    (expected.sum() / len(rows)).backward()

    opt = torch.optim.SGD(fast.parameters(), lr=0.0)  # keeps the weights: only the gradients are compared
    targets = pool.loss_targets(rows, sizes, d, CPU)
    got = optimize_step(
        fast, opt, x, targets, codes, d, to_rgb=t.rgb, loss_scale=1 / len(rows), pixel_weight=pixel_weight
    )
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)
    # The gradients agree to ~1e-6 of their largest entry (measured 1e-7..7e-7: convolutions summed in
    # another order on channels-last, the targets embedded one at a time). Some are ~0 by construction
    # (a conv bias before an instance norm): judged against the largest entry, not their own size.
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_level_losses_with_targets_equals_level_losses_with_y():
    torch.manual_seed(0)
    d = make_distance("alex")
    outs = [torch.rand(2, 3, s, s) for s in (16, 32, 64)]
    y = torch.rand(2, 3, 64, 64)
    targets = level_targets(y, [(16, 16), (32, 32), (64, 64)], d)
    assert all(isinstance(t, LevelTarget) and t.image.shape[-1] == s for t, s in zip(targets, (16, 32, 64)))
    a = level_losses(outs, y, y, d, pixel_weight=0.3)
    b = level_losses(outs, y, None, d, pixel_weight=0.3, targets=targets)
    assert torch.equal(a, b)  # the same features of the same batch: the same bits
    with pytest.raises(ValueError, match="targets has 2 levels"):
        level_losses(outs, y, None, d, targets=targets[:2])


def test_pool_embeds_each_target_once_per_round(monkeypatch):
    _, pool, d, _, sizes = _setup("sr", "alex", entries=6)
    calls = []
    real = d.features
    monkeypatch.setattr(d, "features", lambda img: calls.append(img.shape[0]) or real(img))
    batches = [[0, 1, 2], [2, 3, 0], [5, 1, 2], [0, 0, 4]]
    first = [pool.loss_targets(rows, sizes, d, CPU) for rows in batches]
    # one embedding per entry and level, each entry alone (batch 1), however often it is drawn
    assert calls == [1] * (len({r for rows in batches for r in rows}) * len(sizes))
    assert sorted(pool.target_cache) == [0, 1, 2, 3, 4, 5]
    assert pool.target_cache_bytes == sum(
        x.numel() * x.element_size() for ts in pool.target_cache.values() for t in ts for x in [t.image, *t.features]
    )
    # Without a cache (budget 0) every call embeds again, and gives the very same values: a resumed run,
    # whose cache starts empty, repeats an uninterrupted one exactly.
    again = Pool(0, pool.inputs, pool.targets, pool.codes, pool.dists, pool.picks)
    for rows, ts in zip(batches, first):
        for a, b in zip(ts, again.loss_targets(rows, sizes, d, CPU, budget=0)):
            assert torch.equal(a.image, b.image) and all(torch.equal(p, q) for p, q in zip(a.features, b.features))
    assert not again.target_cache and again.target_cache_bytes == 0


def test_pool_cache_stays_within_its_budget():
    _, pool, d, _, sizes = _setup("sr", "alex", entries=6)
    one = level_targets(pool.targets[:1], sizes, d)
    per_entry = sum(x.numel() * x.element_size() for t in one for x in [t.image, *t.features])
    pool.loss_targets([0, 1, 2, 3, 4, 5], sizes, d, CPU, budget=int(2.5 * per_entry))
    assert sorted(pool.target_cache) == [0, 1] and pool.target_cache_bytes == 2 * per_entry
    out = pool.loss_targets([4, 1], sizes, d, CPU)  # the limit is fixed per pool: still two entries
    assert sorted(pool.target_cache) == [0, 1] and out[-1].image.shape[0] == 2


def test_fused_adam_groups_match_the_default_update():
    torch.manual_seed(0)
    a = TowerModel(TowerConfig.preset("tiny", layout="upscale", levels=2))
    b = copy.deepcopy(a)
    groups = param_groups(b, 1e-3, 0.01)
    assert all(bool(g.get("fused")) == (torch.__version__ >= "2.4") for g in groups)  # CPU fused Adam: torch 2.4
    assert groups[1]["lr"] == pytest.approx(1e-5)
    opt_a = torch.optim.Adam([{k: v for k, v in g.items() if k != "fused"} for g in param_groups(a, 1e-3, 0.01)])
    opt_b = torch.optim.Adam(groups)
    for _ in range(3):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)


_FAULTS_PER_STEP = """
import resource, sys, torch
from chimle.memory import keep_freed_host_memory
torch.set_num_threads(1)
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
conv = torch.nn.Conv2d(16, 16, 3, padding=1)

def step():  # 2 MiB activations, freed at the end of every step, as a training step's are
    h = x = torch.rand(2, 16, 128, 128, requires_grad=True)
    for _ in range(6):
        h = torch.relu(conv(h)) * 0.5
    h.sum().backward()

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_stops_the_page_faults_of_every_step():
    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        applied, per_step = out.stdout.split()
        return applied, float(per_step)

    (applied, kept), (_, default) = faults("keep"), faults("default")
    assert applied == "True"
    # glibc's default gives the freed activations back and faults them in again (~2,900 per step here)
    assert default > 1000 and kept < 0.2 * default, (kept, default)
