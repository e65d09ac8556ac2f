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

from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from fgvr.records import ResultRow

ECE_BINS = 15


def _ranked(row: ResultRow) -> list[int]:
    """Candidate ids, best final probability first (the fast one where the decision did not run)."""
    key = lambda c: c.final if c.final is not None else c.fast  # noqa: E731
    return [int(c.id) for c in sorted(row.candidates, key=key, reverse=True)]


def _bin_of(c: float, bins: int) -> int | None:
    """The ECE bin of a confidence (equal-width on (0, 1], 0 and below in the first), None above 1."""
    for b in range(bins):
        if (b / bins < c <= (b + 1) / bins) or (b == 0 and c <= 0.0):
            return b
    return None


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """ECE with equal-width bins on (0, 1]; None without any sample."""
    acc = _EceBins(bins)
    for c, ok in zip(confidences, correct):
        acc.add(float(c), bool(ok))
    return acc.value()


class _EceBins:
    """ECE from per-bin sums, filled one image at a time (same numbers as over a list)."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins, self.n = bins, 0
        self.count, self.right, self.conf = [0] * bins, [0] * bins, [0.0] * bins

    def add(self, confidence: float, correct: bool) -> None:
        self.n += 1
        b = _bin_of(confidence, self.bins)
        if b is not None:
            self.count[b] += 1
            self.right[b] += bool(correct)
            self.conf[b] += confidence

    def value(self) -> float | None:
        if not self.n:
            return None
        return sum((self.count[b] / self.n * abs(self.right[b] / self.count[b] - self.conf[b] / self.count[b])
                    for b in range(self.bins) if self.count[b]), 0.0)


class MetricsAccumulator:
    """`classification_metrics` one typed row (`fgvr.records.ResultRow`) at a time: counts per class (the
    base's size) and per ECE bin, nothing per image, so the summary of a 50,000-image run does not hold its
    rows. The summary feeds it the rows it reads anyway, so no row is turned back into a dict for it."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        c = len(classes)
        self.n = self.top1 = self.top5 = 0
        self.five_everywhere = True  # every answered record kept at least 5 candidates
        self.tp, self.n_true, self.n_pred = [0] * c, [0] * c, [0] * c
        self.ece = _EceBins()

    def add(self, row: ResultRow) -> None:
        if row.label_id is None:
            return
        t, p = int(row.label_id), row.prediction
        self.n += 1
        self.top1 += p == t
        ranked = _ranked(row)
        if p is not None and len(ranked) < 5:
            self.five_everywhere = False
        self.top5 += t in ranked[:5]
        if 0 <= t < len(self.n_true):
            self.n_true[t] += 1
        if isinstance(p, int) and 0 <= p < len(self.n_pred):
            self.n_pred[p] += 1
            self.tp[p] += p == t
        if row.confidence is not None:
            self.ece.add(float(row.confidence), p == t)

    def result(self) -> dict[str, Any]:
        if not self.n:
            return {"acc1": None, "acc5": None, "mean_per_class_recall": None, "top5_accuracy": None,
                    "balanced_accuracy": None, "macro_f1": None, "ece": None, "per_class_metrics": {}}
        acc1 = self.top1 / self.n
        acc5 = self.top5 / self.n if self.five_everywhere else None
        per_class: dict[str, dict[str, Any]] = {}
        f1s, recalls = [], []
        for c, name in enumerate(self.classes):
            tp, n_true, n_pred = self.tp[c], self.n_true[c], self.n_pred[c]
            if n_true == 0 and n_pred == 0:
                continue
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_true if n_true else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[name] = {"n": n_true, "predicted": n_pred, "precision": precision, "recall": recall, "f1": f1}
            f1s.append(f1)
            if n_true:
                recalls.append(recall)
        balanced = sum(recalls) / len(recalls)
        return {
            "acc1": acc1, "acc5": acc5, "mean_per_class_recall": balanced,
            "top5_accuracy": acc5, "balanced_accuracy": balanced, "macro_f1": sum(f1s) / len(f1s),
            "ece": self.ece.value(),
            "ece_confidence": "top-1 of the final distribution renormalised over the top-k candidates",
            "per_class_metrics": per_class,
        }


def _row(record: ResultRow | dict[str, Any]) -> ResultRow:
    """A typed row from a row, or from a record's JSON dict. A record made by hand or by another program
    may leave out what no metric reads (a candidate's `name`; its `fast` where `final` is there, read as 0.0
    where neither is): those get neutral values here, so such a record is scored as it always was."""
    from fgvr.records import ResultRow

    if isinstance(record, ResultRow):
        return record
    cands = [{"name": "", "fast": 0.0, **c} for c in record.get("candidates") or []]
    return ResultRow.from_dict({**record, "candidates": cands})


def classification_metrics(records: Iterable[ResultRow | dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The metrics above, and per-class precision / recall / F1 (`per_class_metrics`)."""
    acc = MetricsAccumulator(classes)
    for r in records:
        acc.add(_row(r))
    return acc.result()
