"""`fgvr classify KB SOURCE --out PRED`: classify an unlabelled collection into prediction shards.

SOURCE is a folder (searched recursively for image files), a `.csv` list of paths (a `path` column, or the
first column), a `.jsonl` list (`{"path": ...}` or a bare string per line), or a glob (`photos/**/*.jpg`).
Relative paths in a list are read from the list's folder. Every path is resolved, so the same image named
two ways is classified once.

PRED is a folder:
* `_run.json`           the settings; a restart with other settings is refused (as `fgvr evaluate` does).
* `part-NNNNNN.jsonl`   (or `.parquet` with `--format parquet`) one `Prediction` per image. Each shard is
                        written whole (temp file + rename), so a kill loses at most the records not yet in
                        a shard, and a rerun skips every image already in one. Never a duplicate.
* `_vlm-cache/`         a served VLM's answers, when there is one (a rerun asks the server again for none).

Every file that is not a shard starts with `_` (temporary files with `.`), the names pyarrow, pandas,
duckdb, Spark and Ray skip, so `pd.read_parquet(PRED)` or `pyarrow.dataset.dataset(PRED)` reads the
folder as one table. A folder written before (`run.json`, `vlm-cache/`) is renamed on resume.

The same loop runs in this process or on Ray (`fgvr.ray_run.RayEngine`): an engine yields finished
`Result`s batch by batch, in any order, and this module writes them.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from fgvr.data import IMAGE_SUFFIXES, DataError
from fgvr.engine import LocalEngine  # noqa: F401 (re-exported: fgvr.collection.LocalEngine)
from fgvr.io import atomic_write_bytes, atomic_write_text, json_dumps, read_user_text
from fgvr.binding import EXPLAIN, MUST_MATCH, system_binding
from fgvr.pipeline import DualSystem
from fgvr.records import RECORD_SCHEMA, Prediction, check_schema, result_from_dict  # noqa: F401 (re-exported)
from fgvr.run_dir import RunDir

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet")
_GLOB_CHARS = set("*?[")


# ------------------------------------------------------------------------------------------------------
# listing the collection


def list_source(source: str | Path) -> list[str]:
    """Resolved image paths of SOURCE (folder, .csv / .jsonl list, or glob), sorted for a folder or glob,
    in file order for a list; duplicates dropped (first kept)."""
    text = str(source)
    p = Path(text)
    if p.is_dir():
        paths = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in q.relative_to(p).parts))
        if not paths:
            raise DataError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES)[:6])}, ...)")
    elif p.is_file() and p.suffix.lower() in (".csv", ".jsonl"):
        paths = _read_list(p)
    elif any(c in text for c in _GLOB_CHARS):
        paths = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
        if not paths:
            raise DataError(f"the pattern {text!r} matches no file")
    elif p.exists():
        raise DataError(f"{p} is not a folder, a .csv / .jsonl list of paths, or a glob: for one image, leave "
                        "out --out (one JSON line per image on stdout)")
    else:
        raise DataError(f"{p} does not exist: pass a folder, a .csv / .jsonl list of image paths, or a glob")
    seen: dict[str, None] = {}
    repeated: list[str] = []
    for q in paths:
        key = str(Path(q).resolve())
        if key in seen:
            repeated.append(str(q))
        seen.setdefault(key, None)
    if repeated:  # said, not silent: a prediction count below the list's length would otherwise surprise
        log.warning("%s: %d %s an image listed before (first: %s); each image is classified once",
                    text, len(repeated), "entry names" if len(repeated) == 1 else "entries name", repeated[0])
    return list(seen)


def _read_list(path: Path) -> list[Path]:
    out: list[Path] = []
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(read_user_text(path, "image list"), newline="")))
        if not rows:
            raise DataError(f"{path} is empty: expected a column of image paths (header `path`)")
        col = rows[0].index("path") if "path" in rows[0] else 0
        first = Path(rows[0][col].strip()) if rows[0] else Path()
        # a header names a column; a missing first image (it has an image suffix) is a record, reported unreadable
        has_header = "path" in rows[0] or (not (path.parent / first).exists()
                                           and first.suffix.lower() not in IMAGE_SUFFIXES)
        values = [r[col] for r in rows[1 if has_header else 0:] if len(r) > col and r[col].strip()]
    else:
        values = []
        for n, line in enumerate(read_user_text(path, "image list").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise DataError(f"{path}, line {n} is not JSON: write one {{\"path\": ...}} per line") from None
            value = rec.get("path") if isinstance(rec, dict) else rec
            if not isinstance(value, str):
                raise DataError(f"{path}, line {n} has no \"path\" string")
            values.append(value)
    for v in values:
        if "\x00" in v:
            raise DataError(f"{path}: the path {v!r} holds a NUL byte: fix that entry")
        q = Path(v.strip())
        out.append(q if q.is_absolute() else path.parent / q)
    if not out:
        raise DataError(f"{path} lists no image paths")
    return out


# ------------------------------------------------------------------------------------------------------
# shards


def _parquet_schema():
    import pyarrow as pa

    cand = pa.struct([("id", pa.int64()), ("name", pa.string()), ("score", pa.float64()),
                      ("fast", pa.float64()), ("slow", pa.float64())])
    # `schema` is a column (every row says its version, as a JSONL row does; pandas, pyarrow and duckdb read
    # it as any other) and the file's metadata too (`fgvr.schema`), for a reader that looks there
    return pa.schema([("schema", pa.string()), ("path", pa.string()), ("path_taken", pa.string()),
                      ("prediction", pa.int64()), ("prediction_name", pa.string()), ("confidence", pa.float64()),
                      ("candidates", pa.list_(cand)), ("trigger_score", pa.float64()), ("error", pa.string()),
                      ("unknown", pa.bool_()), ("unknown_score", pa.float64())],
                     metadata={b"fgvr.schema": RECORD_SCHEMA.encode()})


def _need_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("--format parquet needs pyarrow: pip install pyarrow (it comes with fgvr[ray])") from None


def shard_files(folder: Path) -> list[Path]:
    return sorted(list(folder.glob("part-*.jsonl")) + list(folder.glob("part-*.parquet")))


def read_predictions(folder: str | Path) -> list[dict[str, Any]]:
    """Every record of PRED's shards, in shard order, first record per path kept (a shard of an older fgvr,
    without `schema`, is read as it is; one of a newer schema is refused, naming the shard)."""
    out, seen = [], set()
    for f in shard_files(Path(folder)):
        if f.suffix == ".parquet":
            _need_pyarrow()
            import pyarrow.parquet as pq

            rows = pq.read_table(f).to_pylist()
        else:
            rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        for r in rows:
            check_schema(r, f)
            if r["path"] not in seen:
                seen.add(r["path"])
                out.append(r)
    return out


class ShardWriter:
    """Buffers records and writes them `shard_size` at a time as whole shard files (temp file + rename);
    knows which paths are done, from the shards on disk and those it wrote."""

    def __init__(self, folder: Path, fmt: str = "jsonl", shard_size: int = 256) -> None:
        if fmt not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if fmt == "parquet":
            _need_pyarrow()
        self.folder, self.fmt, self.shard_size = folder, fmt, max(1, shard_size)
        folder.mkdir(parents=True, exist_ok=True)
        existing = shard_files(folder)
        self.done: set[str] = {r["path"] for r in read_predictions(folder)}
        self.next = 1 + max((int(f.stem.split("-")[1]) for f in existing), default=-1)
        self.buffer: list[dict[str, Any]] = []
        self.written = 0

    def add(self, records: Iterable[dict[str, Any]]) -> int:
        """Queue records of images not yet done (a retried batch may repeat some); returns how many."""
        n = 0
        for r in records:
            if r["path"] in self.done:
                continue
            self.done.add(r["path"])
            self.buffer.append(r)
            n += 1
        while len(self.buffer) >= self.shard_size:
            self._write(self.buffer[:self.shard_size])
            self.buffer = self.buffer[self.shard_size:]
        return n

    def flush(self) -> None:
        """Write what is buffered (a last, shorter shard)."""
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []

    def _write(self, records: list[dict[str, Any]]) -> None:
        path = self.folder / f"part-{self.next:06d}.{self.fmt}"
        if self.fmt == "parquet":
            import io

            import pyarrow as pa
            import pyarrow.parquet as pq

            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(records, schema=_parquet_schema()), sink)
            atomic_write_bytes(path, sink.getvalue())
        else:
            atomic_write_text(path, "".join(json_dumps(r) + "\n" for r in records))
        self.written += len(records)
        self.next += 1


# ------------------------------------------------------------------------------------------------------
# the run


SIDE_PREFIX = "_"


def side_path(out: str | Path, name: str) -> Path:
    """PRED/_<name>: where a file or folder that is not a shard lives (see the module docstring); one left
    under its old name `name` by an earlier fgvr is moved there first, so a resume still finds it."""
    out = Path(out)
    new, old = out / f"{SIDE_PREFIX}{name}", out / name
    if old.exists() and not new.exists():
        old.replace(new)
    return new


def classify_collection(system: DualSystem, source: str | Path, out: str | Path, config: dict[str, Any], *,
                        fmt: str = "jsonl", shard_size: int = 256, batch_size: int = 16,
                        engine: Any = None, progress: bool = True) -> dict[str, Any]:
    """Classify every image of SOURCE not yet in OUT's shards; returns counts (also written to stdout by
    the CLI). `config` is what the run is bound to (kb, encoder); the trigger and System 2 are added here."""
    from tqdm import tqdm

    out = Path(out)
    paths = list_source(source)
    # the trigger's threshold is bound too (a budget is calibrated on the support set here, never on the run)
    config = {**config, **system_binding(system), "threshold": system.trigger.threshold, "data": str(source),
              "calibrate": "support", "format": fmt}
    RunDir(out, run_name=side_path(out, "run.json").name).bind(config, MUST_MATCH, EXPLAIN)
    writer = ShardWriter(out, fmt, shard_size)
    todo = [p for p in paths if p not in writer.done]
    if writer.done and todo:
        log.info("resuming %s: %d of %d image(s) already done", out, len(paths) - len(todo), len(paths))
    engine = engine or LocalEngine(system, batch_size)
    counts: dict[str, int] = {}
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="classify", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for chunk, results in engine.classify(todo):
            records = []
            for p, r in zip(chunk, results):
                rec = Prediction.from_result(r).to_dict()
                rec["path"] = p
                records.append(rec)
            for rec in records:
                if rec["path"] not in writer.done:
                    counts[rec["path_taken"]] = counts.get(rec["path_taken"], 0) + 1
            bar.update(writer.add(records))
    finally:
        writer.flush()  # what is finished is kept, also when the run stops on an error or Ctrl-C
        bar.close()
    return {"images": len(paths), "done_before": len(paths) - len(todo), "written": writer.written,
            "paths": counts, "out": str(out), "shards": len(shard_files(out))}
