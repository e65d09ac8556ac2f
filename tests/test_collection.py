"""`fgvr classify KB SOURCE --out PRED` in one process: listing a collection (folder, CSV, JSONL, glob),
one record per image in whole shards, resume without duplicates, Parquet, and the clear errors (bad
source, --ray without Ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from fgvr.cli import cli
from fgvr.collection import LocalEngine, ShardWriter, classify_collection, list_source, read_predictions, shard_files
from fgvr.data import DataError
from fgvr.errors import RunMismatchError
from fakes import colour_system as system
from fakes import make_data


@pytest.fixture()
def photos(tmp_path) -> Path:
    return make_data(tmp_path / "photos", per_class=3)


def test_list_source_folder_csv_jsonl_and_glob_agree(photos, tmp_path, caplog):
    from_folder = list_source(photos)
    assert len(from_folder) == 19 and all(Path(p).is_absolute() for p in from_folder)  # 6 classes x 3 + broken
    (photos / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(photos / ".hidden" / "x.png")
    (photos / "notes.txt").write_text("not an image")
    assert list_source(photos) == from_folder  # hidden folders and non-images left out

    rel = [str(Path(p).relative_to(photos)) for p in from_folder]
    (photos / "list.csv").write_text("path,extra\n" + "".join(f"{r},x\n" for r in rel + rel[:2]))
    with caplog.at_level("WARNING", logger="fgvr.collection"):
        assert list_source(photos / "list.csv") == from_folder  # relative to the list's folder; repeats dropped
    assert "2 entries name an image listed before" in caplog.text and rel[0] in caplog.text  # and said so
    caplog.clear()
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in from_folder))
    assert list_source(tmp_path / "list.jsonl") == from_folder
    # no header, and the first image is gone: it is a record (classified as unreadable), not taken for a header
    (photos / "bare.csv").write_text("".join(f"{r}\n" for r in ["gone.png"] + rel))
    assert list_source(photos / "bare.csv") == [str((photos / "gone.png").resolve())] + from_folder
    (photos / "headed.csv").write_text("".join(f"{r}\n" for r in ["image"] + rel))  # a header by another name
    assert list_source(photos / "headed.csv") == from_folder
    assert "listed before" not in caplog.text
    assert list_source(str(photos / "*" / "*.png")) == from_folder

    with pytest.raises(DataError, match="matches no file"):
        list_source(str(photos / "*.jpeg"))
    with pytest.raises(DataError, match="does not exist"):
        list_source(tmp_path / "nowhere")
    (tmp_path / "bad.jsonl").write_text("{\"path\": \"a.png\"}\nnot json\n")
    with pytest.raises(DataError, match="line 2"):
        list_source(tmp_path / "bad.jsonl")


def test_collection_one_record_per_image_resumes_without_duplicates(photos, tmp_path):
    out = tmp_path / "pred"
    full = classify_collection(system(), photos, tmp_path / "full", {"kb": "colours"}, shard_size=4,
                               batch_size=3, progress=False)
    assert full["images"] == 19 and full["written"] == 19 and full["shards"] == 5  # 4+4+4+4+3
    ref = {r["path"]: r for r in read_predictions(tmp_path / "full")}
    assert len(ref) == 19
    broken = ref[str((photos / "red" / "broken.png").resolve())]
    assert broken["path_taken"] == "error" and broken["prediction"] is None and broken["error"]
    good = ref[str((photos / "red" / "0.png").resolve())]
    assert good["prediction_name"] == "red" and len(good["candidates"]) == 3
    assert good["candidates"][0]["score"] == pytest.approx(good["confidence"])
    assert {"id", "name", "score", "fast", "slow"} <= set(good["candidates"][0])

    class Killed(Exception):
        pass

    class DiesAfterTwoBatches(LocalEngine):
        def classify(self, paths, cache=None):
            for n, item in enumerate(super().classify(paths, cache)):
                if n == 2:
                    raise Killed
                yield item

    sys_ = system()
    with pytest.raises(Killed):
        classify_collection(sys_, photos, out, {"kb": "colours"}, shard_size=4, batch_size=3, progress=False,
                            engine=DiesAfterTwoBatches(sys_, 3))
    assert len(read_predictions(out)) == 6  # what arrived before the stop is kept (flushed on the way out)
    again = classify_collection(system(), photos, out, {"kb": "colours"}, shard_size=4, batch_size=3,
                                progress=False)
    assert again["done_before"] == 6 and again["written"] == 13
    recs = read_predictions(out)
    lines = sum(len(f.read_text().splitlines()) for f in shard_files(out))
    assert lines == 19 and {r["path"]: r for r in recs} == ref  # every image exactly once, same answers
    # another threshold on the same folder would mix two experiments: refused
    with pytest.raises(RunMismatchError, match="other settings"):
        classify_collection(system(threshold=0.9), photos, out, {"kb": "colours"}, progress=False)
    # so would a base whose content changed (same path, same threshold): the base's digest is bound
    changed = system()
    changed.kb.prototypes = changed.kb.prototypes.flip(0)
    with pytest.raises(RunMismatchError, match="knowledge base's content"):
        classify_collection(changed, photos, out, {"kb": "colours"}, progress=False)


def test_outcome_nothing_read_or_system2_failed_everywhere_is_an_error():
    """The check `classify` (both ways) runs on the answers' paths: exit 10 and 9, never a quiet 0."""
    from fgvr.errors import NothingDoneError, System2Error
    from fgvr.pipeline import check_outcome

    check_outcome({"fast": 3, "error": 1}, "here")
    check_outcome({"slow": 1, "escalated-failed": 4}, "here")  # System 2 answered some: the failures are on their lines
    check_outcome({}, "here")  # nothing new on a resume
    with pytest.raises(NothingDoneError, match="none of the 2"):
        check_outcome({"error": 2}, "here")
    with pytest.raises(System2Error, match="failed for all 3"):
        check_outcome({"fast": 5, "escalated-failed": 3}, "here")


