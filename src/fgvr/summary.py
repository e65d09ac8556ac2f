"""summary.json of an evaluation: a function of its result rows alone (so a resumed run gives the same
summary as an uninterrupted one), and the accuracy-vs-budget curve from one run's logged scores."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fgvr.pipeline import PATH_ERROR, PATH_FAST, PATH_SLOW, PATH_SLOW_FAILED, PATH_UNAVAILABLE
from fgvr.records import ResultRow, as_rows

CURVE_BUDGETS = [round(0.05 * i, 2) for i in range(21)]


def _acc(rows: list[ResultRow]) -> float | None:
    return (sum(1 for r in rows if r.correct) / len(rows)) if rows else None


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def budget_curve(records: Sequence[ResultRow | dict[str, Any]], budgets: list[float] = CURVE_BUDGETS) -> dict[str, Any]:
    """Accuracy if a fraction b of the labelled, readable images (the most uncertain) had gone slow.

    Points whose top-b images include one without a System 2 answer are not computable and are left out.
    """
    rows = [r for r in as_rows(records) if r.known and r.path_taken != PATH_ERROR
            and r.trigger]
    rows.sort(key=lambda r: (-(r.trigger["score"] if r.trigger["score"] is not None else 0.0), r.path))
    n = len(rows)
    points = []
    for b in budgets:
        m = int(round(b * n))
        if any(r.slow_prediction is None for r in rows[:m]):
            continue
        right = sum(r.slow_prediction == r.label_id for r in rows[:m])
        right += sum(r.fast_prediction == r.label_id for r in rows[m:])
        points.append({"budget": b, "slow_images": m, "accuracy": right / n if n else None})
    has_slow = sum(1 for r in rows if r.slow_prediction is not None)
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


def summarise(records: Sequence[ResultRow | dict[str, Any]], classes: list[str], unknown: list[str]) -> dict[str, Any]:
    """Everything `summary.json` holds except run timings and memory; a function of the records alone."""
    records = as_rows(records)
    known = [r for r in records if r.known]
    readable = [r for r in records if r.path_taken != PATH_ERROR]
    known_readable = [r for r in known if r.path_taken != PATH_ERROR]
    c = len(classes)
    confusion = [[0] * c for _ in range(c)]
    per_class: dict[str, dict[str, Any]] = {}
    for r in known:
        name = classes[r.label_id]
        pc = per_class.setdefault(name, {"n": 0, "correct": 0})
        pc["n"] += 1
        pc["correct"] += bool(r.correct)
        if r.prediction is not None:
            confusion[r.label_id][r.prediction] += 1
    for pc in per_class.values():
        pc["accuracy"] = pc["correct"] / pc["n"]
    per_class = dict(sorted(per_class.items()))

    paths: dict[str, dict[str, Any]] = {}
    for name in (PATH_FAST, PATH_SLOW, PATH_UNAVAILABLE, PATH_SLOW_FAILED, PATH_ERROR):
        rows = [r for r in records if r.path_taken == name]
        if rows:
            paths[name] = {"n": len(rows), "accuracy": _acc([r for r in rows if r.known])}
    triggered = [r for r in readable if r.trigger and r.trigger.get("go_slow")]
    slowed = [r for r in known_readable if r.path_taken == PATH_SLOW]
    ran = [r for r in readable if r.slow_ran]
    unknown_preds: dict[str, dict[str, int]] = {}
    for r in records:
        if not r.known and r.prediction_name is not None:
            d = unknown_preds.setdefault(r.label, {})
            d[r.prediction_name] = d.get(r.prediction_name, 0) + 1
    n_read = max(1, len(readable))
    from fgvr.metrics import classification_metrics
    from fgvr.open_set import open_set_summary

    return {
        **classification_metrics([r.to_dict() for r in records], classes),  # acc1/acc5, balanced accuracy, macro-F1, ECE (fgvr.metrics)
        "n_images": len(records),
        "n_labelled_known": len(known),
        "n_errors": len(records) - len(readable),
        "errors": [{"path": r.path, "error": r.error} for r in records if r.path_taken == PATH_ERROR],
        **paired_accuracies(known),
        "per_class": per_class,
        "confusion": {"classes": classes, "rows": "true class", "columns": "predicted class", "matrix": confusion},
        "unknown_classes": unknown,
        "unknown_class_images": len(records) - len(known),
        "unknown_class_predictions": unknown_preds,
        "slow_rate": len(triggered) / n_read if readable else None,
        "paths": paths,
        "slowed_images": {"n": len(slowed),
                          "system1_accuracy": (sum(_fast_right(r) for r in slowed) / len(slowed)) if slowed else None,
                          "final_accuracy": _acc(slowed)},
        "system2_calls": len(ran),
        "system2_calls_per_image": len(ran) / n_read if readable else None,
        "tokens_in_per_image": sum(r.slow_tokens_in for r in readable) / n_read if readable else None,
        "tokens_out_per_image": sum(r.slow_tokens_out for r in readable) / n_read if readable else None,
        "latency_s": _pct([r.timings["total"] for r in readable if r.timings.get("total") is not None]),
        "budget_curve": budget_curve(records),
        "n_answered_unknown": sum(1 for r in records if r.unknown),
        # AUROC / FPR@95 of the unknown score and the known-class accuracy it costs (None: no unknown class)
        "open_set": open_set_summary(records),
    }
