"""One owner of the cores per process: the intra-op thread count, decided once and used by every runtime.

PyTorch's OpenMP pool and ONNX Runtime's own pool each default to "all cores"; two of them (or one per
HTTP worker, or one per Ray actor on a shared node) fight over the same cores and both slow down, which is
how a loaded 2-core machine once served fewer requests with 16 clients than with one. So the count comes
from one place, in this order:

1. `FGVR_THREADS` (a positive integer), set by the user or by a Ray actor for its own `num_cpus`;
2. the cgroup CPU quota (`/sys/fs/cgroup/cpu.max`, containers and CI runners), rounded up;
3. the cores this process may run on (`os.sched_getaffinity`), else `os.cpu_count()`.

`configure()` applies it to torch (intra-op threads, one inter-op thread) and records it in the
environment so that child processes and ONNX Runtime sessions (`intra_op_threads()`) agree.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FGVR_THREADS"
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_quota(path: Path = _CGROUP_CPU_MAX) -> int | None:
    """Cores the cgroup v2 quota allows ("max 100000" means no quota), or None."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def intra_op_threads() -> int:
    """The thread count every runtime in this process uses (see the module docstring for the order)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n > 0:
            return n
        log.warning("%s=%r is not a positive integer; using %d (the cores available)", ENV, raw,
                    available_cores())
    return available_cores()


def configure(threads: int | None = None) -> int:
    """Size the process's threads once: torch intra-op = `threads` (or `intra_op_threads()`), inter-op 1,
    and `FGVR_THREADS` set so ONNX Runtime sessions and child processes use the same count. Returns it."""
    import torch

    n = threads if threads and threads > 0 else intra_op_threads()
    os.environ[ENV] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)  # only allowed before any inter-op work has started
    except RuntimeError:
        pass
    return n
