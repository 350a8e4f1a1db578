"""How far guided search moves a super-resolution model's output toward a painted hint, beyond plain sampling.

    python benchmarks/guide_movement.py sr8-small sr8 [--crop 256] [--plain 40] [--candidates 32]

For centre crops of scikit-image's photos (held out from the shipped models), each degraded by the task
(8x SR: a 256 px crop gives a 32 px input), a hint is painted on the first plain sample in a 64 x 64 px
square at the centre, as a user paints on the explorer page, in two ways that an SR model *can* follow
without leaving its input (both keep the square's local mean colour, so the downsampled output may still
match the input):
  stripes  vertical stripes of period 8 px, +-0.2 around the sample's blurred colour (texture to add);
  stroke   a dark 3 px diagonal line across the square (an edge to add).
Each model is then scored by the masked pixel L2 to the hint (`chimle.inference.guide.MaskedL2`, what the
search minimises) of: the mean plain sample; the best of `--plain` plain samples (others than the one
painted on); the best match of
`guided_search` with the page's defaults (k = 4, `--candidates` at level 1, a quarter as many at each finer
level, no refinement). "moved" is (mean plain - guided) / mean plain: how much of the typical sample's
distance to the hint the search removes. A model whose samples do not differ where the hint is painted
cannot be moved, whatever the search: then guided ~ best plain ~ mean plain.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from chimle.data.imageio import builtin_photos
from chimle.data.tasks import degrade_and_crop, make_task
from chimle.inference.explore import draw_samples
from chimle.inference.guide import GuideOptions, guided_search, hint_distance, schedule
from chimle.inference.tiling import pad_to_tower
from chimle.inference.weights import load_with_task
from chimle.rng import seeded


def paint(sample: torch.Tensor, kind: str, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(hint, mask) for one sample (1, 3, H, W): the painted square at the centre."""
    _, _, h, w = sample.shape
    t, l = (h - side) // 2, (w - side) // 2
    hint, mask = sample.clone(), torch.zeros(1, 1, h, w)
    region = sample[..., t : t + side, l : l + side]
    base = F.avg_pool2d(region, 9, stride=1, padding=4, count_include_pad=False)  # the local colour
    xs, ys = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    if kind == "stripes":
        sign = torch.where((xs // 4) % 2 == 0, 1.0, -1.0)
        hint[..., t : t + side, l : l + side] = (base + 0.2 * sign).clamp(0, 1)
        mask[..., t : t + side, l : l + side] = 1
    elif kind == "stroke":
        line = ((xs - ys).abs() <= 1).float()
        hint[..., t : t + side, l : l + side] = region * (1 - line) + 0.05 * line
        mask[..., t : t + side, l : l + side] = line
    else:
        raise ValueError(kind)
    return hint, mask


def measure(name: str, crop: int, plain: int, candidates: int) -> dict[str, dict[str, float]]:
    model, task_cfg = load_with_task(name)
    task = make_task(**task_cfg)
    rows: dict[str, list[tuple[float, float, float]]] = {"stripes": [], "stroke": []}
    for i, photo in enumerate(builtin_photos()):
        h, w = photo.shape[-2:]
        y = photo[:, (h - crop) // 2 : (h - crop) // 2 + crop, (w - crop) // 2 : (w - crop) // 2 + crop]
        x, _ = degrade_and_crop(task, y, seed=i)
        xp, _ = pad_to_tower(x[None], model)
        images, _ = draw_samples(model, xp, plain + 1, seeded(100 + i), task=task)
        for kind in rows:
            hint, mask = paint(images[:1], kind)
            d_plain = hint_distance(images[1:], hint, mask)  # the painted sample itself excluded
            found = guided_search(
                model,
                xp,
                hint,
                mask,
                schedule(candidates, model.cfg.levels),
                seeded(200 + i),
                task=task,
                options=GuideOptions(k=4),
            )
            rows[kind].append((d_plain.mean().item(), d_plain.min().item(), found.distances[0].item()))
    out = {}
    for kind, r in rows.items():
        mean_p, best_p, guided = (statistics.mean(c) for c in zip(*r))
        moved = statistics.mean((m - g) / m for m, _, g in r)
        out[kind] = {"mean_plain": mean_p, "best_plain": best_p, "guided": guided, "moved": moved}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--plain", type=int, default=40)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{len(builtin_photos())} held-out crops of {a.crop} px; masked L2 to the hint (x 1e3); mean over crops")
    print(f"{'model':12s} {'hint':8s} {'mean plain':>10s} {f'best of {a.plain}':>10s} {'guided':>8s} {'moved':>7s}")
    for name in a.models:
        for kind, r in measure(name, a.crop, a.plain, a.candidates).items():
            print(
                f"{name:12s} {kind:8s} {1e3 * r['mean_plain']:10.2f} {1e3 * r['best_plain']:10.2f} "
                f"{1e3 * r['guided']:8.2f} {100 * r['moved']:6.1f}%"
            )


if __name__ == "__main__":
    main()
