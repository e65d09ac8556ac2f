"""fgvr evaluate: exact-match summary, unknown test classes reported, unreadable images recorded, the
resumable results file (torn line, restart without duplicates), the budget curve, the report files."""

from __future__ import annotations

import json

import pytest

from fgvr.data import read_dataset
from fgvr.records import RECORD_SCHEMA
from fgvr.evaluate import EvaluateError, budget_curve, read_results, run_evaluation
from fgvr.pipeline import DualSystem
from fgvr.trigger import Trigger
from fakes import ColourEncoder, PickLast, colour_kb, make_data
from fakes import colour_system as system

STABLE = ("n_images", "n_labelled_known", "n_errors", "accuracy", "accuracy_readable", "accuracy_system1_alone",
          "per_class", "confusion", "unknown_classes", "unknown_class_images", "unknown_class_predictions",
          "slow_rate", "paths", "slowed_images", "system2_calls", "tokens_in_per_image", "budget_curve")


@pytest.fixture()
def data(tmp_path):
    return read_dataset(make_data(tmp_path / "data"))


def test_summary_exact_match_unknown_class_and_errors(tmp_path, data, caplog):
    out = tmp_path / "run"
    s = run_evaluation(system(), data, out, {"kb": "colours", "encoder": "colour", "data": "d"}, batch_size=5,
                       progress=False)
    err = caplog.text
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
    # no System 2: both systems are one, on the same images (an unreadable one wrong for both, or left out)
    assert s["n_unreadable"] == 1
    assert s["accuracy_system1_alone"] == s["accuracy"] and s["accuracy_system1_alone_readable"] == s["accuracy_readable"]
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


def budget_system(budget, slow=None):
    enc = ColourEncoder()
    return DualSystem(colour_kb(enc), enc, slow, Trigger(budget=budget), k=3, weight=1.0), enc


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_budget_calibrated_on_the_run_is_met(tmp_path, data, budget):
    system, _ = budget_system(budget)
    s = run_evaluation(system, data, tmp_path / "b", {"kb": "c", "encoder": "e", "data": "d"}, batch_size=5,
                       progress=False, report=False)
    assert abs(s["slow_rate"] - budget) <= 1 / 24 + 1e-9  # 24 readable images
    assert s["trigger"]["calibrated_on"] == "run" and s["config"]["calibrated_on_images"] == 24
    assert (tmp_path / "b" / "embeddings").is_dir()


def test_run_calibrated_resume_reuses_embeddings_and_threshold(tmp_path, data):
    system, _ = budget_system(0.3, PickLast())
    full = run_evaluation(system, data, tmp_path / "a", {"kb": "c", "encoder": "e", "data": "d"}, batch_size=4,
                          progress=False, report=False)
    # killed during pass 2: run.json (with the threshold), all embeddings, 7 results and a torn line
    b = tmp_path / "b"
    import shutil

    shutil.copytree(tmp_path / "a" / "embeddings", b / "embeddings")
    shutil.copy(tmp_path / "a" / "run.json", b / "run.json")
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines(keepends=True)
    (b / "results.jsonl").write_text("".join(lines[:7]) + lines[7][:40])
    system_b, enc_b = budget_system(0.3, PickLast())
    calls_before = enc_b.calls
    resumed = run_evaluation(system_b, data, b, {"kb": "c", "encoder": "e", "data": "d"}, batch_size=4,
                             progress=False, report=False)
    assert enc_b.calls == calls_before  # nothing encoded again
    assert resumed["trigger"]["threshold"] == full["trigger"]["threshold"]
    for key in STABLE:
        assert resumed[key] == full[key], key
    # killed during pass 1: only the first embedding chunk on disk, no results yet
    c = tmp_path / "c"
    (c / "embeddings").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "embeddings" / "chunk-000000.safetensors", c / "embeddings")
    shutil.copy(tmp_path / "a" / "run.json", c / "run.json")
    stored = json.loads((c / "run.json").read_text())
    del stored["calibrated_threshold"]
    (c / "run.json").write_text(json.dumps(stored))
    system_c, enc_c = budget_system(0.3, PickLast())
    calls_before = enc_c.calls
    again = run_evaluation(system_c, data, c, {"kb": "c", "encoder": "e", "data": "d"}, batch_size=4,
                           progress=False, report=False)
    assert enc_c.calls - calls_before == 6  # 25 images, 4 per batch: chunk 0 reused, 6 batches encoded
    for key in STABLE:
        assert again[key] == full[key], key


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


# ------------------------------------------------------------------------------------------------------
# end to end with the real EfficientNet-Lite0 and the real CLI


def _stable(summary):
    return {k: summary[k] for k in STABLE}


