"""Property-based pass over every reader of user input: whatever bytes arrive in a manifest, an image list,
imagefolder metadata, a classes file, FiftyOne labels, the experience rules or a run folder, the reader
either reads them or refuses them with one line of an fgvr error family, never a traceback; and a refused
run leaves nothing a later run would trust.

Bounded for CI: derandomized, few examples per property, no deadline (the machine is shared).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fgvr.errors import FgvrError

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ENCODINGS = ("utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252")
NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
CELLS = st.one_of(NAMES, st.sampled_from(["a.png", "b.png", "../a.png", "/etc/passwd", "", " ", "path", "label",
                                          'x"y', "a,b", "é.png", "\x00", "\r\n"]))


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (200, 20, 20)).save(path)
    return path


def _fresh(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _img(root / "a.png")
    _img(root / "b.png")
    return root


def _read_or_one_line(fn, *args):
    """Call a reader: it returns, or raises an fgvr error whose message is one line; anything else fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args)
        except FgvrError as e:
            msg = str(e)
            assert msg and "\n" not in msg.strip(), msg
            return e


@st.composite
def csv_bytes(draw, header=("path", "label")):
    """A CSV as a spreadsheet might write it: header or not, extra/missing columns, any delimiter and
    quoting, any of several encodings, with or without a BOM, any line ending."""
    cols = draw(st.one_of(st.just(list(header)), st.lists(st.sampled_from(["path", "label", "Path", " label ", "x", ""]),
                                                           max_size=4)))
    rows = draw(st.lists(st.lists(CELLS, max_size=4), max_size=6))
    delim = draw(st.sampled_from([",", ";", "\t", "|"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    if draw(st.booleans()):
        w.writerow(cols)
    for r in rows:
        w.writerow(r)
    text = buf.getvalue()
    enc = draw(st.sampled_from(ENCODINGS))
    try:
        data = text.encode(enc)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    if draw(st.booleans()):
        data = draw(st.binary(max_size=8)) + data  # stray bytes in front (a BOM of another kind, garbage)
    return data


@SETTINGS
@given(data=csv_bytes())
def test_a_csv_manifest_is_read_or_refused_in_one_line(tmp_path, data):
    from fgvr.data import read_dataset

    root = _fresh(tmp_path / "m")
    (root / "list.csv").write_bytes(data)
    out = _read_or_one_line(read_dataset, root / "list.csv")
    if not isinstance(out, Exception):
        assert out.classes == sorted({s.label for s in out.samples}) and out.samples


@SETTINGS
@given(data=csv_bytes(header=("path",)), jsonl=st.booleans(),
       lines=st.lists(st.one_of(st.text(max_size=20), st.sampled_from(['{"path": "a.png"}', '"b.png"', "[1]", "null",
                                                                      '{"path": 3}', "{", "\ufeff\"a.png\""])),
                      max_size=5))
def test_an_image_list_is_read_or_refused_in_one_line(tmp_path, data, jsonl, lines):
    from fgvr.collection import list_source

    root = _fresh(tmp_path / "l")
    f = root / ("list.jsonl" if jsonl else "list.csv")
    f.write_bytes("\n".join(lines).encode("utf-8") if jsonl else data)
    out = _read_or_one_line(list_source, f)
    if not isinstance(out, Exception):
        assert all(isinstance(p, str) for p in out)


@SETTINGS
@given(data=csv_bytes(header=("file_name", "label")), jsonl=st.booleans(),
       rows=st.lists(st.dictionaries(st.sampled_from(["file_name", "label", "class", "caption"]),
                                     st.one_of(CELLS, st.integers(), st.none(), st.lists(st.integers(), max_size=2))),
                     max_size=4))
def test_imagefolder_metadata_is_read_or_refused_in_one_line(tmp_path, data, jsonl, rows):
    from fgvr.data import read_dataset

    root = _fresh(tmp_path / "i")
    if jsonl:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        (root / "metadata.csv").write_bytes(data)
    _read_or_one_line(read_dataset, root)


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), NAMES),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(NAMES, inner, max_size=3)),
                    max_leaves=8)


@SETTINGS
@given(obj=JSON, raw=st.one_of(st.none(), st.binary(max_size=20)), kind=st.sampled_from(["json", "txt"]))
def test_a_classes_file_is_read_or_refused_in_one_line(tmp_path, obj, raw, kind):
    from fgvr.data import read_dataset

    root = _fresh(tmp_path / "c")
    (root / "data" / "a").mkdir(parents=True)
    _img(root / "data" / "a" / "0.png")
    f = root / f"classes.{kind}"
    f.write_bytes(raw if raw is not None else json.dumps(obj).encode())
    _read_or_one_line(read_dataset, root / "data", f)


@SETTINGS
@given(classes=st.one_of(st.none(), st.lists(NAMES, max_size=3), JSON),
       labels=st.one_of(JSON, st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                              st.one_of(st.integers(-1, 4), NAMES, st.none(), JSON), max_size=3)))
