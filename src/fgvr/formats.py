"""Labelled-image formats users arrive with, beside fgvr's own folder and CSV manifest.

* FiftyOne's image-classification export (`fo.types.FiftyOneImageClassificationDataset`): `data/` holds
  the images, `labels.json` is `{"classes": [...], "labels": {"<file stem>": <class index or name>}}`
  (a `null` label is an unlabelled image: left out, with a warning).
* A Parquet file with an image column, the Hugging Face hub's usual shape: `image` is a struct
  `{bytes, path}` (or plain bytes), `label` an integer whose names the file's `huggingface` schema metadata
  lists (a `ClassLabel`), or a string.
* A Hugging Face `datasets` folder written by `save_to_disk`: `dataset_info.json`, `state.json` and
  `data-*.arrow` files (Arrow streams), the same columns; a `DatasetDict` folder (`dataset_dict.json`) is
  refused with the split to pass.

Images stored as bytes are written once, as files, under the extraction folder (`extraction_root()`:
`$FGVR_CACHE_DIR/extracted`, default `~/.cache/fgvr/extracted`), one subfolder per source file named by
the source's resolved path, size and modification time: the same file gives the same paths on every run, so
a resumed evaluation finds its records, and a changed file gets a new folder. Everything fgvr does
downstream (k-shot split, manifests, evaluation) then sees ordinary image files.

Each reader returns `(where, entries)` with entries `(row, name as written, image path, label)`, read by
`fgvr.data.labelled_samples` like a CSV manifest's rows. Errors are `FormatError` (a `ValueError`), which
`fgvr.data` reports as a one-line DataError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fgvr.io import atomic_write_bytes, read_user_text

log = logging.getLogger(__name__)

Entry = tuple[int, str, Path, str]
HF_DISK_FILES = ("dataset_info.json", "state.json")
IMAGE_COLUMNS = ("image", "img", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "class", "category", "fine_label", "coarse_label")


class FormatError(ValueError):
    """A file of a known format that cannot be read as labelled images; the message says what to do."""


class UnlabelledWarning(UserWarning):
    """Images without a label in a labelled format: left out."""


# ----------------------------------------------------------------------------------------------------------
# what a source is


def detect(source: Path) -> str | None:
    """'fiftyone', 'hf-disk', 'hf-disk-dict' or 'parquet' for a source of one of these formats, else None."""
    if source.is_file():
        return "parquet" if source.suffix.lower() == ".parquet" else None
    if not source.is_dir():
        return None
    if (source / "labels.json").is_file() and (source / "data").is_dir():
        return "fiftyone"
    if (source / "dataset_dict.json").is_file():
        return "hf-disk-dict"
    if all((source / f).is_file() for f in HF_DISK_FILES):
        return "hf-disk"
    return None


def read_format(kind: str, source: Path) -> tuple[str, list[Entry]]:
    """The entries of a source `detect` named."""
    if kind == "fiftyone":
        return read_fiftyone(source)
    if kind == "hf-disk":
        return read_hf_disk(source)
    if kind == "hf-disk-dict":
        splits = _splits_of_dict(source)
        raise FormatError(f"{source} is a Hugging Face DatasetDict (save_to_disk) with the splits "
                          f"{', '.join(splits)}: pass one split, e.g. {source / (splits[-1] if splits else 'train')} "
                          "(build the base from train, evaluate on test)")
    if kind == "parquet":
        return read_parquet(source)
    raise ValueError(f"unknown format {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# FiftyOne


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(read_user_text(path, what))
    except ValueError as e:  # InputError (not UTF-8) is not a ValueError and passes through
        raise FormatError(f"{what} {path} is not valid JSON ({e})") from None


def read_fiftyone(root: Path) -> tuple[str, list[Entry]]:
    """FiftyOne's image-classification export: data/<stem>.<ext> and labels.json."""
    meta = root / "labels.json"
    obj = _json_file(meta, "FiftyOne labels file")
    if not isinstance(obj, dict) or not isinstance(obj.get("labels"), dict):
        raise FormatError(f"{meta}: expected FiftyOne's {{\"classes\": [...], \"labels\": {{stem: label}}}}")
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise FormatError(f"{meta}: \"classes\" must be a list of class names")
    files: dict[str, Path] = {}
    for p in sorted((root / "data").iterdir()):
        if p.is_file() and not p.name.startswith("."):
            files.setdefault(p.stem, p)
    entries: list[Entry] = []
    unlabelled = []
    for n, (stem, value) in enumerate(obj["labels"].items(), 1):
        if value is None:
            unlabelled.append(stem)
            continue
        label = _fiftyone_label(meta, stem, value, classes)
        entries.append((n, stem, files.get(stem, root / "data" / stem), label))
    if unlabelled:
        warnings.warn(f"{meta}: {len(unlabelled)} image(s) without a label left out (first: {unlabelled[0]})",
                      UnlabelledWarning, stacklevel=3)
    if not entries:
        raise FormatError(f"{meta} labels no image")
    return f"FiftyOne labels {meta}", entries


