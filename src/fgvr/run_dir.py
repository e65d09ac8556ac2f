"""A run folder: what it is bound to (run.json), its append-only JSONL journals, and its checkpoints.

Every resumable command (`fgvr evaluate`, `fgvr classify --out`, `fgvr bench`, `fgvr build-experience`, the
served VLM's answer cache, the knowledge base's partial work) needs the same three things, and they live
here once:

* identity: `RunDir.bind(identity)` writes run.json atomically on the first start; on a restart it compares
  the keys that must match and refuses with a per-key diff ("threshold: 0.3 then, 0.5 now"), because
  appending to results made under other inputs would mix two experiments. A command only declares its
  identity dict (and which keys must match).
* journals: `RunDir.journal(name, key)` is an append-only JSONL file keyed by one field. A torn last line
  (a kill mid-write) is cut off on open, a complete last line missing only its newline is ended, a bad
  line in the middle is skipped with a warning, the first record per key wins, and an append never writes
  a key that is already there: a record is never counted twice, whatever was killed when.
* checkpoints: `RunDir.checkpoint(name)` is a JSON state file rewritten atomically (temp + rename), so a
  kill leaves the previous state or the new one, never half of one; `identity_key` names content-addressed
  partial work (a file whose name is the digest of what made it).

One writer at a time is `fgvr.locks.output_lock`'s job (`RunDir.lock`); the other methods assume the
caller holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

from fgvr.errors import RunMismatchError
from fgvr.io import atomic_write_json, json_dumps, with_filename
from fgvr.locks import output_lock

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def identity_key(identity: Any, length: int = 16) -> str:
    """A short digest of a JSON-able identity (sorted keys): the name of content-addressed partial work."""
    blob = json.dumps(identity, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def _show(key: str, value: Any) -> str:
    return f"{value[:12]}…" if key.endswith("_digest") and isinstance(value, str) else repr(value)


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None,
                  explain: Mapping[str, str] | None = None) -> list[str]:
    """One phrase per key whose value differs ("threshold: 0.3 then, 0.5 now"); `keys` defaults to every
    key of either side. `explain` names a key for a person (a digest says little by itself)."""
    keys = list(keys) if keys is not None else sorted(set(old) | set(new))
    explain = explain or {}
    return [f"{explain.get(k, k)}: {_show(k, old.get(k))} then, {_show(k, new.get(k))} now"
            for k in keys if old.get(k) != new.get(k)]


class Journal:
    """An append-only JSONL file of records keyed by `key(record)` (see the module docstring)."""

    def __init__(self, path: Path, key: Callable[[dict[str, Any]], Hashable],
                 valid: Callable[[dict[str, Any]], bool] = lambda r: True) -> None:
        self.path, self.key, self.valid = Path(path), key, valid
        self.keys: set[Hashable] = set()
        self._lock = threading.Lock()

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        if not isinstance(rec, dict) or not self.valid(rec):
            return None
        try:
            self.key(rec)
        except (KeyError, TypeError):
            return None
        return rec

    def read(self, repair: bool = True) -> list[dict[str, Any]]:
        """The records, first per key, in file order; with `repair` a torn last line is cut from the file
        (and a whole last record missing its newline is ended) so the next append starts on a clean line.
        Without `repair` the file is never modified (a reader beside the writer)."""
        return list(self.records(repair))

    def records(self, repair: bool = True) -> Iterator[dict[str, Any]]:
        """`read` one line at a time: memory for one record (and the set of keys), not for the file, so a
        summary over 50,000 results streams. `keys` is complete once the iteration has ended."""
        seen: set[Hashable] = set()
        self.keys = seen
        if not self.path.is_file():
            return
        if repair:
            self._repair_tail()
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                rec = self._parse(line)
                if rec is None:
                    if line.strip() and line.endswith(b"\n"):
                        log.warning("%s, line %d is not a record of this file; skipping it (its work is redone)",
                                    self.path, n)
                    continue
                k = self.key(rec)
                if k not in seen:
                    seen.add(k)
                    yield rec

    def _repair_tail(self) -> None:
        """Cut a torn last line, or end a whole last record that lacks its newline (see `read`)."""
        with self.path.open("rb") as f:
            end = f.seek(0, 2)
            cut, pos, block = 0, end, 1 << 16
            while pos > 0:  # the last newline, read backwards a block at a time
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                at = f.read(step).rfind(b"\n")
                if at >= 0:
                    cut = pos + at + 1
                    break
            f.seek(cut)
            tail = f.read()
        if tail.strip():
            self._end_tail(self._parse(tail) is not None, cut)

    def _end_tail(self, whole: bool, cut: int) -> None:
        with self.path.open("r+b") as f:
            if whole:
                f.seek(0, 2)
                f.write(b"\n")
            else:
                log.warning("%s ended in a partly written line (the last run was interrupted); dropping it and "
                            "redoing its work", self.path)
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def append(self, records: Iterable[dict[str, Any]], fsync: bool = True) -> list[dict[str, Any]]:
        """Append the records whose key is not yet in the file (read() first), as one write, then fsync:
        a batch on disk survives a kill -9 or a power cut, and a full disk leaves at most a torn last line
        (cut on the next read). Returns the records written."""
        with self._lock:
            new, keys = [], set()
            for r in records:
                k = self.key(r)
                if k in self.keys or k in keys:
                    continue
                keys.add(k)
                new.append(r)
            if not new:
                return []
            data = "".join(json_dumps(r) + "\n" for r in new).encode("utf-8")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("ab") as f:
                    f.write(data)
                    f.flush()
                    if fsync:
                        os.fsync(f.fileno())
            except OSError as e:
                raise with_filename(e, self.path) from e
            self.keys |= keys
            return new

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys


class Checkpoint:
    """A JSON state file rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> Any:
        return json.loads(self.path.read_text(encoding="utf-8"))

    def save(self, state: Any) -> None:
        atomic_write_json(self.path, state)


