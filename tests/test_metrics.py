"""The field's metrics (against sklearn on the same predictions), the CSV tables, `fgvr compare`'s paired
statistics (against scipy's binomial test and a hand-made case), and the Hugging Face imagefolder input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvr.compare import CompareError, compare_runs
from fgvr.data import DataError, read_dataset
from fgvr.evaluate import run_evaluation
from fgvr.metrics import classification_metrics, expected_calibration_error
from fgvr.pipeline import DualSystem
from fgvr.stats import mcnemar_exact, paired_bootstrap
from fgvr.trigger import Trigger
from fakes import COLOURS, ColourEncoder, colour_kb


def make_data(root: Path) -> Path:
    """4 shades of each colour class, a class the base does not know, and one unreadable file."""
    shades = [(0, 0, 0), (40, 40, 40), (-40, 20, 0), (90, 90, 90)]
    for name, rgb in list(COLOURS.items()) + [("yellow", (230, 220, 30))]:
        (root / name).mkdir(parents=True)
        for i, sh in enumerate(shades):
            Image.new("RGB", (12, 12), tuple(max(0, min(255, a + b)) for a, b in zip(rgb, sh))).save(root / name / f"{i}.png")
    (root / "red" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def system() -> DualSystem:
    enc = ColourEncoder()
    return DualSystem(colour_kb(enc), enc, None, Trigger(threshold=0.35), k=3, weight=1.0)


def _record(label: int, ranked: list[int], conf: float, path: str = "x") -> dict:
    cands = [{"id": c, "final": (conf if i == 0 else (1 - conf) / max(1, len(ranked) - 1))}
             for i, c in enumerate(ranked)]
    return {"path": path, "label_id": label, "prediction": ranked[0], "confidence": conf, "candidates": cands,
            "correct": ranked[0] == label}


def test_metrics_match_sklearn_on_an_unbalanced_set():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(7)]
    records, truth, pred = [], [], []
    for i in range(300):
        t = int(rng.choice(7, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]))
        ranked = [int(x) for x in rng.permutation(7)]
        if rng.random() < 0.6:  # right 60% of the time, the truth otherwise somewhere in the ranking
            ranked.remove(t)
            ranked.insert(0, t)
        records.append(_record(t, ranked, float(rng.uniform(0.2, 1.0)), f"p{i}"))
        truth.append(t)
        pred.append(ranked[0])
    m = classification_metrics(records, classes)
    assert m["acc1"] == pytest.approx(np.mean(np.array(truth) == np.array(pred)))
    assert m["balanced_accuracy"] == m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert m["acc5"] == m["top5_accuracy"] == pytest.approx(
        np.mean([t in r["candidates"] and False or t in [c["id"] for c in r["candidates"][:5]]
                 for t, r in zip(truth, records)]))
    assert m["acc5"] > m["acc1"]
    # a class the system never gets right weighs as much as a common one in balanced accuracy
    always_first = [_record(t, [0] + [c for c in range(7) if c != 0], 0.9) for t in truth]
    m0 = classification_metrics(always_first, classes)
    assert m0["acc1"] == pytest.approx(truth.count(0) / 300) and m0["balanced_accuracy"] == pytest.approx(1 / 7)


def test_calibration_error_and_top5_needs_five_candidates():
    # perfectly calibrated: confidence 0.8 and 80% right -> ECE 0; always 0.9 but 50% right -> 0.4
    assert expected_calibration_error([0.8] * 10, [True] * 8 + [False] * 2) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    assert expected_calibration_error([], []) is None
    three = [_record(0, [1, 2, 0], 0.5), _record(1, [1, 0, 2], 0.7)]
    m = classification_metrics(three, ["a", "b", "c"])
    assert m["acc5"] is None and m["top5_accuracy"] is None  # 3 candidates: not a top-5 accuracy
    assert m["ece"] == pytest.approx(0.5 * abs(0 - 0.5) + 0.5 * abs(1 - 0.7))


def test_summary_and_report_carry_the_metrics_and_csv_tables(tmp_path):
    out = tmp_path / "run"
    s = run_evaluation(system(), read_dataset(make_data(tmp_path / "data")), out,
                       {"kb": "colours", "encoder": "colour", "data": "d"}, batch_size=5, progress=False)
    for key in ("acc1", "acc5", "mean_per_class_recall", "top5_accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert key in s, key
    assert s["acc1"] == pytest.approx(s["accuracy"])
    assert s["acc5"] is None  # k=3 candidates in this system
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in rows] == sorted(s["per_class"])
    assert sum(int(r["n"]) for r in rows) == 21  # known classes, the unreadable image included (counted wrong)
    assert float(rows[0]["recall"]) == pytest.approx(s["per_class"][rows[0]["class"]]["accuracy"])
    conf = list(csv.reader((out / "confusion.csv").open()))
    assert conf[0][1:] == s["confusion"]["classes"]
    assert [[int(x) for x in r[1:]] for r in conf[1:]] == s["confusion"]["matrix"]
    report = (out / "report.md").read_text()
    assert "balanced accuracy" in report and "macro-F1" in report and "ECE" in report


def test_mcnemar_and_bootstrap():
    from scipy.stats import binomtest

    a = [True] * 30 + [False] * 10 + [True] * 5 + [False] * 55
    b = [True] * 30 + [False] * 10 + [False] * 5 + [True] * 15 + [False] * 40
    t = mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"]) == (5, 15)
    assert t["p_value"] == pytest.approx(binomtest(5, 20, 0.5).pvalue)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    d = paired_bootstrap(np.array(b, float), np.array(a, float), seed=1)
    assert d["mean"] == pytest.approx(0.10) and d["low"] < 0.10 < d["high"] and d["low"] > 0
    same = paired_bootstrap(np.array(a, float), np.array(a, float))
    assert same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def _write_run(run: Path, rows: list[tuple[str, str, bool]]) -> Path:
    run.mkdir(parents=True)
    with (run / "results.jsonl").open("w") as f:
        for p, label, ok in rows:
            f.write(json.dumps({"path": p, "label": label, "label_id": 0, "correct": ok}) + "\n")
    return run


def test_compare_runs_paired_and_refuses_different_images(tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli

    paths = [f"/img/{i}.png" for i in range(40)]
    a = _write_run(tmp_path / "a", [(p, "x", i < 20) for i, p in enumerate(paths)])
    b = _write_run(tmp_path / "b", [(p, "x", i < 20 or i >= 32) for i, p in enumerate(paths)])
    c = compare_runs(a, b)
    assert (c.n, c.accuracy_a, c.accuracy_b, c.a_only, c.b_only) == (40, 0.5, 0.7, 0, 8)
    assert c.difference == pytest.approx(0.2) and 0 < c.ci_low < 0.2 < c.ci_high
    assert c.mcnemar_p == pytest.approx(2 / 2 ** 8)
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["b_only"] == 8

    other = _write_run(tmp_path / "other", [(p, "x", True) for p in paths[:39] + ["/img/new.png"]])
    with pytest.raises(CompareError, match="different images"):
        compare_runs(a, other)
    res = CliRunner().invoke(cli, ["compare", str(a), str(other)])
    assert res.exit_code == 6 and "same images" in res.output  # one line, the run-mismatch code
    relabelled = _write_run(tmp_path / "relabelled", [(p, "y", True) for p in paths])
    with pytest.raises(CompareError, match="label"):
        compare_runs(a, relabelled)


def test_huggingface_imagefolder_splits(tmp_path):
    root = tmp_path / "hf"
    for split, fmt in (("train", "csv"), ("test", "jsonl")):
        d = root / split
        (d / "imgs").mkdir(parents=True)
        rows = []
        for i, label in enumerate(["cat", "dog", "cat", "bird"]):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / "imgs" / f"{i}.png")
            rows.append({"file_name": f"imgs/{i}.png", "label": label})
        if fmt == "csv":
            (d / "metadata.csv").write_text("file_name,label\n" + "".join(f"{r['file_name']},{r['label']}\n" for r in rows))
        else:
            (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split in ("train", "test"):
        ds = read_dataset(root / split)
        assert ds.classes == ["bird", "cat", "dog"] and len(ds.samples) == 4
        assert all(s.path.is_file() for s in ds.samples) and ds.samples[3].label == "bird"
    with pytest.raises(DataError, match="pass one split"):
        read_dataset(root)
    (root / "test" / "metadata.jsonl").write_text('{"file_name": "imgs/0.png", "species": "cat", "size": 3}\n')
    with pytest.raises(DataError, match="no label column"):
        read_dataset(root / "test")
    # one other column is not taken for the class either: it may be a caption (each caption a "class")
    (root / "test" / "metadata.jsonl").write_text('{"file_name": "imgs/0.png", "text": "a red coat on a chair"}\n')
    with pytest.raises(DataError, match="no label column"):
        read_dataset(root / "test")
    (root / "test" / "metadata.jsonl").write_text('{"file_name": "imgs/0.png", "class": "cat"}\n')
    assert read_dataset(root / "test").samples[0].label == "cat"  # a label column by another known name
    # read as a CSV manifest is: a repeat is read once (warned), one image under two labels is an error
    rows = [("imgs/0.png", "cat"), ("imgs/1.png", "dog"), ("imgs/0.png", "cat")]
    (root / "test" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "label": y}) + "\n"
                                                          for f, y in rows))
    with pytest.warns(UserWarning, match="1 repeated row"):
        assert len(read_dataset(root / "test").samples) == 2
    (root / "test" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "label": y}) + "\n"
                                                          for f, y in rows[:2] + [("imgs/0.png", "dog")]))
    with pytest.raises(DataError, match="labelled 'cat' on line 1 and 'dog' on line 3"):
        read_dataset(root / "test")


def test_metrics_read_typed_rows_as_they_read_the_records():
    from fgvr.pipeline import Candidate, Result
    from fgvr.records import ResultRow

    rng = np.random.default_rng(1)
    rows, dicts = [], []
    for i in range(60):
        t, ranked = int(rng.integers(4)), [int(x) for x in rng.permutation(4)]
        p = rng.dirichlet(np.ones(4))
        fast = sorted((float(x) for x in p), reverse=True)
        final = [None if i % 3 == 0 else float(x) for x in rng.dirichlet(np.ones(4))]
        cands = [Candidate(c, f"c{c}", f, None, fi) for c, f, fi in zip(ranked, fast, final)]
        best = max(cands, key=lambda c: c.final if c.final is not None else c.fast)
        res = Result(path=f"p{i}", path_taken="fast", prediction=best.id, prediction_name=best.name,
                     confidence=best.final if best.final is not None else best.fast, candidates=cands)
        row = ResultRow.of(res, f"c{t}", None if i % 7 == 0 else t)  # a few of a class the base lacks
        rows.append(row)
        dicts.append(row.to_dict())
    classes = [f"c{i}" for i in range(4)]
    assert classification_metrics(rows, classes) == classification_metrics(dicts, classes)
    assert classification_metrics(rows, classes)["acc1"] == pytest.approx(
        np.mean([r.prediction == r.label_id for r in rows if r.label_id is not None]))