def test_fiftyone_labels_are_read_or_refused_in_one_line(tmp_path, classes, labels):
    from fgvr.data import read_dataset

    root = _fresh(tmp_path / "f")
    (root / "data").mkdir()
    _img(root / "data" / "a.png")
    (root / "labels.json").write_text(json.dumps({"classes": classes, "labels": labels}))
    _read_or_one_line(read_dataset, root)


@SETTINGS
@given(obj=st.one_of(JSON, st.fixed_dictionaries({"format_version": st.sampled_from([1, 2, "1"]),
                                                  "rules": st.lists(JSON, max_size=3)}),
                     st.fixed_dictionaries({"format_version": st.just(1), "rules": st.lists(st.fixed_dictionaries(
                         {"classes": st.one_of(st.lists(NAMES, max_size=3), JSON), "text": st.one_of(NAMES, JSON),
                          "cue": st.one_of(NAMES, JSON)}), max_size=2),
                         "build": st.one_of(JSON, st.fixed_dictionaries({"images": JSON}))})),
       raw=st.one_of(st.none(), st.binary(max_size=16)))
def test_experience_rules_are_read_or_refused_in_one_line(tmp_path, obj, raw):
    from fgvr.rules import EXPERIENCE_DIR, RULES_FILE, ExperienceLibrary

    kb = tmp_path / "kb"
    shutil.rmtree(kb, ignore_errors=True)
    (kb / EXPERIENCE_DIR).mkdir(parents=True)
    (kb / EXPERIENCE_DIR / RULES_FILE).write_bytes(raw if raw is not None else json.dumps(obj).encode())
    out = _read_or_one_line(ExperienceLibrary.load, kb, ["a", "b"])
    if not isinstance(out, Exception):
        out.retrieve([0, 1], 3) if hasattr(out, "retrieve") else None


RECORD = st.fixed_dictionaries({"path": st.one_of(NAMES, st.integers(), st.none())}, optional={
    "label": st.one_of(NAMES, st.none(), st.integers()), "label_id": st.one_of(st.integers(-2, 8), st.none(), NAMES),
    "prediction": st.one_of(st.integers(-2, 8), st.none(), NAMES), "fast_prediction": st.one_of(st.integers(-2, 8), st.none()),
    "correct": st.one_of(st.booleans(), st.none(), st.integers()), "path_taken": st.one_of(st.sampled_from(
        ["fast", "slow", "error", "escalated-unavailable"]), NAMES, st.none()), "trigger": JSON, "candidates": JSON,
    "timings": JSON, "confidence": st.one_of(st.floats(), st.none(), NAMES)})


@SETTINGS
@example(lines=[json.dumps({"path": "/nowhere.png", "label": "red", "label_id": 0, "prediction": 0, "fast_prediction": 0,
                            "correct": True, "path_taken": "fast"}), '{"path": "x", "label_id": "red"}'],
         run_json=None, summary='{"accuracy": 1.0}')
@given(lines=st.lists(st.one_of(RECORD.map(json.dumps), st.text(max_size=10), JSON.map(json.dumps)), max_size=4),
       run_json=st.one_of(st.none(), JSON.map(json.dumps), st.binary(max_size=10).map(lambda b: b.decode("latin-1"))),
       summary=st.one_of(st.none(), JSON.map(json.dumps)))
def test_a_run_folder_is_resumed_or_refused_in_one_line(tmp_path, lines, run_json, summary):
    """Whatever a run folder holds (results.jsonl, run.json, summary.json, written by hand or by another
    program), `fgvr evaluate` resumes it or refuses it in one line; and after a refusal a run on a fresh
    folder gives the same summary as if the bad folder had never existed."""
    from fakes import colour_system, make_data

    from fgvr.data import read_dataset
    from fgvr.evaluate import run_evaluation

    data_dir = tmp_path / "data"
    if not data_dir.exists():
        make_data(data_dir, per_class=1)
    data = read_dataset(data_dir)
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "results.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if run_json is not None:
        (run / "run.json").write_text(run_json, encoding="utf-8")
    if summary is not None:
        (run / "summary.json").write_text(summary, encoding="utf-8")
    cfg = {"kb": "c", "encoder": "e", "data": "d"}
    out = _read_or_one_line(lambda: run_evaluation(colour_system(), data, run, cfg, progress=False, report=False))
    if isinstance(out, Exception):
        assert not (run / "summary.json").is_file() or summary is not None  # a refused run writes no summary
        return
    ref_dir = tmp_path / "ref"
    if not ref_dir.exists():
        run_evaluation(colour_system(), data, ref_dir, cfg, progress=False, report=False)
    ref = json.loads((ref_dir / "summary.json").read_text())
    for key in ("n_images", "accuracy", "accuracy_system1_alone", "n_unreadable", "per_class"):
        assert out[key] == ref[key], key  # a resumed run trusted nothing it should not have
