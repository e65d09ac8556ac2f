"""The field's metrics over an evaluation's records: top-1/top-5, balanced accuracy, macro-F1, calibration.

Accuracy alone hides a class the system never gets right (on an unbalanced test set) and says nothing about
whether the reported confidence means anything. So `summary.json` also carries:

* `top5_accuracy`: the true class among the 5 candidates ranked by the final distribution (None where the
  run kept fewer than 5 candidates: that would be a top-k accuracy for a smaller k, under the wrong name);
* `balanced_accuracy`: the mean per-class recall over the classes that have test images;
* `macro_f1`: the mean F1 over the classes that occur as truth or prediction (as sklearn's `f1_score(...,
  average="macro")`);
* `ece`: expected calibration error of the final confidence, 15 equal-width bins (Guo et al., 2017):
  sum over bins of (images in bin / N) * |accuracy - mean confidence|. The confidence is the record's:
  the top-1 probability of the final distribution over the top-k candidates, renormalised over those k
  (System 1's posterior over all classes restricted to its candidates, or the decision's mix), so it is
  higher than the full posterior's top-1 and this ECE is not comparable with one computed over all
  classes; `ece_confidence` in the summary says so;
* CLIP_benchmark's keys for the same numbers beside ours: `acc1`, `acc5`, `mean_per_class_recall`.

Images of classes the base does not know are left out (no answer can be right for them); unreadable images
count as wrong, as in `accuracy`, and are left out of the calibration error (they have no confidence).
"""

from __future__ import annotations

from typing import Any, Sequence

ECE_BINS = 15


def _ranked(record: dict[str, Any]) -> list[int]:
    """Candidate ids, best final probability first (the fast one where the decision did not run)."""
    cands = record.get("candidates") or []
    key = lambda c: c.get("final") if c.get("final") is not None else c.get("fast", 0.0)  # noqa: E731
    return [int(c["id"]) for c in sorted(cands, key=key, reverse=True)]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """ECE with equal-width bins on (0, 1]; None without any sample."""
    if not confidences:
        return None
    n = len(confidences)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c <= 0.0)]
        if idx:
            acc = sum(bool(correct[i]) for i in idx) / len(idx)
            conf = sum(confidences[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total


def classification_metrics(records: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The metrics above, and per-class precision / recall / F1 (`per_class_metrics`)."""
    known = [r for r in records if r.get("label_id") is not None]
    if not known:
        return {"acc1": None, "acc5": None, "mean_per_class_recall": None, "top5_accuracy": None,
                "balanced_accuracy": None, "macro_f1": None, "ece": None, "per_class_metrics": {}}
    truth = [int(r["label_id"]) for r in known]
    pred = [r.get("prediction") for r in known]
    acc1 = sum(p == t for p, t in zip(pred, truth)) / len(known)
    ranked = [_ranked(r) for r in known]
    acc5 = None
    if all(len(rk) >= 5 for rk, r in zip(ranked, known) if r.get("prediction") is not None):
        acc5 = sum(t in rk[:5] for t, rk in zip(truth, ranked)) / len(known)
    per_class: dict[str, dict[str, Any]] = {}
    f1s, recalls = [], []
    for c, name in enumerate(classes):
        tp = sum(p == c and t == c for p, t in zip(pred, truth))
        n_true, n_pred = truth.count(c), sum(p == c for p in pred)
        if n_true == 0 and n_pred == 0:
            continue
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"n": n_true, "predicted": n_pred, "precision": precision, "recall": recall, "f1": f1}
        f1s.append(f1)
        if n_true:
            recalls.append(recall)
    readable = [(float(r["confidence"]), r.get("prediction") == r["label_id"]) for r in known
                if r.get("confidence") is not None]
    balanced = sum(recalls) / len(recalls)
    return {
        "acc1": acc1, "acc5": acc5, "mean_per_class_recall": balanced,
        "top5_accuracy": acc5, "balanced_accuracy": balanced, "macro_f1": sum(f1s) / len(f1s),
        "ece": expected_calibration_error([c for c, _ in readable], [ok for _, ok in readable]),
        "ece_confidence": "top-1 of the final distribution renormalised over the top-k candidates",
        "per_class_metrics": per_class,
    }
