"""Open set: answer "unknown" for an image of a class the base does not hold, instead of forcing it into the
nearest class.

System 1's unknown score is the **top-1 fused similarity**: the largest entry of the fused logits
w * s_img + (1 - w) * s_text that the posterior is the softmax of (`FastResult.logits`), i.e. how close the
image comes to the best class at all. The posterior's top-1 (`p1`) says how much better the best class is
than the others, which an image of a new class can be too (it is often nearest to one class by a margin);
its raw similarity to every class is lower, which is what an unknown looks like to a retrieval system. A
low score means "unknown".

**Calibration without unknown images.** At build (and after every `kb add` / `kb remove`, which refit the
same way) each support image is scored against the base *without itself* (`fast_path.support_loo`: its
class mean without it, every exemplar but itself): that is the distribution of the score on known-class
images the base has not seen. Its quantiles are stored in the manifest (`open_set`), so the threshold for
a target rate R of known images wrongly answered unknown is the R quantile of those scores. Images of a
class with a single support image are left out (that class has no image evidence left once the image is
removed, as in `fitting.retrieval_stats`). A support image is scored against k-1 shots, so it looks a
little less known than a real query of its class: the realised rate of knowns rejected comes out at or
below R (the same direction as the trigger's budget, see `fgvr.trigger`).

A base built before this existed has no `open_set` record; it is computed on load (one leave-one-out pass
over the support set, the pass `open_system` already makes to calibrate the trigger, so it costs no more
than opening the base does) with a log line that a rebuild, `kb add` or `kb remove` would store it.

System 2, when open set is on, gets a "none of these" option with its own letter (`slow_path`); if the
VLM's answer is that letter, the decision is unknown. The final answer is unknown when System 1's score is
below the threshold, or when System 2 was used for the image and picked "none of these".

**Metrics** (`open_set_summary`, in `fgvr evaluate`'s summary when the test set has classes the base does
not hold): the AUROC of the score for telling known-class images from unknown-class ones, the FPR at 95%
TPR (known-class images are the positives: the share of unknown-class images still accepted as known at
the threshold that keeps 95% of the known ones), and the known-class accuracy with and without rejection,
each with a bootstrap 95% interval (AUROC and FPR resample the known and unknown images separately; the
accuracy cost is a paired bootstrap over the same known images, `fgvr.stats.paired_bootstrap`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fgvr.errors import UsageError

log = logging.getLogger(__name__)

SCORE = "top1_similarity"
QUANTILES = 1000  # the stored table has QUANTILES + 1 points: q(0), q(1/1000), ..., q(1)
MANIFEST_KEY = "open_set"
NONE_OF_THESE = "none of these"
TPR = 0.95


class OpenSetError(UsageError, ValueError):
    """A bad open-set setting; the message says which and what is allowed."""


def check_rate(rate: float) -> float:
    """A share of known images accepted as answered unknown: 0 <= R < 1 (R = 1 would reject everything)."""
    r = float(rate)
    if not math.isfinite(r) or r < 0.0 or r >= 1.0:
        raise OpenSetError(f"--unknown-rate {rate}: the share of known images answered unknown must lie in "
                           "[0, 1) (e.g. 0.05)")
    return r


def unknown_scores(fast: Any) -> torch.Tensor:
    """(B,) System 1's unknown score, float64 on CPU: the top-1 fused similarity (low = unknown)."""
    return fast.logits.max(dim=1).values.double().cpu()


def loo_scores(kb: Any) -> torch.Tensor:
    """The score of every support image against the base without itself (images of single-image classes
    left out, see the module docstring); float64, CPU."""
    from fgvr.fast_path import support_loo

    labels = kb.exemplar_labels.long().cpu()
    counts = torch.bincount(labels, minlength=len(kb.classes))
    mask = counts[labels] > 1
    if int(mask.sum()) == 0:
        return torch.zeros(0, dtype=torch.float64)
    fast, _ = support_loo(kb, k=1)
    return unknown_scores(fast)[mask]