def test_cli_classify_and_evaluate_end_to_end_with_lite0(lite0_setup, tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli

    root, full = lite0_setup
    assert "yellow half" in full.stderr and "not in the knowledge base" in full.stderr
    s = json.loads((root / "full" / "summary.json").read_text())
    assert s["n_images"] == 14 and s["n_errors"] == 1 and s["unknown_classes"] == ["yellow half"]
    assert s["accuracy_system1_alone"] > 0.5  # three easy patterns: Lite0 features separate them
    assert s["paths"].get("escalated-unavailable", {"n": 0})["n"] == round(s["slow_rate"] * 13)
    assert (root / "full" / "report.md").is_file() and (root / "full" / "confusion.png").is_file()
    r = CliRunner().invoke(cli, ["classify", str(root / "kb"), str(root / "test" / "red_disc" / "0.png"),
                                 str(root / "test" / "red_disc" / "broken.png"), "--threshold", "0.9"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines[0]["prediction_name"] == "red disc" and lines[0]["path_taken"] == "fast"
    assert lines[1]["path_taken"] == "error"
    assert [x["schema"] for x in lines] == [RECORD_SCHEMA] * 2  # every CLI line says its record version
    # another encoder's base is refused with a clear message (before any model is loaded)
    r = CliRunner().invoke(cli, ["evaluate", str(root / "kb"), str(root / "test"), "--out", str(tmp_path / "x"),
                                 "--encoder", "efficientnet-lite2"])
    assert r.exit_code != 0 and "not comparable" in r.output and "efficientnet-lite0" in r.output


def test_evaluate_resumes_after_kill_9(lite0_setup, tmp_path):
    """A real `fgvr evaluate` process is killed with SIGKILL mid-run, rerun, and ends with no duplicate and
    the same summary as the uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _ = lite0_setup
    run = tmp_path / "killed"
    exe = [sys.executable, "-c", "from fgvr.cli import main; main()", "evaluate", str(root / "kb"),
           str(root / "test"), "--slow-budget", "0.3", "--out", str(run)]
    proc = subprocess.Popen([*exe, "--batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = run / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = results.read_text().count("\n")
    assert 2 <= done_before < 14

    again = subprocess.run([*exe, "--batch-size", "8"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    recs = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(recs) == 14 and len({r["path"] for r in recs}) == 14
    a = json.loads((root / "full" / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    assert _stable(a) == _stable(b)
    assert b["run"]["images_this_process"] == 14 - done_before


def test_system1_and_dual_are_compared_on_the_same_images(tmp_path, data):
    s = run_evaluation(system(PickLast()), data, tmp_path / "r", {"kb": "c", "encoder": "e", "data": "d"},
                       batch_size=5, progress=False, report=False)
    known = [r for r in read_results(tmp_path / "r" / "results.jsonl") if r["label_id"] is not None]
    fast = [r["fast_prediction"] == r["label_id"] for r in known if r["path_taken"] != "error"]
    assert s["n_unreadable"] == 1 and len(fast) == 20
    assert s["accuracy_system1_alone"] == pytest.approx(sum(fast) / 21)  # the unreadable one is wrong, as in accuracy
    assert s["accuracy_system1_alone_readable"] == pytest.approx(sum(fast) / 20)
    gain = s["accuracy_readable"] - s["accuracy_system1_alone_readable"]
    assert gain == pytest.approx((s["accuracy"] - s["accuracy_system1_alone"]) * 21 / 20)


def test_limit_is_a_seeded_round_robin_over_classes():
    from collections import Counter
    from pathlib import Path

    from fgvr.data import Dataset, Sample
    from fgvr.evaluate import plan

    sizes = {"a": 40, "b": 25, "c": 30, "d": 5}
    ds = Dataset(root=Path("/x"), classes=sorted(sizes),
                 samples=[Sample(Path(f"/x/{c}/{i}.png"), c) for c, n in sizes.items() for i in range(n)])
    for limit in (8, 10, 37):
        items, _ = plan(ds, ds.classes, limit, seed=3)
        counts = Counter(label for _, label, _ in items)
        assert len(items) == limit
        full = [c for c in sizes if sizes[c] > max(counts.values()) - 1]  # classes not yet run out
        assert max(counts[c] for c in full) - min(counts[c] for c in full) <= 1, counts
    items, _ = plan(ds, ds.classes, 37, seed=3)
    assert items == plan(ds, ds.classes, 37, seed=3)[0]  # the same images on every restart
    assert items[:10] == plan(ds, ds.classes, 10, seed=3)[0]  # a smaller limit is a prefix
    assert items != plan(ds, ds.classes, 37, seed=4)[0]


def test_a_hand_edited_result_is_refused_or_redone_not_trusted(tmp_path, data):
    out = tmp_path / "r"
    cfg = {"kb": "c", "encoder": "e", "data": "d"}
    ref = run_evaluation(system(), data, out, cfg, batch_size=5, progress=False, report=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    i = next(j for j, r in enumerate(recs) if r["label_id"] is not None and not r["correct"] and r["path_taken"] != "error")
    forged = dict(recs[i], correct=True)  # an image turned "right" by hand
    (out / "results.jsonl").write_text("\n".join(lines[:i] + [json.dumps(forged)] + lines[i + 1:]) + "\n")
    with pytest.raises(EvaluateError, match="edited") as e:
        run_evaluation(system(), data, out, cfg, batch_size=5, progress=False, report=False)
    assert "\n" not in str(e.value)
    bad_type = dict(recs[i], label_id="red")  # not a record of this fgvr: skipped, its image redone
    (out / "results.jsonl").write_text("\n".join(lines[:i] + [json.dumps(bad_type)] + lines[i + 1:]) + "\n")
    again = run_evaluation(system(), data, out, cfg, batch_size=5, progress=False, report=False)
    assert again["accuracy"] == ref["accuracy"] and again["n_images"] == ref["n_images"]
