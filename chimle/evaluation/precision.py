"""bf16 against float32: does the search pick the same codes, does training follow the same curve?

    r = search_agreement(model, x, y, LPIPS("vgg"), counts=[20, 10, 5])   # per level: picks of both, gaps
    t = train_agreement("small", 3, 64, LPIPS("vgg"), device, steps=200)  # three loss curves from one init

`search_agreement` scores Algorithm 1's candidates twice, in float32 (NCHW, TF32 off) and as the search runs
on the device in bf16, on the float32 search's prefix at every level, and `summarize_search` says how much
of what the search gains over a typical candidate bf16 keeps (verdict: >= 95%). `train_agreement` trains
from one init in float32, in bf16 autocast (the same batches) and in float32 with another batch order;
`summarize_train` passes bf16 when its curve stays closer to float32's than reshuffling moves it. On a CPU
both run under torch.autocast("cpu", dtype=torch.bfloat16). `chimle bench gpu` runs them (with the
CUDA-only checks); `photo_crops` and `tower` make its inputs and models.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import latent, search
from ..data.tasks import make_task
from ..loss import level_targets
from ..memory import default_budget
from ..model import TowerConfig, TowerModel
from ..resample import resize
from ..training.step import optimize_step, param_groups

__all__ = [
    "float32",
    "bf16",
    "photo_crops",
    "tower",
    "search_agreement",
    "summarize_search",
    "train_curve",
    "train_agreement",
    "summarize_train",
]


# -- precision switches ------------------------------------------------------------------------------


@contextlib.contextmanager
def float32(device: torch.device) -> Iterator[None]:
    """True float32: autocast off (also inside code that turns it on), and on CUDA no TF32 (cuDNN uses
    it for float32 convolutions by default, which would make the reference a 10-bit one)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bf16(device: torch.device):
    """bf16 autocast. On CUDA the search and the training step turn it on themselves (this is a no-op
    there); on a CPU it is what they would do with a CUDA device."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


# -- data ------------------------------------------------------------------------------------------


def photo_crops(n: int, crop: int, scale: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, targets, source): n random crops of the builtin photos (scikit-image's), upscaled where a
    photo is smaller than the crop, and their 8-bit bicubic downsamples by `scale` (the sr task).
    Falls back to smooth random images where scikit-image is missing."""
    g = torch.Generator().manual_seed(seed)
    task = make_task("sr", scale=scale)
    try:
        from ..data.imageio import builtin_photo_dir, list_images, load_image

        photos, source = [load_image(p) for p in list_images(builtin_photo_dir())], "builtin photos"
    except Exception as e:  # noqa: BLE001 - no scikit-image on this machine: say so, use synthetic images
        photos = [resize(torch.rand(1, 3, 8, 8, generator=g), (crop, crop))[0].clamp(0, 1) for _ in range(4)]
        source = f"smooth random images ({type(e).__name__}: no builtin photos)"
    ys = []
    for k in range(n):
        img = photos[k % len(photos)]
        h, w = img.shape[-2:]
        if min(h, w) < crop:
            f = crop / min(h, w)
            img = resize(img[None], (math.ceil(h * f), math.ceil(w * f)))[0].clamp(0, 1)
            h, w = img.shape[-2:]
        top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
        ys.append(img[:, top : top + crop, left : left + crop])
    y = torch.stack(ys).contiguous()
    return task.degrade(y).contiguous(), y, source


def tower(preset: str, levels: int, device: torch.device, seed: int = 0) -> TowerModel:
    torch.manual_seed(seed)
    return TowerModel(TowerConfig.preset(preset, layout="upscale", levels=levels)).to(device)


# -- check: the search in bf16 against float32 ------------------------------------------------------


