"""The text of `chimle reproduce`'s report, composed from the parts' results: every number in it is read
from them (each part's result.json), none is written in by hand.

    blocks = report_blocks(results, asdict(sizes), "chimle reproduce --out OUT --quick")
    write_report(out, blocks)                       # report.md and report.html (`chimle.evaluation.report`)

Sections: TIM Fig. 1 (the MNIST illustration), TIM Fig. 3 / CHIMLE Fig. 2 (sample efficiency), what moves
the efficiency curve (the factors), CHIMLE Fig. 7 (the ablation ladder over seeds, beside the paper's SR
FID), CHIMLE Table 1 at equal compute (with CHIMLE minus cIMLE in standard errors over seeds), the digits
(`chimle.evaluation.digit_table.report_blocks`), Table 1 where level 1 works at 64 px
(`chimle.evaluation.photo_table.report_blocks`) and the time per part.
"""

from __future__ import annotations

import json
from typing import Any

from . import digit_table, photo_table
from .report import Block, table
from .stats import VERDICT_Z, z_of_means

__all__ = ["report_blocks", "efficiency_text", "ablation_text", "table1_text"]


def _pct(new: float, base: float) -> str:
    return f"{100 * (new / base - 1):+.1f}%"


def _ratio(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"  # "> N": not reached within the codes drawn


def efficiency_text(rows: list[dict[str, Any]]) -> str:
    """What the efficiency rows measured at the smallest and the largest uniform budget m."""
    uniform = [r for r in rows if isinstance(r["per_level_m"], int)]
    return "; ".join(
        f"at m = {r['per_level_m']} CHIMLE reaches {r['lpips_threshold']:.4g} and cIMLE needs "
        f"{_ratio(r['ratio_samples'])} times its samples ({_ratio(r['ratio_compute'])} times its compute)"
        for r in (uniform[0], uniform[-1])
    )


def ablation_text(result: dict[str, Any]) -> str:
    """Each rung against full CHIMLE: KID's difference and its z over the seeds (none for one seed; KID is
    unbiased, so it can be negative at a few images: no ratio), beside the paper's SR FID change in % (Fig. 7)."""
    full, n = result["rows"][0], result["seeds"]
    ours, paper = [], []
    for x in result["rows"][1:]:
        z = z_of_means(x["kid"], x["kid_std"], full["kid"], full["kid_std"], n)
        ours.append(f"{x['ablation']} {x['kid'] - full['kid']:+.3g}" + (f" (z {z:+.2f})" if n > 1 else ""))
        paper.append(f"{x['ablation']} {_pct(x['paper_fid_sr'], full['paper_fid_sr'])}")
    return f"KID minus full CHIMLE's: {', '.join(ours)}; the paper's SR FID (Fig. 7): {', '.join(paper)}"


def table1_text(comparison: list[dict[str, Any]]) -> str:
    """On how many tasks CHIMLE is lower, and beyond |z| = VERDICT_Z either way, for KID and LPIPS."""
    return "; ".join(
        f"CHIMLE's {what} is lower on {sum(c[f'{key}_diff'] < 0 for c in comparison)} of {len(comparison)} "
        f"tasks, beyond |z| = {VERDICT_Z:g} on {sum(c[f'{key}_z'] < -VERDICT_Z for c in comparison)}, "
        f"cIMLE's beyond it on {sum(c[f'{key}_z'] > VERDICT_Z for c in comparison)}"
        for key, what in (("kid", "KID"), ("lpips", "LPIPS to the target (best of K)"))
    )


def report_blocks(results: dict[str, dict[str, Any]], sizes: dict[str, Any], command: str) -> list[Block]:
    """The report's blocks: the command and the sizes it ran with, a section per part in `results` (each
    part's result.json), the time per part. sizes: `chimle reproduce`'s Sizes as a dict (the counts a
    result does not record itself are read from it)."""
    sz = dict(sizes)
    for extra in ("digits", "photos"):  # their sizes only beside their sections
        if extra not in results:
            sz.pop(extra, None)
    b: list[Block] = [("h1", "chimle: the papers' experiments at CPU scale")]
    b.append(("p", f"Command: `{command}`. Sizes: {json.dumps(sz)}."))
    if "mnist" in results:
        r = results["mnist"]
        b += [
            ("h2", "TIM Fig. 1: the MNIST illustration"),
            (
                "p",
                f"Distance to the real digit over PCA coordinates 11-784 of {r.get('inputs')} unseen inputs: best of "
                f"{r.get('K', 20)} predictions {r['rest_best_of_K']:.3f}, one prediction {r['rest_one_sample']:.3f}, "
                f"the PCA input alone {r['rest_pca_input']:.3f}. Fig. 1b: the real digit's coordinates 11-12 lie "
                f"above {100 * r['real_density_percentile']:.0f}% of the predictions' density, its 10 nearest "
                f"training digits' above {100 * r['neighbours_density_percentile']:.0f}% on average. "
                f"{r['seconds']:.0f} s.",
            ),
            ("img", "mnist/fig1a_predictions.png"),
            ("img", "mnist/fig1b_coordinates.png"),
        ]
    if "efficiency" in results:
        keys = ["per_level_m", "chimle_samples", "chimle_compute", "lpips_threshold", "threshold_std"]
        keys += ["cimle_samples", "ratio_samples", "ratio_compute"]
        b += [
            ("h2", "TIM Fig. 3 / CHIMLE Fig. 2: sample efficiency"),
            (
                "p",
                "Samples flat cIMLE needs to reach the distance CHIMLE reaches, in samples (each partial "
                "evaluation one sample) and at equal compute (full-forward equivalents); a ratio above 1: CHIMLE "
                f"needs less work. Measured: {efficiency_text(results['efficiency']['rows'])}.",
            ),
            ("table", table(results["efficiency"]["rows"], keys)),
            ("img", "efficiency/efficiency.png"),
        ]
    if "factors" in results:
        r = results["factors"]
        keys = ["factor", "setting", "level1_px", "per_level_m", "chimle_compute", "lpips_threshold"]
        keys += ["cimle_samples", "ratio_samples", "ratio_compute", "corr_level1"]
        b += [
            ("h2", "What makes the efficiency curve better or worse"),
            (
                "p",
                "Each setting's curve as above (ratio > 1: CHIMLE needs less work than cIMLE for the same "
                f"distance; {sz['factor_seeds']} seeds; SR: LPIPS-alex on {sz['factor_images']} held-out crops; "
                f"digits: pixel L2 on {4 * sz['factor_images']} unseen digits). level1_px: the side of level 1's "
                "output. corr_level1: the correlation of level 1's partial distance with the final distance when only "
                "level 1's component is redrawn (`level_diagnostics`), the premise of partial evaluation.",
            ),
            *[("p", note) for note in r["notes"]],
            ("table", table(r["rows"], keys)),
            ("img", "factors/factors.png"),
        ]
    if "ablation" in results:
        r = results["ablation"]
        keys = ["ablation", "kid", "kid_std", "lpips_best_of_k", "lpips_best_of_k_std", "fid", "fid_std"]
        keys.append("paper_fid_sr")
        b += [
            ("h2", "CHIMLE Fig. 7: ablations"),
            (
                "p",
                f"Each rung trained {r['steps']} steps on SR (`chimle bench ablation`'s recipe: LPIPS-VGG, batch 1), "
                f"then {r.get('samples', sz['eval_samples'])} samples for each of {r['images']} held-out crops; "
                f"mean and spread over {r['seeds']} seeds. {ablation_text(r)}. KID is unbiased at this size, FID "
                "is not (beside it only).",
            ),
            ("table", table(r["rows"], keys)),
            ("img", r["figure"]),
        ]
    if "table1" in results:
        r = results["table1"]
        keys = ["task", "method", "search", "kid", "kid_std", "kid_subset_std", "lpips_to_target_best_of_k"]
        keys += ["lpips_to_target_best_of_k_std", "fwv_0.2", "lpips_diversity", "fid", "paper_fid"]
        b += [
            ("h2", "CHIMLE Table 1 at CPU scale, equal compute"),
            (
                "p",
                f"Both methods train the same tower for the same {r.get('steps', sz['table1_steps'])} steps on the "
                "same photos and batches, so their training compute is equal; cIMLE searches as many whole codes "
                "per image as CHIMLE's schedule costs in full-forward equivalents (`search`), so their search "
                f"compute is equal too. Mean and spread over {r['seeds']} seeds ({r['images']} held-out tiles, "
                f"{r.get('samples', sz['eval_samples'])} samples each). kid_std: over seeds; kid_subset_std: over "
                "KID's subsets in one run. FID is biased with fewer images than 2,048 features: shown beside the "
                "paper's (real datasets, 512 px) for orientation only.",
            ),
            ("table", table(r["rows"], keys)),
        ]
        if "comparison" in r:
            keys = ["task", "kid_diff", "kid_z", "kid_verdict", "lpips_diff", "lpips_z", "lpips_verdict"]
            b += [
                (
                    "p",
                    "CHIMLE minus cIMLE (negative: CHIMLE better), in standard errors of the difference over "
                    f"seeds (z); |z| > {VERDICT_Z:g} is called a difference, anything less noise. "
                    f"Measured: {table1_text(r['comparison'])}.",
                ),
                ("table", table(r["comparison"], keys)),
                ("img", r["figure"]),
            ]
    if "digits" in results:
        b += digit_table.report_blocks(results["digits"])
    if "photos" in results:
        b += photo_table.report_blocks(results["photos"])
    b.append(("h2", "Time per part"))
    times = [{"part": k, "seconds": v["seconds"]} for k, v in results.items()]
    b.append(("table", table(times, ["part", "seconds"])))
    return b
