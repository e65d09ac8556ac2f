"""fgvr evaluate: exact-match summary, unknown test classes reported, unreadable images recorded, the
resumable results file (torn line, restart without duplicates), the budget curve, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fgvr.data import read_dataset
from fgvr.evaluate import EvaluateError, budget_curve, read_results, run_evaluation
from fgvr.pipeline import DualSystem
from fgvr.trigger import Trigger
from test_pipeline import COLOURS, ColourEncoder, PickLast, colour_kb

STABLE = ("n_images", "n_labelled_known", "n_errors", "accuracy", "accuracy_readable", "accuracy_system1_alone",
          "per_class", "confusion", "unknown_classes", "unknown_class_images", "unknown_class_predictions",
          "slow_rate", "paths", "slowed_images", "system2_calls", "tokens_in_per_image", "budget_curve")


def make_data(root: Path, per_class: int = 4) -> Path:
    shades = [(0, 0, 0), (40, 40, 40), (-40, 20, 0), (90, 90, 90), (20, -30, 60)]
    for name, rgb in list(COLOURS.items()) + [("yellow", (230, 220, 30))]:
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            c = tuple(max(0, min(255, a + b)) for a, b in zip(rgb, shades[i % len(shades)]))
            Image.new("RGB", (12, 12), c).save(d / f"{i}.png")
    (root / "red" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def system(slow=None, threshold=0.35, **kw):
    enc = ColourEncoder()
    return DualSystem(colour_kb(enc), enc, slow, Trigger(threshold=threshold), k=3, weight=1.0, **kw)


@pytest.fixture()
def data(tmp_path):
    return read_dataset(make_data(tmp_path / "data"))


def test_summary_exact_match_unknown_class_and_errors(tmp_path, data, capsys):
    out = tmp_path / "run"
    s = run_evaluation(system(), data, out, {"kb": "colours", "encoder": "colour", "data": "d"}, batch_size=5,
                       progress=False)
    err = capsys.readouterr().err
    assert "yellow" in err and "not in the knowledge base" in err
    assert s["unknown_classes"] == ["yellow"] and s["unknown_class_images"] == 4
    assert s["n_images"] == 25 and s["n_errors"] == 1 and s["errors"][0]["path"].endswith("broken.png")
    recs = read_results(out / "results.jsonl")
    assert len(recs) == 25 and len({r["path"] for r in recs}) == 25
    known = [r for r in recs if r["label_id"] is not None]
    assert all(r["correct"] == (r["prediction"] == r["label_id"]) for r in known)
    assert all(r["correct"] is None for r in recs if r["label"] == "yellow")
    assert s["accuracy"] == pytest.approx(sum(r["correct"] for r in known) / 21)
    assert s["accuracy_readable"] == pytest.approx(sum(r["correct"] for r in known) / 20)
    m = s["confusion"]["matrix"]
    assert sum(map(sum, m)) == 20 and sum(m[i][i] for i in range(5)) == sum(r["correct"] for r in known)
    assert s["per_class"]["red"]["n"] == 5
    assert s["slow_rate"] == pytest.approx(sum(r["trigger"]["go_slow"] for r in recs if r["trigger"]) / 24)
    assert 0 < s["slow_rate"] < 1
    assert "escalated-unavailable" in s["paths"] and s["system2_calls"] == 0
    for f in ("summary.json", "report.md", "confusion.png", "budget_curve.png", "run.json"):
        assert (out / f).is_file(), f
    assert "yellow" in (out / "report.md").read_text()


def test_resume_after_torn_line_gives_no_duplicates_and_same_summary(tmp_path, data):
    full = run_evaluation(system(PickLast()), data, tmp_path / "a", {"kb": "c", "encoder": "e", "data": "d"},
                          batch_size=4, progress=False, report=False)
    # a run killed mid-write: first 9 records plus half a line
    b = tmp_path / "b"
    b.mkdir()
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines(keepends=True)
    (b / "results.jsonl").write_text("".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    (b / "run.json").write_text((tmp_path / "a" / "run.json").read_text())
    sys_b = system(PickLast())
    calls = []
    orig = sys_b.classify_paths
    sys_b.classify_paths = lambda paths: calls.append(list(paths)) or orig(paths)
    resumed = run_evaluation(sys_b, data, b, {"kb": "c", "encoder": "e", "data": "d"}, batch_size=4,
                             progress=False, report=False)
    assert sum(len(c) for c in calls) == 25 - 9  # the torn image is redone, the 9 complete ones are not
    recs = [json.loads(x) for x in (b / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 25 and len({r["path"] for r in recs}) == 25
    for key in STABLE:
        assert resumed[key] == full[key], key


def test_restart_with_other_settings_is_refused(tmp_path, data):
    run_evaluation(system(), data, tmp_path / "r", {"kb": "c", "encoder": "e", "data": "d"}, limit=3,
                   progress=False, report=False)
    with pytest.raises(EvaluateError, match="other settings.*threshold"):
        run_evaluation(system(threshold=0.9), data, tmp_path / "r", {"kb": "c", "encoder": "e", "data": "d"},
                       progress=False, report=False)


def test_limit_spreads_over_classes_and_grows_on_restart(tmp_path, data):
    s = run_evaluation(system(), data, tmp_path / "l", {"kb": "c", "encoder": "e", "data": "d"}, limit=10,
                       progress=False, report=False)
    assert s["n_images"] == 10 and len({r.split("/")[-2] for r in
                                        [x["path"] for x in read_results(tmp_path / "l" / "results.jsonl")]}) > 2
    s2 = run_evaluation(system(), data, tmp_path / "l", {"kb": "c", "encoder": "e", "data": "d"}, limit=15,
                        progress=False, report=False)
    assert s2["n_images"] == 15


def test_budget_curve_from_one_slow_all_run(tmp_path, data):
    s = run_evaluation(system(PickLast(), slow_all=True), data, tmp_path / "s",
                       {"kb": "c", "encoder": "e", "data": "d"}, progress=False)
    curve = s["budget_curve"]
    assert curve["exact"] == "all budgets" and len(curve["points"]) == 21
    recs = [r for r in read_results(tmp_path / "s" / "results.jsonl") if r["label_id"] is not None
            and r["path_taken"] != "error"]
    n = len(recs)
    # budget 0 = System 1 alone, budget 1 = System 2's decided answer everywhere
    assert curve["points"][0]["accuracy"] == pytest.approx(sum(r["fast_prediction"] == r["label_id"] for r in recs) / n)
    assert curve["points"][-1]["accuracy"] == pytest.approx(sum(r["slow_prediction"] == r["label_id"] for r in recs) / n)


def test_budget_curve_without_slow_answers_stops_at_the_realised_rate():
    recs = [{"path": str(i), "label_id": 0, "path_taken": "fast", "fast_prediction": 0,
             "slow_prediction": 1 if i < 3 else None, "trigger": {"score": 1.0 - i / 10}} for i in range(10)]
    curve = budget_curve(recs, [0.0, 0.1, 0.3, 0.5])
    assert [p["budget"] for p in curve["points"]] == [0.0, 0.1, 0.3]
    assert [p["accuracy"] for p in curve["points"]] == pytest.approx([1.0, 0.9, 0.7])


def test_read_results_tolerates_torn_tail_and_missing_newline(tmp_path):
    f = tmp_path / "results.jsonl"
    f.write_text('{"path": "a"}\n{"path": "b"}\n{"pa')
    assert [r["path"] for r in read_results(f)] == ["a", "b"]
    assert f.read_text() == '{"path": "a"}\n{"path": "b"}\n'
    f.write_text('{"path": "a"}\n{"path": "b"}')
    assert [r["path"] for r in read_results(f)] == ["a", "b"]
    assert f.read_text().endswith("}\n")