@dataclass
class RunDir:
    """One run folder (see the module docstring). `error` is the exception family a refused resume
    raises (a `RunMismatchError`, exit code 6), `flag` the option that names the folder in messages."""

    path: Path
    error: type[Exception] = RunMismatchError
    flag: str = "--out"
    config: dict[str, Any] = field(default_factory=dict)
    run_name: str = RUN_FILE  # a prediction folder names it `_run.json` (see fgvr.collection)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def run_file(self) -> Path:
        return self.path / self.run_name

    def bound(self) -> dict[str, Any] | None:
        """What run.json holds, None where the run has not started; an unreadable run.json is refused."""
        f = self.run_file
        if not f.is_file():
            return None
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise self.error(f"{f} cannot be read ({e}): it is not a run of this fgvr; start fresh with a new "
                             f"{self.flag} folder (or delete {self.path})") from None
        return old

    def bind(self, identity: Mapping[str, Any], must_match: Sequence[str] | None = None,
             explain: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Start or resume the run bound to `identity`; returns what run.json now holds.

        First start: run.json is written atomically. Restart: every key of `must_match` (default: all of
        `identity`) must equal what was stored, else the restart is refused naming each key that differs;
        the stored values of keys the caller added later (a calibrated threshold) are kept, the caller's
        new values of the other keys (a changed --limit) are written back."""
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.bound()
        if old is None:
            self.config = dict(identity)
            atomic_write_json(self.run_file, self.config)
            return dict(self.config)
        keys = list(must_match) if must_match is not None else list(identity)
        diff = identity_diff(old, identity, keys, explain)
        if diff:
            raise self.error(
                f"{self.path} holds a run made with other settings or inputs ({'; '.join(diff)}). Resume with "
                f"the same inputs and settings, or start fresh: pass a new {self.flag} folder (or delete "
                f"{self.path})."
            )
        self.config = {**old, **identity}
        if self.config != old:
            atomic_write_json(self.run_file, self.config)  # run.json says what the run now covers
        return dict(self.config)

    def update(self, **values: Any) -> dict[str, Any]:
        """Add values to run.json (a threshold settled after the start), atomically."""
        self.config = {**(self.bound() or {}), **values}
        atomic_write_json(self.run_file, self.config)
        return dict(self.config)

    def journal(self, name: str, key: Callable[[dict[str, Any]], Hashable] = lambda r: r["path"],
                valid: Callable[[dict[str, Any]], bool] = lambda r: "path" in r) -> Journal:
        return Journal(self.path / name, key, valid)

    def checkpoint(self, name: str) -> Checkpoint:
        return Checkpoint(self.path / name)

    def lock(self, command: str) -> AbstractContextManager[Path]:
        """One writer at a time (`fgvr.locks.output_lock`): a second gets a LockedError naming the first."""
        return output_lock(self.path, command)
