"""One record version (`fgvr.records.RECORD_SCHEMA`) on every record fgvr writes: `fgvr classify` lines
(test_evaluate), `--out` shards in JSONL and Parquet, results.jsonl rows, the API (test_serve). Readers
take rows without it (an older fgvr) and refuse, in one line naming the file, a newer major."""

from __future__ import annotations

import json
import pickle

import pytest

from fakes import colour_system as system
from fakes import make_data
from fgvr.collection import classify_collection, read_predictions, shard_files
from fgvr.data import read_dataset
from fgvr.evaluate import run_evaluation
from fgvr.records import (RECORD_SCHEMA, RecordSchemaError, check_schema, read_results, read_rows,
                          schema_major)


def test_the_version_is_parsed_and_a_newer_major_is_refused_naming_the_file():
    assert schema_major(RECORD_SCHEMA) == 2 and schema_major("fgvr.result/2.7") == 2
    assert schema_major("other.thing/2") is None and schema_major(3) is None
    assert check_schema({"path": "a"}, "x.jsonl") == {"path": "a"}  # an older fgvr's row
    assert check_schema({"schema": None, "path": "a"}, "x") == {"schema": None, "path": "a"}  # null column
    for ok in (RECORD_SCHEMA, "fgvr.result/1", "fgvr.result/2.1"):
        check_schema({"schema": ok}, "x.jsonl")
    for bad in ("fgvr.result/3", "fgvr.result/10.0", "something/else"):
        with pytest.raises(RecordSchemaError) as e:
            check_schema({"schema": bad}, "runs/a/results.jsonl")
        msg = str(e.value)
        assert "\n" not in msg and "runs/a/results.jsonl" in msg and bad in msg and RECORD_SCHEMA in msg
        assert (e.value.source, e.value.schema, e.value.known) == ("runs/a/results.jsonl", bad, RECORD_SCHEMA)
        again = pickle.loads(pickle.dumps(e.value))  # crosses a process boundary whole (a pool, Ray)
        assert type(again) is RecordSchemaError and str(again) == msg and again.schema == bad


def test_results_rows_carry_the_schema_old_rows_are_read_newer_ones_refused(tmp_path):
    out = tmp_path / "run"
    run_evaluation(system(), read_dataset(make_data(tmp_path / "data", per_class=2)), out,
                   {"kb": "colours", "encoder": "colour", "data": "d"}, batch_size=4, progress=False)
    f = out / "results.jsonl"
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert lines and all(d["schema"] == RECORD_SCHEMA for d in lines)
    # an older fgvr's rows (no schema) read the same
    f.write_text("".join(json.dumps({k: v for k, v in d.items() if k != "schema"}) + "\n" for d in lines))
    assert [r.path for r in read_rows(f)] == [d["path"] for d in lines]
    # a newer major is refused, not skipped (a resume would otherwise redo it, a reader drop it silently)
    newer = dict(lines[0], schema="fgvr.result/3")
    f.write_text("".join(json.dumps(d) + "\n" for d in [newer] + lines[1:]))
    with pytest.raises(RecordSchemaError, match="results.jsonl.*fgvr.result/3"):
        read_results(f)
    with pytest.raises(RecordSchemaError):  # and so is a resume into that folder
        run_evaluation(system(), read_dataset(tmp_path / "data"), out,
                       {"kb": "colours", "encoder": "colour", "data": "d"}, batch_size=4, progress=False)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_carry_the_schema_and_a_newer_shard_is_refused(tmp_path, fmt):
    if fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
    photos = make_data(tmp_path / "photos", per_class=1)
    out = tmp_path / "pred"
    classify_collection(system(), photos, out, {"kb": "colours"}, fmt=fmt, shard_size=4, progress=False)
    recs = read_predictions(out)
    assert recs and all(r["schema"] == RECORD_SCHEMA for r in recs)
    first = shard_files(out)[0]
    if fmt == "parquet":
        import pandas as pd

        assert set(pd.read_parquet(out)["schema"]) == {RECORD_SCHEMA}  # the folder as one table
        assert pq.read_schema(first).metadata[b"fgvr.schema"] == RECORD_SCHEMA.encode()
        older = pq.read_table(first).drop_columns(["schema"])  # a shard of an older fgvr
        pq.write_table(older, first)
        assert len(read_predictions(out)) == len(recs)
        newer = pq.read_table(first).to_pylist()
        newer[0]["schema"] = "fgvr.result/3"
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(newer), first)
    else:
        rows = [json.loads(x) for x in first.read_text().splitlines()]
        first.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "schema"}) + "\n" for r in rows))
        assert len(read_predictions(out)) == len(recs)
        rows[0]["schema"] = "fgvr.result/3"
        first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordSchemaError, match=first.name):
        read_predictions(out)