def calibration_record(kb: Any) -> dict[str, Any]:
    """What the manifest keeps: the score's name, how many support images it was measured on, and the
    quantile table of their leave-one-out scores (enough to set any rate to 1/1000)."""
    s = loo_scores(kb)
    record: dict[str, Any] = {"score": SCORE, "images": int(s.numel()),
                              "rule": "leave-one-out on the support set; images of single-image classes excluded"}
    if s.numel():
        q = torch.quantile(s, torch.linspace(0, 1, QUANTILES + 1, dtype=torch.float64))
        record["quantiles"] = [round(float(x), 7) for x in q]
    else:
        record["quantiles"] = None
    return record


def calibration(kb: Any) -> dict[str, Any]:
    """The base's stored calibration, or one computed now for a base that predates it (see the docstring)."""
    stored = (getattr(kb, "manifest", None) or {}).get(MANIFEST_KEY)
    if isinstance(stored, dict) and stored.get("score") == SCORE and "quantiles" in stored:
        return stored
    cached = kb.__dict__.get("_open_set_calibration")
    if cached is None:
        log.info("%s has no open-set calibration (built before it existed): computed now from its support set "
                 "(leave-one-out); a rebuild, `fgvr kb add` or `fgvr kb remove` stores it",
                 getattr(kb, "path", None) or "the knowledge base")
        cached = kb.__dict__["_open_set_calibration"] = calibration_record(kb)
    return cached


def threshold_for_rate(kb: Any, rate: float) -> float:
    """The score below which a share `rate` of the support set's leave-one-out scores lie."""
    rate = check_rate(rate)
    cal = calibration(kb)
    q = cal.get("quantiles")
    if not q:
        raise OpenSetError(f"{getattr(kb, 'path', None) or 'the knowledge base'} has no class with two support "
                           "images, so nothing to calibrate --unknown-rate on: give --unknown-threshold instead")
    grid = np.linspace(0.0, 1.0, len(q))
    return float(np.interp(rate, grid, np.asarray(q, dtype=np.float64)))


@dataclass(frozen=True)
class OpenSet:
    """The open-set setting of a system: answers whose score is below `threshold` are "unknown"; `rate` is
    the share of known images it was calibrated to reject (None for an explicit threshold). `none_option`:
    System 2 (a VLM) gets a "none of these" option."""

    threshold: float
    rate: float | None = None
    score: str = SCORE
    none_option: bool = True

    @classmethod
    def from_options(cls, kb: Any, rate: float | None = None, threshold: float | None = None) -> "OpenSet | None":
        """None when neither is given (open set off, the default)."""
        if rate is not None and threshold is not None:
            raise OpenSetError("give --unknown-rate or --unknown-threshold, not both")
        if threshold is not None:
            t = float(threshold)
            if not math.isfinite(t):
                raise OpenSetError(f"--unknown-threshold {threshold}: must be a finite number (a similarity)")
            return cls(threshold=t)
        if rate is not None:
            return cls(threshold=threshold_for_rate(kb, rate), rate=check_rate(rate))
        return None

    def rejects(self, score: float) -> bool:
        return score < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold, "rate": self.rate, "none_option": self.none_option}


# --- metrics ------------------------------------------------------------------------------------------------


