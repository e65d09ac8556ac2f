"""The records that cross modules, typed: a result row of `fgvr evaluate` (results.jsonl, read by compare,
bench, serve's run browser and the summary) and a prediction row of `fgvr classify --out` (the shards).

Each is a dataclass with `to_dict` / `from_dict`; the JSON keys on disk are the dataclass fields, so a
reader names a field (`row.label_id`) instead of guessing with `r.get("label_id")`. `from_dict` takes what
an older or newer fgvr wrote: a missing field gets its default, an unknown one is ignored.

Every record fgvr writes (a `fgvr classify` line, a `--out` shard row in JSONL or Parquet, a results.jsonl
row, an API answer) carries `schema`: `RECORD_SCHEMA`, the one version of the record. A change of meaning
gets a new major (`fgvr.result/3`); a field added without changing the others' meaning may get a minor
(`fgvr.result/2.1`), which this fgvr reads. A row without `schema` is from an older fgvr and is read as it
stands; a row of a newer major is refused in one line naming its file (`check_schema`), never half-read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from fgvr.errors import InputError
from fgvr.pipeline import Candidate, Result
from fgvr.run_dir import Journal

RESULTS = "results.jsonl"

# The version of every record fgvr writes (CLI lines, shards, results.jsonl, the API). Its fields are the
# CLI's: `prediction` is the class id, `prediction_name` its name, candidates carry `id` and `name`.
RECORD_SCHEMA = "fgvr.result/2"
_SCHEMA_NAME, _, _SCHEMA_VERSION = RECORD_SCHEMA.partition("/")
SCHEMA_MAJOR = int(_SCHEMA_VERSION.split(".")[0])


class RecordSchemaError(InputError):
    """A record written by a newer fgvr (or by another program) whose schema this fgvr does not know:
    `source` (the file), `schema` (the record's) and `known` (this fgvr's), for a caller that words the
    refusal for its own audience (the run browser names the run, not the server's path)."""

    def __init__(self, source: str | Path, schema: Any) -> None:
        self.source, self.schema, self.known = str(source), schema, RECORD_SCHEMA
        super().__init__(f"{source}: a record of schema {schema!r}, newer than this fgvr reads "
                         f"({RECORD_SCHEMA}); upgrade fgvr to read it (pip install -U fgvr)")

    def __reduce__(self) -> tuple[type, tuple[str, Any]]:  # pickled whole (a process pool, Ray)
        return (type(self), (self.source, self.schema))


def stamped(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with `schema` first: the form every record is written in."""
    return {"schema": RECORD_SCHEMA, **{k: v for k, v in d.items() if k != "schema"}}


def schema_major(schema: Any) -> int | None:
    """The major version of a record's `schema` ("fgvr.result/2.1" -> 2), None for one that is not fgvr's."""
    if not isinstance(schema, str):
        return None
    name, _, version = schema.partition("/")
    head = version.split(".")[0]
    return int(head) if name == _SCHEMA_NAME and head.isdigit() else None


def check_schema(d: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """`d` itself when this fgvr can read it: no `schema` (an older fgvr), or a major it knows. A newer or
    foreign schema is refused in one line naming `source` (reading it anyway could misread a field)."""
    if d.get("schema") is None:  # absent, or null in a table that joins old shards with new ones
        return d
    major = schema_major(d["schema"])
    if major is None or major > SCHEMA_MAJOR:
        raise RecordSchemaError(source, d["schema"])
    return d


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def result_from_dict(d: dict[str, Any]) -> Result:
    """The inverse of `Result.to_dict` (records cross process boundaries as JSON)."""
    return Result(**{**_known(Result, d), "candidates": [Candidate(**c) for c in d.get("candidates") or []]})


@dataclass
class ResultRow(Result):
    """One line of results.jsonl: an image's `Result` and its label (`label_id` None for a class the base
    does not know; `correct` None then too)."""

    label: str | None = None
    label_id: int | None = None
    correct: bool | None = None

    @classmethod
    def of(cls, result: Result, label: str | None, label_id: int | None) -> "ResultRow":
        d = {f.name: getattr(result, f.name) for f in fields(Result)}
        return cls(**d, label=label, label_id=label_id,
                   correct=None if label_id is None else result.prediction == label_id)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResultRow":
        return cls(**{"path_taken": "", **_known(cls, d),
                      "candidates": [Candidate(**c) for c in d.get("candidates") or []]})

    def to_dict(self) -> dict[str, Any]:
        return stamped(asdict(self))

    @property
    def known(self) -> bool:
        """Labelled with a class of the base (the only images accuracy can count)."""
        return self.label_id is not None

    @property
    def score(self) -> float | None:
        """The trigger's doubt score, where the trigger ran."""
        return (self.trigger or {}).get("score")


def as_rows(records: Iterable[ResultRow | dict[str, Any]]) -> list[ResultRow]:
    """Rows from rows or from their JSON dicts."""
    return [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in records]


def iter_as_rows(records: Iterable[ResultRow | dict[str, Any]]) -> Iterator[ResultRow]:
    """`as_rows` one at a time (a reader over a 50,000-row file holds one row)."""
    for r in records:
        yield r if isinstance(r, ResultRow) else ResultRow.from_dict(r)


def _int_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def valid_result(d: dict[str, Any]) -> bool:
    """A results.jsonl line this fgvr can use as it stands: the fields the summary reads have their types
    (a line edited by hand or written by another program is skipped, and its image redone, not trusted)."""
    if not isinstance(d.get("path"), str) or not d["path"]:
        return False
    if not all(_int_or_none(d.get(k)) for k in ("label_id", "prediction", "fast_prediction", "slow_prediction")):
        return False
    if not all(_num_or_none(d.get(k)) for k in ("confidence",)) or d.get("correct") not in (None, True, False):
        return False
    if not isinstance(d.get("path_taken", ""), str) or not isinstance(d.get("label"), (str, type(None))):
        return False
    if not all(isinstance(d.get(k), (dict, type(None))) for k in ("trigger", "timings")):
        return False
    if not all(isinstance(d.get(k, 0), int) for k in ("slow_tokens_in", "slow_tokens_out")):
        return False
    cands = d.get("candidates") or []
    if not isinstance(cands, list) or not all(isinstance(c, dict) and _int_or_none(c.get("id")) for c in cands):
        return False
    try:
        ResultRow.from_dict(d)
    except (TypeError, ValueError):
        return False
    return True


def results_journal(path: Path) -> Journal:
    """results.jsonl as a journal keyed by image path (a row of a newer schema stops the read: a resume
    must not redo, nor a reader drop, what a newer fgvr wrote)."""
    return Journal(path, key=lambda r: r["path"], valid=lambda d: valid_result(check_schema(d, path)))


def read_results(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """The JSON records of a results file, first record per path kept (see `fgvr.run_dir.Journal`: a torn
    last line is cut when `repair`; a bad line in the middle is skipped, so its image is redone)."""
    return results_journal(Path(path)).read(repair)


def iter_rows(path: Path, repair: bool = True) -> Iterator[ResultRow]:
    """`read_rows` one row at a time (a summary or a bench cell over 50,000 results holds one row)."""
    for d in results_journal(Path(path)).records(repair):
        yield ResultRow.from_dict(d)


def read_rows(path: Path, repair: bool = True) -> list[ResultRow]:
    """`read_results` as typed rows."""
    return [ResultRow.from_dict(d) for d in read_results(path, repair)]


@dataclass
class Prediction:
    """What a collection run keeps per image: the answer, the top-k with scores, how it was reached."""

    path: str
    path_taken: str  # fast, slow, escalated-unavailable, escalated-failed, error
    prediction: int | None = None
    prediction_name: str | None = None
    confidence: float | None = None
    # top-k of System 1, each {id, name, score (the final one), fast, slow (None when System 2 did not run)}
    candidates: list[dict[str, Any]] = field(default_factory=list)
    trigger_score: float | None = None
    error: str | None = None
    unknown: bool = False  # open set: not a class of the base (prediction None, candidates still listed)
    unknown_score: float | None = None

    @classmethod
    def from_result(cls, r: Result) -> "Prediction":
        cands = [{"id": c.id, "name": c.name, "score": c.final if c.final is not None else c.fast,
                  "fast": c.fast, "slow": c.slow} for c in r.candidates]
        score = (r.trigger or {}).get("score")
        return cls(r.path, r.path_taken, r.prediction, r.prediction_name, r.confidence, cands,
                   None if score is None else float(score), r.error, r.unknown, r.unknown_score)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Prediction":
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return stamped(asdict(self))

