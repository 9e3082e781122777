"""Paired statistics for claims: the same seeds run with the baseline and with the method.

Not a published method: the comparison every claim table reports (mean +- std per arm, the paired
difference, a two-sided paired t-test p-value, and how many seeds the method won).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    n: int
    mean_diff: float  # mean of (method - baseline) over seeds
    std_diff: float  # sample standard deviation of the differences (ddof = 1)
    p_value: float  # two-sided paired t-test; nan with fewer than 2 seeds or a constant difference
    wins: int  # seeds where method > baseline (higher; better only for a higher-is-better metric)
    losses: int  # seeds where method < baseline


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def paired(baseline, method) -> Paired:
    from scipy import stats

    b, m = np.asarray(baseline, dtype=float), np.asarray(method, dtype=float)
    if b.shape != m.shape or b.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {b.shape} and {m.shape}")
    d = m - b
    n = len(d)
    std = float(d.std(ddof=1)) if n > 1 else float("nan")
    p = float(stats.ttest_rel(m, b).pvalue) if n > 1 and np.any(d != d[0]) else float("nan")
    return Paired(n, float(d.mean()), std, p, int((d > 0).sum()), int((d < 0).sum()))