def auroc(known: Sequence[float] | np.ndarray, unknown: Sequence[float] | np.ndarray) -> float:
    """P(score of a known image > score of an unknown one), ties counting a half (the Mann-Whitney U
    statistic; equals sklearn's roc_auc_score with knowns as positives)."""
    k, u = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if k.size == 0 or u.size == 0:
        raise ValueError("AUROC needs known and unknown images")
    both = np.concatenate([k, u])
    ranks = _average_ranks(both)
    return float((ranks[: k.size].sum() - k.size * (k.size + 1) / 2) / (k.size * u.size))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def fpr_at_tpr(known: Sequence[float] | np.ndarray, unknown: Sequence[float] | np.ndarray, tpr: float = TPR) -> float:
    """The share of unknown images accepted as known at the loosest threshold that accepts at least `tpr` of
    the known ones (knowns are the positives; accepted = score >= threshold). The ROC curve's FPR at the
    first point where its TPR reaches `tpr`, as read off sklearn's roc_curve."""
    k, u = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if k.size == 0 or u.size == 0:
        raise ValueError("FPR at a TPR needs known and unknown images")
    ks = np.sort(k)[::-1]
    need = int(math.ceil(tpr * k.size - 1e-9))
    t = ks[max(need, 1) - 1]  # the highest threshold with at least `need` knowns at or above it
    return float((u >= t).mean())


def _bootstrap(stat, known: np.ndarray, unknown: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of stat(known, unknown), known and unknown images resampled separately."""
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        vals[b] = stat(known[rng.integers(0, known.size, known.size)], unknown[rng.integers(0, unknown.size, unknown.size)])
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def _closed(row: Any) -> int | None:
    """The answer the image would have had with open set off (rows of an older fgvr: the prediction)."""
    return row.closed_prediction if row.closed_prediction is not None else row.prediction


def open_set_summary(rows: Sequence[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """The open-set numbers of an evaluation's rows (`records.ResultRow`); None when the rows carry no
    unknown score (open set off) or hold no image of a class outside the base."""
    from fgvr.stats import paired_bootstrap

    readable = [r for r in rows if r.unknown_score is not None]  # an unreadable image has no score
    known = [r for r in readable if r.label_id is not None]
    unknown = [r for r in readable if r.label_id is None]
    if not known or not unknown:
        return None
    ks = np.array([r.unknown_score for r in known], dtype=np.float64)
    us = np.array([r.unknown_score for r in unknown], dtype=np.float64)
    a = auroc(ks, us)
    f = fpr_at_tpr(ks, us)
    a_lo, a_hi = _bootstrap(auroc, ks, us, n_boot, seed)
    f_lo, f_hi = _bootstrap(fpr_at_tpr, ks, us, n_boot, seed + 1)
    with_rej = np.array([1.0 if r.correct else 0.0 for r in known])
    without = np.array([1.0 if _closed(r) == r.label_id else 0.0 for r in known])
    zeros = np.zeros(len(known))
    acc_w, acc_wo = paired_bootstrap(with_rej, zeros, n_boot=n_boot, seed=seed), paired_bootstrap(without, zeros, n_boot=n_boot, seed=seed)
    cost = paired_bootstrap(without, with_rej, n_boot=n_boot, seed=seed)
    return {
        "score": SCORE, "n_known": len(known), "n_unknown": len(unknown),
        "auroc": a, "auroc_ci": [a_lo, a_hi],
        "fpr_at_95_tpr": f, "fpr_at_95_tpr_ci": [f_lo, f_hi],
        "known_accuracy_with_rejection": acc_w["mean"], "known_accuracy_with_rejection_ci": [acc_w["low"], acc_w["high"]],
        "known_accuracy_without_rejection": acc_wo["mean"],
        "known_accuracy_without_rejection_ci": [acc_wo["low"], acc_wo["high"]],
        "known_accuracy_cost": cost["mean"], "known_accuracy_cost_ci": [cost["low"], cost["high"]],
        "known_rejected_rate": float(np.mean([bool(r.unknown) for r in known])),
        "unknown_rejected_rate": float(np.mean([bool(r.unknown) for r in unknown])),
        "intervals": f"bootstrap 95%, {n_boot} resamples (AUROC, FPR: known and unknown images resampled "
                     "separately; accuracies and their cost: paired over the known images)",
        "fpr_convention": "known-class images are the positives; FPR = unknown-class images accepted as known",
    }
