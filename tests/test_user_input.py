"""Files users hand to fgvr (manifests, lists, metadata, rules, run folders): read right or refused in one
line of an fgvr error family, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fgvr.collection import list_source
from fgvr.data import read_dataset
from fgvr.errors import InputError


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_a_latin1_manifest_is_one_data_error_naming_file_offset_and_fix(tmp_path):
    _img(tmp_path / "café" / "a.png")
    csv = tmp_path / "list.csv"
    csv.write_bytes("path,label\ncafé/a.png,cat\n".encode("latin-1"))
    with pytest.raises(InputError) as e:
        read_dataset(csv)
    msg = str(e.value)
    assert "\n" not in msg and str(csv) in msg and "UTF-8" in msg
    assert "byte 14" in msg  # 'path,label\ncaf' is 14 bytes, then 0xe9


def test_a_latin1_list_for_classify_is_one_data_error(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_bytes("path\ncafé/a.png\n".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        list_source(csv)
