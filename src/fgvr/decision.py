"""The decision: System 1's posterior over the candidates and System 2's option distribution, combined by
a fixed rule. No third model call to arbitrate (SARE asks the VLM again; that costs a call and is not
reproducible).

Rule (log-linear pooling, a product of experts):

    final(c) ∝ p_fast(c) ** (1 - λ) * p_slow(c) ** λ        over the candidates c, λ = `weight` in [0, 1]

Why log-linear rather than a linear mix (1-λ)·p_fast + λ·p_slow: the two systems look at the image
differently (retrieval against the base vs. reasoning or re-ranking over the options), so their evidence
multiplies: one that firmly rules a candidate out removes it, which is what System 2 is asked to do.
Agreement does NOT sharpen: the exponents sum to 1, so two identical opinions give that same opinion, and
two agreeing ones give something between them (a product with exponents summing above 1 would sharpen,
and would be over-confident whenever the systems share their evidence, as two views of one image do). A linear mix can only average, so a
System 2 that is sure the top-1 is wrong cannot overturn a peaked System 1 unless λ is large. λ = 0 is
System 1 alone, λ = 1 System 2 alone. Probabilities are floored at `eps` so that one exact zero does not
veto a class with certainty, and the computation is done in log space (float64) so that tiny values stay exact.
"""

from __future__ import annotations

import math
from typing import Sequence

from fgvr.defaults import DEFAULTS

DEFAULT_WEIGHT = DEFAULTS.decision_weight
EPS = 1e-6


def decide(fast_probs: Sequence[float], slow_probs: Sequence[float], weight: float = DEFAULT_WEIGHT,
           eps: float = EPS) -> list[float]:
    """Final distribution over the candidates (same order as the inputs); sums to 1.

    `fast_probs`: System 1's posterior restricted to the candidates (renormalised here, so raw top-k
    probabilities are fine). `slow_probs`: System 2's distribution over the same candidates.
    """
    if len(fast_probs) != len(slow_probs) or len(fast_probs) == 0:
        raise ValueError(f"fast and slow distributions must cover the same non-empty candidate list, "
                         f"got {len(fast_probs)} and {len(slow_probs)}")
    if not (0.0 <= weight <= 1.0):
        raise ValueError(f"decision weight must lie in [0, 1], got {weight}")
    for name, ps in (("fast", fast_probs), ("slow", slow_probs)):
        if any(not math.isfinite(p) or p < 0 for p in ps):
            raise ValueError(f"{name} probabilities must be finite and non-negative, got {list(ps)}")
    fast = _normalise(fast_probs)
    slow = _normalise(slow_probs)
    logs = [(1 - weight) * math.log(max(f, eps)) + weight * math.log(max(s, eps)) for f, s in zip(fast, slow)]
    top = max(logs)
    unnorm = [math.exp(x - top) for x in logs]
    z = sum(unnorm)
    return [u / z for u in unnorm]


def _normalise(ps: Sequence[float]) -> list[float]:
    z = float(sum(ps))
    if z <= 0:  # no information: uniform
        return [1.0 / len(ps)] * len(ps)
    return [float(p) / z for p in ps]