def test_parquet_shards_hold_the_same_records(photos, tmp_path):
    pytest.importorskip("pyarrow")
    classify_collection(system(), photos, tmp_path / "j", {"kb": "c"}, shard_size=5, progress=False)
    classify_collection(system(), photos, tmp_path / "p", {"kb": "c"}, fmt="parquet", shard_size=5, progress=False)
    assert [f.suffix for f in shard_files(tmp_path / "p")] == [".parquet"] * 4
    j = {r["path"]: r for r in read_predictions(tmp_path / "j")}
    p = {r["path"]: r for r in read_predictions(tmp_path / "p")}
    assert p == j
    w = ShardWriter(tmp_path / "p", "parquet")
    assert w.done == set(j) and w.next == 4  # a restart knows what is done and appends new shards


def test_a_parquet_prediction_folder_reads_as_one_table_and_an_old_run_json_is_kept(photos, tmp_path):
    ds = pytest.importorskip("pyarrow.dataset")
    pd = pytest.importorskip("pandas")
    out = tmp_path / "p"
    classify_collection(system(), photos, out, {"kb": "c"}, fmt="parquet", shard_size=5, progress=False)
    (out / "_vlm-cache").mkdir()
    (out / "_vlm-cache" / "answers.jsonl").write_text("{}\n")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("_", "."))) == [
        f.name for f in shard_files(out)]
    n = len(read_predictions(out))
    assert ds.dataset(out, format="parquet").count_rows() == n
    assert len(pd.read_parquet(out)) == n and set(pd.read_parquet(out)["path"]) == {r["path"] for r in read_predictions(out)}
    # a folder written with the old name `run.json`: a resume still checks it (and renames it)
    (out / "_run.json").rename(out / "run.json")
    with pytest.raises(RunMismatchError):
        classify_collection(system(threshold=0.9), photos, out, {"kb": "c"}, fmt="parquet", progress=False)
    assert (out / "_run.json").is_file() and not (out / "run.json").exists()
    assert classify_collection(system(), photos, out, {"kb": "c"}, fmt="parquet", progress=False)["written"] == 0


def test_cli_collection_and_clear_errors(lite0_setup, photos, tmp_path, monkeypatch):
    root, _ = lite0_setup
    kb = root / "kb"
    r = CliRunner().invoke(cli, ["classify", str(kb), str(root / "test" / "*" / "0.png"), "--out",
                                 str(tmp_path / "o"), "--threshold", "0.9"])
    assert r.exit_code == 0, r.output
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["images"] == 4 and counts["written"] == 4
    recs = {Path(r["path"]).parent.name: r for r in read_predictions(tmp_path / "o")}
    assert recs["red_disc"]["prediction_name"] == "red disc" and recs["red_disc"]["path_taken"] == "fast"
    r = CliRunner().invoke(cli, ["classify", str(kb), str(photos), "--threshold", "0.9"])
    assert r.exit_code != 0 and "--out PRED" in r.output  # a folder without --out: say what to do
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: the usage error still comes first
    r = CliRunner().invoke(cli, ["classify", str(kb), str(photos / "red" / "0.png"), "--ray", "local"])
    assert r.exit_code == 2 and "--out" in r.output
    r = CliRunner().invoke(cli, ["evaluate", str(kb), str(photos), "--out", str(tmp_path / "e"), "--ray", "local"])
    assert r.exit_code != 0 and "fgvr[ray]" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e").exists()  # refused before anything ran
