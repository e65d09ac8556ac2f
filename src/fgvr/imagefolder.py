"""The Hugging Face `imagefolder` layout as input: a split folder with `metadata.csv` or `metadata.jsonl`.

    data/train/metadata.csv      file_name,label          data/test/metadata.jsonl
    data/train/0001.png          0001.png,shirt           {"file_name": "a/0002.png", "label": "coat"}

`file_name` is relative to the metadata file's folder; the label column is `label` (or `labels`, `class`,
`category`): another column may be a caption or a feature, so it is never taken for the class. The
other imagefolder form, one subfolder per class, is fgvr's own folder layout already. A root that holds
only split folders (`train/`, `test/`, ...) is refused with the split to pass: building a base from the
train split and evaluating on the test split are two commands, and reading both as one dataset would
make "train" and "test" two classes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fgvr.io import read_user_text

SPLITS = {"train", "test", "validation", "valid", "val", "dev"}
METADATA = ("metadata.csv", "metadata.jsonl")
LABEL_COLUMNS = ("label", "labels", "class", "category")


class ImageFolderError(ValueError):
    """A metadata file that cannot be read as an imagefolder split (`fgvr.data` reports it as a DataError)."""


def imagefolder_metadata(root: Path) -> Path | None:
    """The metadata file of an imagefolder split, if `root` is one."""
    for name in METADATA:
        if (root / name).is_file():
            return root / name
    return None


def split_folders(root: Path) -> list[str]:
    """The split subfolders of an imagefolder root whose subfolders are all split names (else [])."""
    subs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(subs) if subs and all(s.lower() in SPLITS for s in subs) else []


def _rows(meta: Path) -> list[dict[str, str]]:
    if meta.suffix == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(read_user_text(meta, "metadata file"), newline=""))]
    rows = []
    for n, line in enumerate(read_user_text(meta, "metadata file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ImageFolderError(f"{meta}, line {n}: not a JSON object ({e})") from None
        if not isinstance(row, dict):
            raise ImageFolderError(f"{meta}, line {n}: expected a JSON object with file_name and a label")
        rows.append({str(k): v for k, v in row.items()})
    return rows


def read_imagefolder(root: Path) -> tuple[Path, list[tuple[int, str, Path, str]]]:
    """An imagefolder split -> (its metadata file, [(line, file_name, image path, label)]); `fgvr.data` reads
    the rows as it reads a CSV manifest's (classes file, repeated rows, one image under two labels)."""
    meta = imagefolder_metadata(root)
    if meta is None:
        raise ImageFolderError(f"{root} has no metadata.csv or metadata.jsonl")
    rows = _rows(meta)
    if not rows:
        raise ImageFolderError(f"{meta} has no rows: expected file_name and a label per image")
    columns = list(rows[0])
    if "file_name" not in columns:
        raise ImageFolderError(f"{meta}: no file_name column (columns: {columns})")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_col is None:  # another column may be a caption or a feature: never guess which one is the class
        raise ImageFolderError(f"{meta}: no label column: name the class column one of {', '.join(LABEL_COLUMNS)} "
                               f"(columns: {columns})")
    entries = []
    for n, row in enumerate(rows, 2 if meta.suffix == ".csv" else 1):
        name, label = row.get("file_name"), row.get(label_col)
        if not name or label is None or str(label) == "":
            raise ImageFolderError(f"{meta}, row {n}: needs file_name and {label_col}, got {row}")
        p = Path(str(name))
        entries.append((n, str(name), p if p.is_absolute() else root / p, str(label)))
    return meta, entries
