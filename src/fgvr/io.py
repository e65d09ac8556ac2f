"""Atomic writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask both sets and returns)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename. The file gets the mode an ordinary `open`
    would give it (0666 less the umask; an existing file keeps its mode), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise with_filename(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_filename(exc: OSError, path: str | os.PathLike) -> OSError:
    """`exc` naming `path` when it names no file (a failed write or fsync names none), so the one-line
    message can say which file the disk refused."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def utf8(text: str) -> bytes:
    """`text` as UTF-8, where a file name that was not valid UTF-8 (held as surrogate escapes, as Python
    reads such names) is written back as its original bytes instead of raising UnicodeEncodeError."""
    return text.encode("utf-8", "surrogateescape")


def json_dumps(obj: Any, **kw: Any) -> str:
    """`json.dumps` keeping non-ASCII text readable, except in a record that holds a file name that is not
    valid UTF-8: that record is written with \\u escapes (`"caf\\udce9.png"`), still valid JSON and UTF-8,
    and `json.loads` gives back the very name, so a run holding one finishes and resumes."""
    text = json.dumps(obj, ensure_ascii=False, **kw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kw)
    return text


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, utf8(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_user_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a file a user wrote (manifest, list, metadata, rules), UTF-8 with or without a BOM.

    Anything else (a Latin-1 or UTF-16 export from a spreadsheet) is refused as one `InputError` line that
    names the file, the first byte that is not UTF-8, and the fix, instead of a UnicodeDecodeError traceback.
    """
    from fgvr.errors import InputError

    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 1].hex()
        hint = (" (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
        raise InputError(f"{what} {path} is not UTF-8 text{hint}: byte {e.start} is 0x{bad}; save it as UTF-8 "
                         "(e.g. `iconv -f latin1 -t utf-8`, or \"CSV UTF-8\" in a spreadsheet) and rerun") from None


def path_resolver() -> Callable[[str | os.PathLike], str]:
    """`Path.resolve()` for many paths, each folder resolved once: a resolve walks every component with an
    lstat, and a 60,000-row manifest (Fashion-MNIST's train split) spent seconds in them, resolved three
    times over. The result equals `str(Path(p).resolve())` (a string: building Path objects was the next
    cost): the folder through `realpath`, the last component
    followed only where it is itself a link. The cache lives as long as the returned function, one listing's
    read, so a folder re-linked later is seen afresh."""
    folders: dict[str, str] = {}

    def resolve(path: str | os.PathLike) -> str:
        s = os.fspath(path)
        head, tail = os.path.split(s)
        if tail in ("", ".", ".."):
            return os.path.realpath(s)
        real = folders.get(head)
        if real is None:
            real = folders[head] = os.path.realpath(head or os.curdir)
        full = os.path.join(real, tail)
        return os.path.realpath(full) if os.path.islink(full) else full

    return resolve
