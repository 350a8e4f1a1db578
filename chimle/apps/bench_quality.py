"""Quality benchmarks: the sample-efficiency curve (CHIMLE Fig. 2) and the ablation ladder (Fig. 7).

    chimle bench efficiency CHECKPOINT --data DIR --out DIR [--seeds 10] [--images 8] [--budgets 1,2,4,8,16,32]
                            [--flat-max N]
    chimle bench ablation --data TRAIN_DIR --held-out DIR --out DIR [--steps 600] [--preset tiny]
                          [--samples 6] [--crops-per-image 8]
    chimle bench efficiency --help                              # every option

`efficiency` measures, on held-out crops and a trained model, how many generated samples flat cIMLE
needs against hierarchical CHIMLE to reach each LPIPS distance, counting CHIMLE's work in samples and at
equal compute (full-forward equivalents) (`chimle.evaluation.efficiency.run_efficiency`).
`ablation` trains the same configuration four times (full CHIMLE, no IC, no IC+PE, no IC+PE+CD =
cIMLE with as many samples) on the same data, steps and seed, then reports FID and LPIPS to the
target on held-out crops, side by side, as a JSON, a Markdown table and a bar plot
(`chimle.evaluation.ablation.run_ablation`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.ablation import AblationOptions, run_ablation
from ..evaluation.efficiency import BUDGETS, EfficiencyOptions, run_efficiency

__all__ = ["cmd_bench_efficiency", "cmd_bench_ablation"]


def cmd_bench_efficiency(args: argparse.Namespace) -> int:
    """`chimle bench efficiency` (its options: `chimle.apps.cli`): the curve, then its tables printed."""
    options = EfficiencyOptions(
        seeds=args.seeds, budgets=args.budgets or BUDGETS, flat_max=args.flat_max, schedules=args.schedule
    )
    run_efficiency(
        args.checkpoint,
        args.data,
        args.out,
        options,
        images=args.images,
        crop=args.crop,
        device=args.device,
        distance=args.distance,
    )
    out = Path(args.out)
    print((out / "efficiency.md").read_text())
    print("per level (only that level's component redrawn):")
    print((out / "levels.md").read_text())
    return 0


def cmd_bench_ablation(args: argparse.Namespace) -> int:
    """`chimle bench ablation` (its options: `chimle.apps.cli`): the four runs, then their table printed."""
    options = AblationOptions(
        steps=args.steps,
        preset=args.preset,
        task=args.task,
        scale=args.scale,
        crop=args.crop,
        samples=args.samples,
        crops_per_image=args.crops_per_image,
        overrides=tuple(args.set),
        device=args.device,
    )
    run_ablation(args.data, args.held_out, args.out, options)
    print((Path(args.out) / "ablation.md").read_text())
    return 0
