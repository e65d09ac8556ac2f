"""README's record table ("One record schema") lists exactly the fields of the records fgvr writes: a
`fgvr classify` line, a results.jsonl row, a `--out` shard row and the API's answer (its response model,
which test_serve_hardening checks against real answers). A field added to a record without a row in the
table, or a row left for a field that is gone, fails here, so the documentation cannot drift."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fgvr.pipeline import Candidate, Result
from fgvr.records import Prediction, ResultRow, stamped

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "**One record schema**"
COLUMNS = ("`classify` line", "`results.jsonl`", "`--out` shard", "API")
_FIELD = re.compile(r"^`([a-z_0-9]+(?:\[\]\.[a-z_0-9]+)?)`$")


def readme_table() -> dict[str, set[str]]:
    """The fields the README's record table marks for each record (column), `candidates[].x` for a
    candidate's field."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    assert header[0] == "field" and tuple(header[1:1 + len(COLUMNS)]) == COLUMNS, header
    marked: dict[str, set[str]] = {c: set() for c in COLUMNS}
    seen: list[str] = []
    for cells in body:
        m = _FIELD.match(cells[0])
        assert m, f"README's record table: {cells[0]!r} is not one `field` name"
        name = m.group(1)
        assert name not in seen, f"README's record table lists {name} twice"
        seen.append(name)
        marks = cells[1:1 + len(COLUMNS)]
        assert set(marks) <= {"✓", ""}, (name, marks)
        assert any(marks), f"README's record table: {name} is marked for no record"
        for col, mark in zip(COLUMNS, marks):
            if mark:
                marked[col].add(name)
    return marked


def _fields(record: dict[str, Any]) -> set[str]:
    """A record's keys, and its first candidate's as `candidates[].key`."""
    out = set(record)
    for c in record.get("candidates") or []:
        out |= {f"candidates[].{k}" for k in c}
    return out


def _result() -> Result:
    return Result(path="a.png", path_taken="fast", prediction=0, prediction_name="a", confidence=0.7,
                  candidates=[Candidate(0, "a", 0.7, None, 0.7), Candidate(1, "b", 0.3, None, 0.3)])


def written_fields(column: str) -> set[str]:
    """The fields of the record fgvr writes for `column`, built as the writer builds it."""
    r = _result()
    if column == "`classify` line":
        return _fields(stamped(r.to_dict()))  # cli.classify's line
    if column == "`results.jsonl`":
        return _fields(ResultRow.of(r, "a", 0).to_dict())  # evaluate's row
    if column == "`--out` shard":
        return _fields(Prediction.from_result(r).to_dict())  # collection's shard row
    models = pytest.importorskip("fgvr.serve.models", reason="the API's models need the serve extra")

    def names(model: Any) -> set[str]:
        return {f.alias or n for n, f in model.model_fields.items()}

    return names(models.ClassifyResult) | {f"candidates[].{n}" for n in names(models.Candidate)}


@pytest.mark.parametrize("column", COLUMNS)
def test_readme_record_table_lists_exactly_the_fields_written(column):
    documented, written = readme_table()[column], written_fields(column)
    assert not written - documented, (f"README's record table ({column} column) lacks "
                                      f"{sorted(written - documented)}: add a row or a mark")
    assert not documented - written, (f"README's record table ({column} column) marks "
                                      f"{sorted(documented - written)}, which that record does not have")