def search_agreement(
    model: TowerModel, x: torch.Tensor, y: torch.Tensor, distance, counts: Sequence[int], seed: int = 0
) -> dict[str, Any]:
    """Algorithm 1 scored twice on the same candidates: in float32 (NCHW, TF32 off) and as the search runs
    on this device in bf16 (on CUDA: the Scorer's own autocast and channels-last; on a CPU: bf16 autocast).
    Both judge level l on the float32 search's choices at levels < l, so every level compares the same
    candidates on the same prefix. Returns per level the picks of both, the float32 distances at both
    picks, the median candidate's, and the relative error of bf16's distances."""
    dev = model.device
    x, y = x.to(dev), y.to(dev)
    # float32 needs twice the bytes per candidate that the search's chunking assumes on CUDA (bf16 there)
    ref_budget = default_budget(dev) // 2 if dev.type == "cuda" else None
    ref = search.Scorer(model, x, y, distance, None, ref_budget)
    fast = search.Scorer(model, x, y, distance, None, None)
    ref.fmt = lambda t: t  # the reference: plain NCHW (the Scorer would make it channels-last on CUDA)
    with ref.context(), float32(dev):
        ref.initial = model.initial_state(x.clone())
    fast_ctx = lambda: contextlib.ExitStack() if dev.type == "cuda" else bf16(dev)  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(seed)
    n, levels, t0 = x.shape[0], [], time.perf_counter()
    p_ref, p_fast = ref.initial, fast.initial
    for l, m in enumerate(counts, 1):
        _, z, _ = search.draw(ref.layout, l, n * m, g, dev)
        with ref.context(), float32(dev):
            d32 = ref.score(p_ref, l, [z], m).float()
        with fast.context(), fast_ctx():
            d16 = fast.score(p_fast, l, [z], m).float()
        a, b = d32.argmin(1), d16.argmin(1)
        rows = torch.arange(n, device=dev)
        chosen = latent.index([z], rows * m + a)[0]
        with ref.context(), float32(dev):
            p_ref = ref.step(l, p_ref, chosen)
        with fast.context(), fast_ctx():
            p_fast = fast.step(l, p_fast, fast.fmt(chosen))
        err = ((d16 - d32).abs() / d32.clamp_min(1e-12)).flatten()
        levels.append(
            {
                "level": l,
                "m": m,
                "picks_fp32": a.tolist(),
                "picks_bf16": b.tolist(),
                "d_fp32_at_fp32_pick": d32[rows, a].tolist(),
                "d_fp32_at_bf16_pick": d32[rows, b].tolist(),
                "d_fp32_median": d32.median(1).values.tolist(),
                "bf16_rel_err_mean": float(err.mean()),
                "bf16_rel_err_max": float(err.max()),
            }
        )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    # The production path, for the record: `search.hierarchical` with the same generator draws the same
    # level-1 candidates and judges them as `fast` does on CUDA, as `ref` does on a CPU (float32 there).
    picks = search.hierarchical(model, x, y, distance, counts, torch.Generator(device=dev).manual_seed(seed)).picks
    mine = levels[0]["picks_bf16" if dev.type == "cuda" else "picks_fp32"]
    return {
        "inputs": n,
        "counts": list(counts),
        "levels": levels,
        "seconds": seconds,
        "production_level1_same": sum(int(p == q) for p, q in zip(picks[:, 0].tolist(), mine)),
        **summarize_search(levels),
    }


