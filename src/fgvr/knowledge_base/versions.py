"""Knowledge-base versions: every change to a base is a new, whole version, swapped in atomically and logged.

    record = commit_version(kb_path, kb, "add", {"label": "fox", "images": 3})   # under output_lock
    for r in read_log(kb_path): print(r.format())                                  # `fgvr kb log`
    revert_version(kb_path, 2)                                                     # `fgvr kb revert`

Layout: the base's own files (`manifest.json`, `tensors.safetensors`, `descriptions.json`) plus
`versions/<n>/` (a snapshot of version n's three files) and `versions/log.json` (one record per version:
what changed, who, when, the content digest). A change writes the complete new base into a staging sibling
(`.<name>.stage-*`), hard-links the earlier snapshots and every other entry of the base (`experience/`)
into it, and swaps it in by two renames. So a change killed at any point leaves the previous version whole
and loadable; a kill between the two renames leaves only `.<name>.old-*`, which `recover` renames back.
Snapshots are immutable, so hard links make carrying them forward free (a copy where links are refused).

A base never changed since its build has no `versions/`: its log is one synthesised "build" record.
`fgvr build-kb` over an existing base replaces it wholesale, history included.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from fgvr.errors import KnowledgeBaseError
from fgvr.io import read_json
from fgvr.knowledge_base.storage import (DESCRIPTIONS_FILE, MANIFEST_FILE, TENSORS_FILE, KnowledgeBase,
                                         _fsync_dir, load_knowledge_base, save_knowledge_base)

VERSIONS_DIR = "versions"
LOG_FILE = "log.json"
BASE_FILES = (MANIFEST_FILE, TENSORS_FILE, DESCRIPTIONS_FILE)


@dataclass
class VersionRecord:
    """One version of a base: its number, the change that made it, who made it and when, and its digest."""

    version: int
    change: str  # build | add | remove | revert
    detail: dict = field(default_factory=dict)
    who: str = ""
    when: str = ""
    digest: str = ""
    classes: int = 0
    images: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "VersionRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def format(self) -> str:
        what = ", ".join(f"{k}={v}" for k, v in self.detail.items())
        return (f"{self.version:>4}  {self.when:<25} {self.who:<20} {self.change:<7} {self.classes:>6} classes "
                f"{self.images:>7} images  {self.digest[:16]}  {what}")


def content_digest(manifest: dict) -> str:
    """What the base answers with, from its sealed manifest: the file checksums (tensors, descriptions) and
    the fields System 1 and the re-ranker read. Not the version block, time or build statistics, so a
    revert to version n has version n's digest."""
    body = {"checksums": manifest.get("checksums"), "fusion": manifest.get("fusion"),
            "classes": [c["name"] for c in sorted(manifest.get("classes", []), key=lambda c: c["id"])],
            "support": manifest.get("support"), "root": (manifest.get("data") or {}).get("root"),
            "encoder": (manifest.get("encoder") or {}).get("key")}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record_of(manifest: dict, version: int, change: str, detail: dict, who: str, when: str) -> VersionRecord:
    return VersionRecord(version=version, change=change, detail=detail, who=who, when=when,
                         digest=content_digest(manifest), classes=len(manifest.get("classes", [])),
                         images=len(manifest.get("support", [])))


def read_log(path: str | Path) -> list[VersionRecord]:
    """The versions of the base at `path`, oldest first (one "build" record for a base never changed)."""
    path = Path(path)
    log_file = path / VERSIONS_DIR / LOG_FILE
    if log_file.is_file():
        try:
            return [VersionRecord.from_json(r) for r in read_json(log_file)]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise KnowledgeBaseError(f"{log_file} cannot be read ({e}): the version log is damaged; the base "
                                     "itself still loads, rebuild it with fgvr build-kb to start a new log") from None
    manifest = load_knowledge_base(path).manifest
    return [_record_of(manifest, 1, "build", {}, "", str(manifest.get("created", "")))]


def recover(path: str | Path) -> None:
    """Undo what a change killed mid-way left behind (call under the base's lock): a base moved aside but
    not replaced is renamed back, staging folders are removed."""
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        os.rename(olds[-1], path)
        olds = olds[:-1]
    for stale in olds + list(path.parent.glob(f".{path.name}.stage-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """dst as a copy of src made of hard links (a plain copy where the file system refuses links)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def _snapshot(base_dir: Path, into: Path) -> None:
    into.mkdir(parents=True)
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            _link_tree(base_dir / name, into / name)


def _swap(stage: Path, path: Path) -> None:
    """Two renames: the old base aside, the staged one in; then the old one is deleted."""
    old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(path, old)
    os.rename(stage, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def commit_version(path: str | Path, kb: KnowledgeBase, change: str, detail: dict,
                   edit_stage: Callable[[Path], None] | None = None) -> VersionRecord:
    """Write `kb` as the next version of the base at `path` (the caller holds its `output_lock`).

    The whole new base is staged beside the old one and swapped in by rename (see the module docstring);
    the log gains one record. Returns it. `edit_stage(stage)` may change what was carried along (such as
    `experience/`) before the swap; it must replace files (write and rename), never write into them, as
    they are hard links to the old version's.
    """
    path = Path(path).absolute()
    history = read_log(path)
    number, who, when = history[-1].version + 1, _who(), _now()
    kb.manifest = {**kb.manifest, "version": {"number": number, "change": change, "who": who, "when": when}}
    stage = path.parent / f".{path.name}.stage-{os.getpid()}-{time.time_ns()}"
    try:
        save_knowledge_base(kb, stage)
        versions = stage / VERSIONS_DIR
        if (path / VERSIONS_DIR).is_dir():
            _link_tree(path / VERSIONS_DIR, versions)
            (versions / LOG_FILE).unlink()  # rewritten below (a link to the old log must not be written through)
        else:  # the first change: version 1 is the base as built
            _snapshot(path, versions / "1")
        _snapshot(stage, versions / str(number))
        for entry in path.iterdir():  # experience rules and anything else kept with the base
            if entry.name not in BASE_FILES and entry.name != VERSIONS_DIR:
                _link_tree(entry, stage / entry.name)
        if edit_stage is not None:
            edit_stage(stage)
        record = _record_of(kb.manifest, number, change, detail, who, when)
        log_bytes = (json.dumps([r.to_json() for r in history + [record]], indent=2, ensure_ascii=False) + "\n")
        with open(versions / LOG_FILE, "w", encoding="utf-8") as f:
            f.write(log_bytes)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(versions)
        _swap(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    kb.path = path
    return record


def load_version(path: str | Path, version: int) -> KnowledgeBase:
    """Version `version` of the base at `path`, as it was (checksums verified)."""
    path = Path(path)
    known = [r.version for r in read_log(path)]
    if version not in known:
        raise KnowledgeBaseError(f"{path} has no version {version}; its versions are {known[0]}..{known[-1]} "
                                 f"(see `fgvr kb log {path}`)")
    snap = path / VERSIONS_DIR / str(version)
    if not snap.is_dir():
        if version == known[-1]:
            return load_knowledge_base(path)
        raise KnowledgeBaseError(f"{snap} is missing: version {version} cannot be restored")
    return load_knowledge_base(snap)