def _fiftyone_label(meta: Path, stem: str, value: Any, classes: list[str] | None) -> str:
    if isinstance(value, dict):  # {"label": ...} (a Classification written out whole)
        value = value.get("label")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FormatError(f"{meta}: the label of {stem!r} is {value!r}: expected a class index or name")
    if isinstance(value, int):
        if classes is None or not 0 <= value < len(classes):
            raise FormatError(f"{meta}: the label of {stem!r} is class index {value}, but \"classes\" has "
                              f"{len(classes or [])} entries")
        return classes[value]
    if value == "":
        raise FormatError(f"{meta}: the label of {stem!r} is empty")
    return value


# ----------------------------------------------------------------------------------------------------------
# Parquet and save_to_disk (Arrow)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise FormatError("reading Parquet / Arrow datasets needs pyarrow: pip install pyarrow "
                          "(it comes with fgvr[ray])") from None
    import pyarrow as pa

    return pa


def read_parquet(path: Path) -> tuple[str, list[Entry]]:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise FormatError(f"{path} cannot be read as Parquet ({str(e).splitlines()[0] if str(e) else e})") from None
    meta = table.schema.metadata or {}
    features = _hf_features(meta.get(b"huggingface"), path)
    return f"Parquet file {path}", _entries(table, features, path, path.parent)


def read_hf_disk(root: Path) -> tuple[str, list[Entry]]:
    """A `datasets` folder from save_to_disk: its Arrow stream files, in state.json's order."""
    pa = _pyarrow()
    state = _json_file(root / "state.json", "Hugging Face state file")
    info = _json_file(root / "dataset_info.json", "Hugging Face dataset info")
    names = [f.get("filename") for f in (state.get("_data_files") or []) if isinstance(f, dict)] \
        if isinstance(state, dict) else []
    files = [root / n for n in names if isinstance(n, str)] or sorted(root.glob("*.arrow"))
    if not files:
        raise FormatError(f"{root} is a Hugging Face save_to_disk folder without .arrow files")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"{f} cannot be read as an Arrow stream ({str(e).splitlines()[0] if str(e) else e}): "
                              "write the dataset again with save_to_disk") from None
    features = info.get("features") if isinstance(info, dict) else None
    return f"Hugging Face dataset {root}", _entries(pa.concat_tables(tables), features, root, root)


def _hf_features(raw: bytes | None, where: Path) -> dict | None:
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return ((obj.get("info") or {}).get("features") if isinstance(obj, dict) else None)


def _column(names: list[str], wanted: tuple[str, ...], what: str, where: Path) -> str:
    found = next((c for c in wanted if c in names), None)
    if found is None:
        raise FormatError(f"{where}: no {what} column: name it one of {', '.join(wanted)} (columns: {names})")
    return found


