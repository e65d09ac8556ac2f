"""summary.json of an evaluation: a function of its result rows alone (so a resumed run gives the same
summary as an uninterrupted one), and the accuracy-vs-budget curve from one run's logged scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from fgvr.pipeline import PATH_ERROR, PATH_FAST, PATH_SLOW, PATH_SLOW_FAILED, PATH_UNAVAILABLE
from fgvr.records import ResultRow, iter_as_rows

CURVE_BUDGETS = [round(0.05 * i, 2) for i in range(21)]


def _acc(rows: list[ResultRow]) -> float | None:
    return (sum(1 for r in rows if r.correct) / len(rows)) if rows else None


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def budget_curve(records: Iterable[ResultRow | dict[str, Any]], budgets: list[float] = CURVE_BUDGETS) -> dict[str, Any]:
    """Accuracy if a fraction b of the labelled, readable images (the most uncertain) had gone slow.

    Points whose top-b images include one without a System 2 answer are not computable and are left out.
    """
    return _curve([p for p in map(_curve_point, iter_as_rows(records)) if p is not None], budgets)


def _curve_point(r: ResultRow) -> tuple[float, str, bool | None, bool] | None:
    """What the curve needs of a row: (−score, path, System 2 right or None, System 1 right)."""
    if not (r.known and r.path_taken != PATH_ERROR and r.trigger):
        return None
    score = r.trigger["score"] if r.trigger["score"] is not None else 0.0
    slow = None if r.slow_prediction is None else r.slow_prediction == r.label_id
    return -score, r.path, slow, r.fast_prediction == r.label_id


def _curve(rows: list[tuple[float, str, bool | None, bool]], budgets: list[float]) -> dict[str, Any]:
    rows.sort(key=lambda p: (p[0], p[1]))
    n = len(rows)
    points = []
    for b in budgets:
        m = int(round(b * n))
        if any(p[2] is None for p in rows[:m]):
            continue
        right = sum(bool(p[2]) for p in rows[:m]) + sum(p[3] for p in rows[m:])
        points.append({"budget": b, "slow_images": m, "accuracy": right / n if n else None})
    has_slow = sum(1 for p in rows if p[2] is not None)
    return {"points": points, "n": n, "images_with_slow_answer": has_slow,
            "exact": "all budgets" if n and has_slow == n else f"budgets up to {has_slow / n:.3f}" if n else "none"}


def _fast_right(r: ResultRow) -> bool:
    return r.fast_prediction is not None and r.fast_prediction == r.label_id


def paired_accuracies(known: list[ResultRow]) -> dict[str, Any]:
    """System 1 and the dual system, always on the same images, so their difference is a paired one.

    `accuracy` / `accuracy_system1_alone`: every labelled image of a known class, an unreadable image wrong
    for both; `accuracy_readable` / `accuracy_system1_alone_readable`: the readable ones only (neither system
    saw the others); `n_unreadable` says how many images the two pairs differ by. With no System 2 each pair
    is equal.
    """
    readable = [r for r in known if r.path_taken != PATH_ERROR]
    fast_all = sum(_fast_right(r) for r in known)
    fast_read = sum(_fast_right(r) for r in readable)
    return {
        "accuracy": _acc(known),
        "accuracy_system1_alone": fast_all / len(known) if known else None,
        "accuracy_readable": _acc(readable),
        "accuracy_system1_alone_readable": fast_read / len(readable) if readable else None,
        "n_unreadable": len(known) - len(readable),
    }


@dataclass(frozen=True)
class _OpenSetRow:
    """What `fgvr.open_set.open_set_summary` reads of a row, kept instead of the row."""

    unknown_score: float
    label_id: int | None
    correct: bool | None
    unknown: bool | None
    closed_prediction: int | None
    prediction: None = None


def _open_set_summary(rows: list[_OpenSetRow]) -> dict[str, Any] | None:
    from fgvr.open_set import open_set_summary

    return open_set_summary(rows)


class _Count:
    """n, and how many of them were right."""

    __slots__ = ("n", "right")

    def __init__(self) -> None:
        self.n = self.right = 0

    def add(self, right: bool) -> None:
        self.n += 1
        self.right += bool(right)

    def acc(self) -> float | None:
        return self.right / self.n if self.n else None


class SummaryAccumulator:
    """`summarise` one row at a time. It keeps counts (per class, per path, the confusion matrix: the
    base's size) and, per image, only the few scalars a quantile or a sort needs (latency, the trigger score
    with its path for the budget curve), so a run's summary never holds its rows: `fgvr evaluate` feeds
    it from results.jsonl line by line."""

    def __init__(self, classes: list[str]) -> None:
        from fgvr.metrics import MetricsAccumulator

        self.classes = classes
        c = len(classes)
        self.metrics = MetricsAccumulator(classes)
        self.n = 0
        self.known, self.readable, self.known_readable = _Count(), 0, _Count()
        self.fast_all = self.fast_read = 0
        self.confusion = [[0] * c for _ in range(c)]
        self.per_class: dict[str, _Count] = {}
        self.paths: dict[str, list[int]] = {}  # name -> [n, known, known right]
        self.errors: list[dict[str, Any]] = []
        self.triggered = self.ran = self.tokens_in = self.tokens_out = 0
        self.slowed, self.slowed_fast = _Count(), 0
        self.unknown_preds: dict[str, dict[str, int]] = {}
        self.latency: list[float] = []
        self.curve: list[tuple[float, str, bool | None, bool]] = []
        self.answered_unknown = 0
        self.open_set: list[_OpenSetRow] = []  # per scored image, the five scalars open_set_summary reads

    def add(self, row: ResultRow | dict[str, Any]) -> None:
        r = row if isinstance(row, ResultRow) else ResultRow.from_dict(row)
        self.metrics.add(r)
        self.n += 1
        self.answered_unknown += bool(r.unknown)
        if r.unknown_score is not None:
            self.open_set.append(_OpenSetRow(r.unknown_score, r.label_id, r.correct, r.unknown,
                                             r.closed_prediction if r.closed_prediction is not None else r.prediction))
        readable = r.path_taken != PATH_ERROR
        path = self.paths.setdefault(r.path_taken, [0, 0, 0])
        path[0] += 1
        if r.known:
            path[1] += 1
            path[2] += bool(r.correct)
            self.known.add(r.correct)
            self.fast_all += _fast_right(r)
            self.per_class.setdefault(self.classes[r.label_id], _Count()).add(r.correct)
            if r.prediction is not None:
                self.confusion[r.label_id][r.prediction] += 1
            if readable:
                self.known_readable.add(r.correct)
                self.fast_read += _fast_right(r)
                if r.path_taken == PATH_SLOW:
                    self.slowed.add(r.correct)
                    self.slowed_fast += _fast_right(r)
        elif r.prediction_name is not None:
            d = self.unknown_preds.setdefault(r.label, {})
            d[r.prediction_name] = d.get(r.prediction_name, 0) + 1
        if not readable:
            self.errors.append({"path": r.path, "error": r.error})
            return
        self.readable += 1
        self.triggered += bool(r.trigger and r.trigger.get("go_slow"))
        self.ran += bool(r.slow_ran)
        self.tokens_in += r.slow_tokens_in
        self.tokens_out += r.slow_tokens_out
        if r.timings.get("total") is not None:
            self.latency.append(r.timings["total"])
        point = _curve_point(r)
        if point is not None:
            self.curve.append(point)

    def result(self, unknown: list[str]) -> dict[str, Any]:
        """Everything `summary.json` holds except run timings and memory."""
        classes, readable, n_read = self.classes, self.readable, max(1, self.readable)
        per_class = {name: {"n": pc.n, "correct": pc.right, "accuracy": pc.right / pc.n}
                     for name, pc in sorted(self.per_class.items())}
        paths = {name: {"n": self.paths[name][0],
                        "accuracy": self.paths[name][2] / self.paths[name][1] if self.paths[name][1] else None}
                 for name in (PATH_FAST, PATH_SLOW, PATH_UNAVAILABLE, PATH_SLOW_FAILED, PATH_ERROR)
                 if self.paths.get(name, [0])[0]}
        known, known_read = self.known, self.known_readable
        return {
            **self.metrics.result(),  # acc1/acc5, balanced accuracy, macro-F1, ECE (fgvr.metrics)
            "n_images": self.n,
            "n_labelled_known": known.n,
            "n_errors": self.n - readable,
            "errors": list(self.errors),
            # paired_accuracies: the same images for both systems
            "accuracy": known.acc(),
            "accuracy_system1_alone": self.fast_all / known.n if known.n else None,
            "accuracy_readable": known_read.acc(),
            "accuracy_system1_alone_readable": self.fast_read / known_read.n if known_read.n else None,
            "n_unreadable": known.n - known_read.n,
            "per_class": per_class,
            "confusion": {"classes": classes, "rows": "true class", "columns": "predicted class",
                          "matrix": self.confusion},
            "unknown_classes": unknown,
            "unknown_class_images": self.n - known.n,
            "unknown_class_predictions": self.unknown_preds,
            "slow_rate": self.triggered / n_read if readable else None,
            "paths": paths,
            "slowed_images": {"n": self.slowed.n,
                              "system1_accuracy": self.slowed_fast / self.slowed.n if self.slowed.n else None,
                              "final_accuracy": self.slowed.acc()},
            "system2_calls": self.ran,
            "system2_calls_per_image": self.ran / n_read if readable else None,
            "tokens_in_per_image": self.tokens_in / n_read if readable else None,
            "tokens_out_per_image": self.tokens_out / n_read if readable else None,
            "latency_s": _pct(self.latency),
            "budget_curve": _curve(list(self.curve), CURVE_BUDGETS),
            "n_answered_unknown": self.answered_unknown,
            # AUROC / FPR@95 of the unknown score and the known-class accuracy it costs (None: no unknown class)
            "open_set": _open_set_summary(self.open_set),
        }


def summarise(records: Iterable[ResultRow | dict[str, Any]], classes: list[str], unknown: list[str]) -> dict[str, Any]:
    """Everything `summary.json` holds except run timings and memory; a function of the records alone,
    taken one at a time (an iterator over results.jsonl streams: see `SummaryAccumulator`)."""
    acc = SummaryAccumulator(classes)
    for r in records:
        acc.add(r)
    return acc.result(unknown)
