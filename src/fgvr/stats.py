"""Paired statistics for "is this change real?": two systems scored on the SAME images.

Comparing two accuracies measured on the same images as if they were independent throws away the pairing
and gives intervals several times too wide (or, comparing means over a few seeds, none at all). Here:

* `paired_bootstrap`: the mean of the per-image difference (a_i - b_i), with a percentile bootstrap 95%
  interval from resampling the images (rows stay paired);
* `mcnemar_exact`: McNemar's exact test on the discordant images (right in one run, wrong in the other):
  under "no difference" each discordant image is a fair coin, so the two-sided p-value is a binomial tail.

Both work on any per-image numbers (0/1 correctness, or a per-image mean over seeds).
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, n_boot: int = 10000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of a - b over paired items and its percentile bootstrap interval: {mean, low, high, n}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two 1-d arrays of the same length, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("no paired items to compare")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # chunks: 1000 x n indices at a time keeps memory small
        m = min(1000, n_boot - start)
        means[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    tail = (1 - level) / 2
    return {"mean": float(d.mean()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail)), "n": n}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test: {a_only, b_only, p_value} (two-sided binomial test on the discordant pairs)."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} and {b.shape}")
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n = n10 + n01
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(n10, n01)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"a_only": n10, "b_only": n01, "p_value": float(min(1.0, 2 * tail))}
