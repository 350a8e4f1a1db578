"""Means, spreads and differences over seeds: how the reports tell a difference from noise.

    m, s = mean_std([0.11, 0.12, 0.10])           # mean and sample standard deviation (n - 1)
    z = z_of_means(m_a, s_a, m_b, s_b, n)         # a - b in standard errors of the difference
    c = compare(per_seed_a, per_seed_b)           # {"diff", "z", "paired_z"} over matched seeds

z is the difference of two means over n seeds each in standard errors of the difference,
sqrt(s_a^2 / n + s_b^2 / n); beyond |z| = 2 the reports call it a difference, within it noise (with a
few seeds a side a coarse test, hence z itself in the reports). paired_z uses the per-seed differences,
for seeds that share initial weights and batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mean_std", "z_score", "z_of_means", "compare", "VERDICT_Z"]

VERDICT_Z = 2.0  # |z| beyond this: a difference; within it: noise


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def z_score(diff: float, se: float) -> float:
    """diff / se; +-inf for a difference without spread, 0 for none."""
    return diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0


def z_of_means(mean_a: float, std_a: float, mean_b: float, std_b: float, n: int) -> float:
    """(mean_a - mean_b) in standard errors of the difference of two means over n seeds each (unpaired)."""
    return z_score(mean_a - mean_b, math.sqrt((std_a**2 + std_b**2) / n))


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """a minus b over matched seeds: the difference of the means, z (unpaired, in standard errors of the
    difference) and paired_z (the mean of the per-seed differences over its standard error)."""
    if len(a) != len(b):
        raise ValueError(f"compare needs the same seeds on both sides, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    n = len(a)
    md, sd = mean_std([x - y for x, y in zip(a, b)])
    return {"diff": ma - mb, "z": z_of_means(ma, sa, mb, sb, n), "paired_z": z_score(md, sd / math.sqrt(n))}