def _label_names(features: dict | None, column: str) -> list[str] | None:
    feat = (features or {}).get(column) if isinstance(features, dict) else None
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and isinstance(feat.get("names"), list):
        return [str(n) for n in feat["names"]]
    return None


def _entries(table: Any, features: dict | None, where: Path, base: Path) -> list[Entry]:
    """Rows of (image, label) -> entries, images stored as bytes written out under the extraction folder."""
    names = list(table.column_names)
    icol = _column(names, IMAGE_COLUMNS, "image", where)
    lcol = _column(names, LABEL_COLUMNS, "label", where)
    label_names = _label_names(features, lcol)
    images, labels = table.column(icol).to_pylist(), table.column(lcol).to_pylist()
    out_dir = extraction_dir(where)
    entries: list[Entry] = []
    unlabelled = 0
    for i, (img, label) in enumerate(zip(images, labels)):
        if label is None or (label_names is not None and label == -1):  # -1: ClassLabel's "no label"
            unlabelled += 1
            continue
        entries.append((i, f"row {i}", _image_file(img, i, where, base, out_dir), _label(label, label_names, i, where)))
    if unlabelled:
        warnings.warn(f"{where}: {unlabelled} row(s) without a label left out", UnlabelledWarning, stacklevel=4)
    if not entries:
        raise FormatError(f"{where} has no labelled rows")
    return entries


def _label(value: Any, names: list[str] | None, row: int, where: Path) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FormatError(f"{where}, row {row}: label {value!r} is neither a class index nor a name")
    if isinstance(value, int) and names is not None:
        if not 0 <= value < len(names):
            raise FormatError(f"{where}, row {row}: label {value} is outside the {len(names)} class names")
        return names[value]
    if str(value) == "":
        raise FormatError(f"{where}, row {row}: empty label")
    return str(value)


def _image_file(value: Any, row: int, where: Path, base: Path, out_dir: Path) -> Path:
    """The file of one row's image: written out from its bytes, or the path it names (relative to `base`)."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if isinstance(data, (bytes, bytearray)) and data:
        suffix = Path(path).suffix.lower() if isinstance(path, str) and Path(path).suffix else _sniff(data)
        target = out_dir / f"{row:08d}{suffix}"
        if not target.is_file() or target.stat().st_size != len(data):
            atomic_write_bytes(target, bytes(data))
        return target
    if isinstance(path, str) and path:
        p = Path(path)
        return p if p.is_absolute() else base / p
    if isinstance(value, str) and value:  # a column of paths
        p = Path(value)
        return p if p.is_absolute() else base / p
    raise FormatError(f"{where}, row {row}: the image is neither bytes nor a path; with `datasets`, "
                      "`ds.cast_column('image', datasets.Image(decode=True))` then save again, or export an "
                      "image folder (`fgvr` reads root/<class>/<image>)")


_MAGIC = ((b"\xff\xd8", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"),
          (b"MM\x00*", ".tif"))


def _sniff(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), ".img")


def extraction_root() -> Path:
    """Where images stored inside Parquet / Arrow files are written out (see the module docstring)."""
    return Path(os.environ.get("FGVR_CACHE_DIR") or Path.home() / ".cache" / "fgvr") / "extracted"


def extraction_dir(source: Path) -> Path:
    """One folder per source file, named by its resolved path, size and modification time."""
    s = source.resolve()
    files = [s] if s.is_file() else sorted(s.glob("*.arrow"))
    key = "\0".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) or str(s)
    return extraction_root() / f"{s.stem[:40]}-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


def _splits_of_dict(root: Path) -> list[str]:
    try:
        obj = json.loads(read_user_text(root / "dataset_dict.json", "Hugging Face dataset dict"))
        return [str(s) for s in obj.get("splits", [])] if isinstance(obj, dict) else []
    except ValueError:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