def summarize_search(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a `search_agreement`, computed from its picks and distances (so they can be checked)."""
    same = total = 0
    gaps, excess, gain = [], 0.0, 0.0
    whole = None
    for lv in levels:
        eq = [p == q for p, q in zip(lv["picks_fp32"], lv["picks_bf16"])]
        whole = eq if whole is None else [w and e for w, e in zip(whole, eq)]
        same, total = same + sum(eq), total + len(eq)
        for e, best, got, med in zip(eq, lv["d_fp32_at_fp32_pick"], lv["d_fp32_at_bf16_pick"], lv["d_fp32_median"]):
            if not e:
                gaps.append((got - best) / best)
            excess += got - best
            gain += med - best
    kept = 1 - excess / gain if gain > 0 else 1.0
    return {
        "identical_picks": same,
        "picks": total,
        "identical_fraction": same / total,
        "identical_codes_fraction": sum(whole) / len(whole),
        "gap_rel_mean_when_different": sum(gaps) / len(gaps) if gaps else 0.0,
        "gap_rel_max": max(gaps) if gaps else 0.0,
        "search_gain_kept": kept,
        "tolerance": "search_gain_kept >= 0.95",
        "passed": kept >= 0.95,
    }


# -- check: training in bf16 against float32 ------------------------------------------------------


def train_curve(
    model: TowerModel,
    pool: tuple[torch.Tensor, torch.Tensor, latent.Codes],
    distance,
    steps: int,
    batch: int,
    lr: float,
    order_seed: int,
    use_bf16: bool,
) -> list[float]:
    """The loss (sum over levels, batch mean) of every step of `steps` Adam steps on a fixed pool of
    (input, code, target), the batches drawn from `order_seed`. bf16: autocast of the tower's forward,
    the loss in float32, as `optimize_step` trains on CUDA; else true float32."""
    dev = model.device
    x_all, y_all, codes_all = pool
    opt = torch.optim.Adam(param_groups(model, lr, 0.01))
    g = torch.Generator().manual_seed(order_seed)
    sizes = model.cfg.output_sizes(*x_all.shape[-2:])
    with torch.no_grad(), float32(dev):
        targets_all = level_targets(y_all.to(dev), sizes, distance)
    curve = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        idx = rows.to(dev)
        targets = [t._replace(image=t.image[idx], features=[f[idx] for f in t.features]) for t in targets_all]
        codes = latent.index(codes_all, idx)
        with contextlib.nullcontext() if use_bf16 else float32(dev):
            losses = optimize_step(
                model,
                opt,
                x_all[idx],
                targets,
                codes,
                distance,
                loss_scale=1 / batch,
                amp=use_bf16,
            )
        curve.append(float(losses.sum(1).mean()))
    return curve


def windows(curve: Sequence[float], w: int) -> list[float]:
    return [sum(curve[i : i + w]) / len(curve[i : i + w]) for i in range(0, len(curve), w)]


def curve_gap(a: Sequence[float], b: Sequence[float], w: int) -> float:
    """Largest relative difference of the window means of two loss curves."""
    return max(abs(p - q) / abs(q) for p, q in zip(windows(a, w), windows(b, w)))


def train_agreement(
    preset: str, levels: int, crop: int, distance, device: torch.device, steps: int, batch: int = 4, lr: float = 1e-4
) -> dict[str, Any]:
    """float32, bf16 (same seed, same batches) and float32 with another batch order, from one init."""
    scale = 2**levels
    x, y, source = photo_crops(16, crop, scale, seed=1)
    base = tower(preset, levels, device)
    codes = base.sample_codes(16, torch.Generator(device=device).manual_seed(1), input_hw=x.shape[-2:])
    pool = (x.to(device), y.to(device), codes)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    t0 = time.perf_counter()
    curves = {}
    for name, order, half in (("fp32", 0, False), ("bf16", 0, True), ("fp32_other_order", 1, False)):
        base.load_state_dict(init)
        curves[name] = train_curve(base, pool, distance, steps, batch, lr, order, half)
    w = max(1, min(20, steps // 10))
    return {
        "preset": preset,
        "case": f"sr {crop // scale}->{crop}",
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "window": w,
        "data": source,
        "seconds": time.perf_counter() - t0,
        "curves": curves,
        **summarize_train(curves, w),
    }


def summarize_train(curves: dict[str, list[float]], w: int) -> dict[str, Any]:
    """The figures of a `train_agreement`, computed from its curves."""
    gap = curve_gap(curves["bf16"], curves["fp32"], w)
    tol = curve_gap(curves["fp32_other_order"], curves["fp32"], w)
    first = abs(curves["bf16"][0] - curves["fp32"][0]) / curves["fp32"][0]
    win = windows(curves["fp32"], w)
    return {
        "first_step_rel_diff": first,
        "window_gap_max": gap,
        "tolerance": tol,
        "fp32_drop": 1 - win[-1] / win[0],
        "passed": gap <= tol,
    }
