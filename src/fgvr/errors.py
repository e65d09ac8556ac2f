"""fgvr's own user-facing errors: what the `fgvr` command shows as one line, with a distinct exit code.

An error of one of these types means "the input, the setting or the machine is not as it must be, and the
message says what to do". The command prints `fgvr: error: <message>` and exits with the type's code.
Anything else that escapes a command is a bug in fgvr: it is shown with its traceback, never dressed up as
a user mistake (a `ValueError` from a programming error must not read like bad input). `--debug` or
`FGVR_DEBUG=1` shows the traceback of fgvr's own errors too.

The types of the steps keep their names and their historical bases (`DataError` is still a `ValueError`,
`EvaluateError` a `RuntimeError`), so old `except` clauses keep working; they also derive from one of
the families below, which sets the exit code.

Exit codes (1 is left to Python's default for an unexpected error, 2 to click's usage errors):

    2  usage: an option out of range, two options that exclude each other (click's own code)
    3  InputError         the data: a folder, manifest, image list or classes file
    4  KnowledgeBaseError the knowledge base: missing, damaged, from another encoder or version
    5  ModelError         a model or runtime: unknown spec, missing folder, memory budget, a served VLM or
                          Ray cluster that cannot be reached
    6  RunMismatchError   a run folder holds a run made with other inputs or settings
    7  LockedError        another fgvr process is writing the same output
    8  StorageError       the disk: full, read-only, permission denied, a path that cannot be a folder
    9  System2Error       System 2 failed for every image that needed it
   10  NothingDoneError   no input could be processed at all (every image unreadable)
"""

from __future__ import annotations

import errno
import os


class FgvrError(Exception):
    """Base of every user-facing fgvr error."""

    exit_code = 1


class UsageError(FgvrError):
    """An option value that makes no sense (caught at parse time where possible)."""

    exit_code = 2


class InputError(FgvrError):
    """The data given cannot be used as it is."""

    exit_code = 3


class KnowledgeBaseError(FgvrError, ValueError):
    """A base that cannot be built, loaded or used as asked; the message says what to do."""

    exit_code = 4


class ModelError(FgvrError):
    """A model that cannot be found, loaded or placed on the device asked for."""

    exit_code = 5


class SpecError(ModelError, ValueError):
    """A model spec that names nothing loadable; the message says what to fetch or type instead."""


class RunMismatchError(FgvrError):
    """A resume whose inputs or answer-changing settings differ from the run it would continue."""

    exit_code = 6


class LockedError(FgvrError):
    """Another live process holds the output's lock."""

    exit_code = 7


class StorageError(FgvrError):
    """The file system refused: disk full, read-only, permission denied, not a directory."""

    exit_code = 8


class System2Error(FgvrError):
    """System 2 failed for every image that was sent to it: the run's answers are System 1's alone."""

    exit_code = 9


class NothingDoneError(FgvrError):
    """Not a single input could be processed."""

    exit_code = 10


# OS errors that mean "the machine, not fgvr": mapped to StorageError with the file named.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists",
}


def storage_error(exc: OSError) -> StorageError | None:
    """The one-line StorageError for an OSError whose cause is the file system (None for any other)."""
    reason = _STORAGE_ERRNOS.get(exc.errno or -1)
    if reason is None:
        return None
    where = exc.filename if exc.filename is not None else None
    what = f"{where}: {reason}" if where else reason
    if exc.filename2:
        what += f" (with {exc.filename2})"
    hint = {errno.ENOSPC: "free some space or write elsewhere, then rerun (finished work is kept)",
            errno.EDQUOT: "free some space or write elsewhere, then rerun (finished work is kept)",
            errno.EROFS: "choose a writable --out",
            errno.EACCES: "check the permissions, or choose another path",
            errno.EPERM: "check the permissions, or choose another path",
            errno.ENOTDIR: "choose an --out whose parents are folders"}.get(exc.errno or -1, "check the path")
    return StorageError(f"{what}: {hint}")


_debug = [False]


def set_debug(on: bool) -> None:
    """`fgvr --debug` (set for each invocation, so one command's flag does not outlive it in-process)."""
    _debug[0] = bool(on)


def debug_enabled() -> bool:
    """--debug, or FGVR_DEBUG=1 (any value but '', '0', 'false', 'no')."""
    return _debug[0] or os.environ.get("FGVR_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
