"""Formats users arrive with (fgvr.formats): FiftyOne's image-classification export, a Parquet file with an
image column, a Hugging Face save_to_disk folder; and a one-class base, warned at build, refused at evaluate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from fgvr.data import DataError, read_dataset
from fgvr.formats import UnlabelledWarning

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FGVR_CACHE_DIR", str(tmp_path / "cache"))


def test_a_fiftyone_export_is_read_with_its_classes_not_as_one_class_named_data(tmp_path):
    root = tmp_path / "fo"
    (root / "data").mkdir(parents=True)
    classes = list(COLOURS)
    labels = {}
    for i, (name, c) in enumerate(COLOURS.items()):
        for j in range(2):
            (root / "data" / f"{name}{j}.png").write_bytes(_png(c))
            labels[f"{name}{j}"] = i
    labels["nolabel"] = None
    (root / "data" / "nolabel.png").write_bytes(_png((0, 0, 0)))
    (root / "labels.json").write_text(json.dumps({"classes": classes, "labels": labels}))
    with pytest.warns(UnlabelledWarning, match="1 image"):
        ds = read_dataset(root)
    assert ds.classes == sorted(classes) and len(ds.samples) == 6
    assert {(s.path.name, s.label) for s in ds.samples} == {(f"{n}{j}.png", n) for n in classes for j in range(2)}
    labels["red0"] = 7  # an index outside "classes": one line
    (root / "labels.json").write_text(json.dumps({"classes": classes, "labels": labels}))
    with pytest.raises(DataError, match="class index 7"):
        read_dataset(root)


def _hf_table():
    pa = pytest.importorskip("pyarrow")
    rows = [({"bytes": _png(c), "path": None}, i) for i, c in enumerate(COLOURS.values()) for _ in range(2)]
    features = {"image": {"_type": "Image"}, "label": {"names": list(COLOURS), "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    return pa.Table.from_pylist([{"image": im, "label": lb} for im, lb in rows], schema=schema), features


def test_a_parquet_file_with_an_image_column_is_read_and_its_images_are_stable_files(tmp_path):
    import pyarrow.parquet as pq

    table, _ = _hf_table()
    f = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, f)
    ds = read_dataset(f)
    assert ds.classes == sorted(COLOURS) and len(ds.samples) == 6
    for s in ds.samples:  # each written-out image is the colour its label names
        assert Image.open(s.path).convert("RGB").getpixel((3, 3)) == COLOURS[s.label]
    assert [s.path for s in read_dataset(f).samples] == [s.path for s in ds.samples]  # same paths on a rerun


def test_a_save_to_disk_folder_is_recognised_and_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table, features = _hf_table()
    root = tmp_path / "hfds"
    root.mkdir()
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_info.json").write_text(json.dumps({"features": features}))
    ds = read_dataset(root)
    assert ds.classes == sorted(COLOURS) and len(ds.samples) == 6
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match="DatasetDict.*pass one split") as e:
        read_dataset(tmp_path / "dd")
    assert "\n" not in str(e.value)


def test_a_parquet_image_column_of_neither_bytes_nor_path_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": None}]), "label": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="neither bytes nor a path"):
        read_dataset(tmp_path / "a.parquet")
    pq.write_table(pa.table({"picture_id": [1], "label": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="no image column"):
        read_dataset(tmp_path / "b.parquet")


def test_a_one_class_base_is_warned_at_build_and_refused_at_evaluate(tmp_path, tiny_clip_dir):
    from fgvr.data import OneClassWarning
    from fgvr.errors import KnowledgeBaseError
    from fgvr.evaluate import run_evaluation
    from fgvr.pipeline import DualSystem
    from fgvr.trigger import Trigger
    from fakes import ColourEncoder, colour_kb, make_data

    data = read_dataset(make_data(tmp_path / "data"))
    enc = ColourEncoder()
    kb = colour_kb(enc)
    kb.classes = kb.classes[:1]
    with pytest.raises(KnowledgeBaseError, match="1 class"):
        run_evaluation(DualSystem(kb, enc, None, Trigger(threshold=0.5)), data, tmp_path / "run", {}, progress=False)
    assert not (tmp_path / "run").exists()
    one = tmp_path / "one" / "data" / "cat"
    one.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(one / f"{i}.png")
    from fgvr.knowledge_base import build_knowledge_base

    with pytest.warns(OneClassWarning):
        build_knowledge_base(tmp_path / "one" / "data", tmp_path / "kb", encoder=str(tiny_clip_dir), shots=1,
                             progress=False)
