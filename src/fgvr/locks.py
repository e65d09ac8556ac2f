"""One writer per output: `with output_lock(out, "evaluate"):` around everything a command writes to `out`.

Two processes writing the same run folder or knowledge base at once interleave their records (600 lines
for 300 images) or silently let the last writer win. The lock is an advisory `flock` on a file next to the
output (`<parent>/.<name>.lock`, of the real path with symlinks resolved; next to it, not inside, because a knowledge base directory is swapped
wholesale when it is saved). The kernel drops a `flock` when its holder dies, however it dies, so a lock
left by a killed process (kill -9, power cut) is simply taken over; the file's text (pid, host, command,
start time) only serves the message a second writer gets. The file is never deleted: unlinking a lock file
another process has just opened would let two holders exist.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fgvr.errors import LockedError, StorageError

log = logging.getLogger(__name__)


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of `out`, named after its real path: a symlink to a folder (or a path through one)
    locks the folder it leads to, so two names for one output cannot both be written at once."""
    out = Path(out).absolute().resolve()
    return out.parent / f".{out.name}.lock"


def _holder_text(f) -> str:
    f.seek(0)
    raw = f.read().decode("utf-8", "replace").strip()
    try:
        h = json.loads(raw)
        return (f"`fgvr {h.get('command', '?')}` (pid {h.get('pid', '?')} on {h.get('host', '?')}, "
                f"since {h.get('since', '?')})")
    except ValueError:
        return "another process (its lock file names no holder)"


_held: dict[Path, int] = {}  # locks this process holds, with their depth (a command and its step may both lock)


@contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the lock of `out` for the duration; a second writer gets a LockedError naming the holder.
    Re-entrant within a process: the command takes it before loading models, the step again inside."""
    path = lock_path(out)
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
            if not _held[path]:
                del _held[path]
        return
    for parent in Path(out).absolute().parents:  # a parent that is a file: say so, not "file exists"
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    f = os.fdopen(fd, "r+b")
    held = False
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(
                f"{Path(out)} is being written by {_holder_text(f)}: wait for it to finish (or stop it), or "
                "choose another --out"
            ) from None
        held = True
        f.seek(0)
        previous = f.read().decode("utf-8", "replace").strip()
        if previous:
            try:
                old = json.loads(previous)
                log.warning("taking over the lock of %s left by pid %s on %s (no longer running)", Path(out),
                            old.get("pid"), old.get("host"))
            except ValueError:
                pass
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me).encode())
        f.flush()
        _held[path] = 1
        try:
            yield path
        finally:
            _held.pop(path, None)
    finally:
        if held:
            try:
                f.seek(0)
                f.truncate()  # empty: released cleanly (a non-empty file was left by a dead holder)
                f.flush()
            except OSError:
                pass
        f.close()  # closing drops the flock
