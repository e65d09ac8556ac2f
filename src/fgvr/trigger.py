"""The trigger: which samples are worth System 2's time.

Four signals, each mapped to [0, 1] with 1 meaning "doubt":

    u_top1      = 1 - p1                                  System 1's own confidence
    u_margin    = 1 - (p1 - p2)                           a close runner-up (the confusable-pair case)
    u_entropy   = H(p) / log C                            mass spread over many classes
    u_precision = 1 - LB                                  LB = the `alpha` quantile of Beta(m+1, n-m+1), the
                                                          posterior of the predicted class's precision from the
                                                          base's leave-one-out counts (m right of n predicted)

    score = sum_i a_i * u_i / sum_i a_i                   (weights a_i, default all 1: a weighted mean)

Why a weighted mean: every term is bounded and increasing in doubt, so the score is too, and it stays in
[0, 1] whatever the number of classes or support images. SARE's trigger subtracts sqrt(ln N / 2 n_c) from an
unnormalised entropy with n_c stuck at 1, so its score crosses any sensible threshold on every sample; here
the precision term uses the real counts (a class never predicted on the support set has LB = alpha, the
prior's quantile, not a penalty that grows with N), and no term is unbounded.

Threshold: set directly (`Trigger(threshold=0.4)`), or from a slow-path budget b (`Trigger(budget=0.3)`):
the threshold is the (1 - b) quantile of the scores on a calibration set, so that a fraction b of samples
from that distribution score above it. `calibrate_on_support` uses the knowledge base's support images
scored leave-one-out (`fgvr.fast_path.support_loo`): all `fgvr classify` has. Support images are scored
against k-1 shots, so they look less certain than real queries and the realised rate falls below the budget
(Fashion-MNIST, 5 shots, Lite0: 0.249 for a budget of 0.3, mean of 3 seeds,
benchmarks/results/fashion_mnist.json). `fgvr evaluate` therefore calibrates by default on its own images' scores (`calibrate(scores)`, labels never used), which meets the budget on the run
(0.30 for 0.3). A sample goes slow when score > threshold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fgvr.fast_path import FastResult, support_loo

SIGNALS = ("top1", "margin", "entropy", "precision")


@dataclass
class TriggerDecision:
    """Everything the trigger looked at for one sample, and what it decided (logged per image)."""

    go_slow: bool
    score: float
    threshold: float
    predicted: int
    top1_prob: float
    margin: float
    entropy: float
    precision_lb: float
    precision_correct: int  # m: right, of the n times the base's support predicted this class
    precision_total: int  # n
    u: dict[str, float]  # each signal's doubt term in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("score", "threshold"):  # JSON has no infinities
            if math.isinf(d[key]):
                d[key] = None if key == "score" else ("inf" if d[key] > 0 else "-inf")
        return d


def beta_lower_bound(correct: torch.Tensor, total: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """The alpha quantile of Beta(m+1, n-m+1), elementwise: a pessimistic estimate of a precision m/n.

    torch's Beta has no icdf; scipy (a scikit-learn dependency) inverts the regularised incomplete beta.
    """
    from scipy.special import betaincinv

    m = correct.detach().double().cpu().numpy()
    n = total.detach().double().cpu().numpy()
    if (m < 0).any() or (m > n).any():
        raise ValueError("retrieval statistics are inconsistent: need 0 <= correct <= total for every class")
    lb = betaincinv(m + 1.0, n - m + 1.0, alpha)
    return torch.as_tensor(lb, dtype=torch.float64)


def _precision_counts(kb: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    stats = getattr(kb, "stats", None)
    if stats is None:
        z = torch.zeros(num_classes, dtype=torch.float64)
        return z, z.clone()
    m = torch.as_tensor(stats.pred_correct, dtype=torch.float64).reshape(-1)
    n = torch.as_tensor(stats.pred_total, dtype=torch.float64).reshape(-1)
    if m.numel() != num_classes or n.numel() != num_classes:
        raise ValueError(f"knowledge base statistics cover {n.numel()} classes, its prototypes {num_classes}")
    return m, n


@dataclass
class Trigger:
    """Sends a sample slow when its combined doubt score exceeds `threshold`.

    Give `threshold`, or `budget` (fraction of samples to send slow) and let `calibrate` /
    `calibrate_on_support` set the threshold. `weights` maps signal name -> weight (missing = 1).
    """

    threshold: float | None = None
    budget: float | None = None
    weights: dict[str, float] | None = None
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.budget is not None and not (0.0 <= self.budget <= 1.0):
            raise ValueError(f"slow-path budget must be a fraction in [0, 1], got {self.budget}")
        if self.threshold is None and self.budget is None:
            raise ValueError("give the trigger a threshold or a slow-path budget")
        unknown = set(self.weights or {}) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown trigger signals {sorted(unknown)}; known: {', '.join(SIGNALS)}")
        if sum(self._weights().values()) <= 0:
            raise ValueError("trigger weights must not all be zero")
        if not (0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")

    def _weights(self) -> dict[str, float]:
        return {s: float((self.weights or {}).get(s, 1.0)) for s in SIGNALS}

    def signals(self, fast: FastResult, kb: Any) -> dict[str, torch.Tensor]:
        """Each doubt term u_i (B,) in [0, 1], float64 on CPU, plus the raw counts behind the precision term."""
        num_classes = fast.probs.shape[1]
        pred = fast.topk_ids[:, 0].cpu()
        m, n = _precision_counts(kb, num_classes)
        m, n = m[pred], n[pred]
        lb = beta_lower_bound(m, n, self.alpha)  # only for the predicted classes: B values, not C
        return {
            "top1": (1.0 - fast.topk_probs[:, 0].double().cpu()).clamp(0, 1),
            "margin": (1.0 - fast.margin.double().cpu()).clamp(0, 1),
            "entropy": fast.entropy.double().cpu().clamp(0, 1),
            "precision": 1.0 - lb,
            "_m": m,
            "_n": n,
            "_lb": lb,
        }

    def scores(self, fast: FastResult, kb: Any) -> torch.Tensor:
        """(B,) combined doubt score in [0, 1] (float64, CPU)."""
        return self._combine(self.signals(fast, kb))

    def _combine(self, sig: dict[str, torch.Tensor]) -> torch.Tensor:
        a = self._weights()
        total = sum(a.values())
        return sum(a[s] * sig[s] for s in SIGNALS) / total

    def calibrate(self, scores: torch.Tensor) -> float:
        """Set the threshold so that a fraction `budget` of `scores` lies above it; returns it."""
        if self.budget is None:
            raise ValueError("calibrate needs a slow-path budget")
        s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        if self.budget <= 0.0:
            self.threshold = math.inf
        elif self.budget >= 1.0 or s.numel() == 0:
            self.threshold = -math.inf if self.budget >= 1.0 else math.inf
        else:
            self.threshold = float(torch.quantile(s, 1.0 - self.budget))
        return self.threshold

    def calibrate_on_support(self, kb: Any, **fast_kwargs: Any) -> float:
        """Calibrate on the base's support images scored leave-one-out (no query image needed)."""
        fast, _ = support_loo(kb, **fast_kwargs)
        return self.calibrate(self.scores(fast, kb))

    def with_threshold(self, threshold: float) -> "Trigger":
        """A copy with `threshold` set (this trigger is left as it is)."""
        return dataclasses.replace(self, threshold=float(threshold))

    def calibrated(self, scores: torch.Tensor) -> "Trigger":
        """A copy calibrated on `scores` (see `calibrate`); this trigger is left as it is."""
        copy = dataclasses.replace(self)
        copy.calibrate(scores)
        return copy

    def calibrated_on_support(self, kb: Any, **fast_kwargs: Any) -> "Trigger":
        """A copy calibrated on the base's support set (see `calibrate_on_support`); this one is left as it is."""
        copy = dataclasses.replace(self)
        copy.calibrate_on_support(kb, **fast_kwargs)
        return copy

    def decide(self, fast: FastResult, kb: Any) -> list[TriggerDecision]:
        """One decision per sample, with every input logged. Needs a threshold (set or calibrated)."""
        if self.threshold is None:
            raise ValueError("the trigger has a budget but no threshold yet: call calibrate or calibrate_on_support")
        sig = self.signals(fast, kb)
        score = self._combine(sig)
        out = []
        for i in range(len(fast)):
            out.append(TriggerDecision(
                go_slow=bool(score[i] > self.threshold),
                score=float(score[i]),
                threshold=float(self.threshold),
                predicted=int(fast.topk_ids[i, 0]),
                top1_prob=float(fast.topk_probs[i, 0]),
                margin=float(fast.margin[i]),
                entropy=float(fast.entropy[i]),
                precision_lb=float(sig["_lb"][i]),
                precision_correct=int(sig["_m"][i]),
                precision_total=int(sig["_n"][i]),
                u={s: float(sig[s][i]) for s in SIGNALS},
            ))
        return out
