"""Explicit memory probes: each one either measures its device or refuses.

On CPU-only torch, `torch.cuda.memory_allocated()` returns 0 instead of failing, so a monitor built on it
reports "all clear" on a machine where it measures nothing. Every measurement here goes through a probe
made for one device, and the CUDA probe raises `ProbeUnavailable` where CUDA is not there.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass


class ProbeUnavailable(RuntimeError):
    """This probe cannot measure on this machine (e.g. a CUDA probe without CUDA)."""


@dataclass(frozen=True)
class Reading:
    device: str
    used: int  # bytes in use now (CPU: resident set; CUDA: allocated by torch tensors)
    peak: int  # high-water mark since the process started or the last reset
    reserved: int | None = None  # CUDA: held by the caching allocator (what nvidia-smi sees, less context)
    total: int | None = None  # device capacity where known


class CpuProbe:
    """Resident set size of this process, from /proc (Linux) or getrusage elsewhere."""

    device = "cpu"

    def used_bytes(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return self.peak_bytes()  # no /proc: the peak is the best figure getrusage gives

    def peak_bytes(self) -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux

    def total_bytes(self) -> int | None:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None

    def read(self) -> Reading:
        return Reading("cpu", self.used_bytes(), self.peak_bytes(), None, self.total_bytes())


class CudaProbe:
    """torch's CUDA allocator statistics for one device; refuses to exist where CUDA is not available."""

    def __init__(self, device: str = "cuda:0") -> None:
        import torch

        if not torch.cuda.is_available():
            raise ProbeUnavailable(
                f"cannot measure {device}: torch.cuda is not available here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). "
                "Run on a machine with a GPU, or measure the CPU with CpuProbe."
            )
        d = torch.device(device)
        index = d.index if d.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ProbeUnavailable(f"cannot measure {device}: only {torch.cuda.device_count()} CUDA device(s)")
        self._torch = torch
        self.index = index
        self.device = f"cuda:{index}"

    def used_bytes(self) -> int:
        return int(self._torch.cuda.memory_allocated(self.index))

    def peak_bytes(self) -> int:
        return int(self._torch.cuda.max_memory_allocated(self.index))

    def reserved_bytes(self) -> int:
        return int(self._torch.cuda.memory_reserved(self.index))

    def peak_reserved_bytes(self) -> int:
        return int(self._torch.cuda.max_memory_reserved(self.index))

    def total_bytes(self) -> int:
        return int(self._torch.cuda.get_device_properties(self.index).total_memory)

    def reset_peak(self) -> None:
        self._torch.cuda.reset_peak_memory_stats(self.index)

    def read(self) -> Reading:
        return Reading(self.device, self.used_bytes(), self.peak_bytes(), self.reserved_bytes(), self.total_bytes())


def probe_for(device: str) -> CpuProbe | CudaProbe:
    """The probe for a normalised device name; raises ProbeUnavailable where it cannot measure."""
    if device == "cpu":
        return CpuProbe()
    if device.startswith("cuda"):
        return CudaProbe(device)
    raise ProbeUnavailable(f"no memory probe for device {device!r}")
