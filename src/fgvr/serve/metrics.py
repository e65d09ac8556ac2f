"""The server's metrics in Prometheus text format: requests, latency, paths taken, model memory."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fgvr.pipeline import Result

# Methods counted by name; any other (an invented one included) is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REFUSALS = ("host", "token")  # requests refused before routing, counted by reason only

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters and histograms in Prometheus text format, kept by hand (no client library needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, list[float]] = {}  # route -> bucket counts (+Inf last), then sum
        self.images: dict[str, int] = {}
        self.slow_ran = 0
        self.batches = {"encoder": [0, 0], "system2": [0, 0]}  # batches, images
        self.refusals = dict.fromkeys(REFUSALS, 0)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request. `route` must be a route template (or "static"/"other"): the labels come
        from a closed set, so no request can add a series."""
        with self._lock:
            key = (method if method in METHODS else "other", route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 2))
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[len(LATENCY_BUCKETS)] += 1
            h[-1] += seconds

    def refused(self, reason: str) -> None:
        """A request refused before routing (wrong Host, no token): counted by reason, nothing else kept."""
        with self._lock:
            if reason in self.refusals:
                self.refusals[reason] += 1

    def result(self, r: Result) -> None:
        with self._lock:
            self.images[r.path_taken] = self.images.get(r.path_taken, 0) + 1
            self.slow_ran += bool(r.slow_ran)

    def batch(self, queue: str, n: int) -> None:
        with self._lock:
            self.batches[queue][0] += 1
            self.batches[queue][1] += n

    def render(self, extra: list[str]) -> str:
        out = ["# HELP fgvr_requests_total HTTP requests answered, by method, route and status.",
               "# TYPE fgvr_requests_total counter"]
        with self._lock:
            for (m, route, status), n in sorted(self.requests.items()):
                out.append(f'fgvr_requests_total{{method="{m}",route="{route}",status="{status}"}} {n}')
            out += ["# HELP fgvr_request_duration_seconds Time from request to response, by route.",
                    "# TYPE fgvr_request_duration_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                for b, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], h[:-1]):
                    out.append(f'fgvr_request_duration_seconds_bucket{{route="{route}",le="{b}"}} {n}')
                out.append(f'fgvr_request_duration_seconds_sum{{route="{route}"}} {h[-1]:.6f}')
                out.append(f'fgvr_request_duration_seconds_count{{route="{route}"}} {h[len(LATENCY_BUCKETS)]}')
            out += ["# HELP fgvr_refused_total Requests refused before routing, by reason (host, token).",
                    "# TYPE fgvr_refused_total counter"]
            out += [f'fgvr_refused_total{{reason="{r}"}} {n}' for r, n in sorted(self.refusals.items())]
            out += ["# HELP fgvr_images_total Images classified, by the path they took.",
                    "# TYPE fgvr_images_total counter"]
            out += [f'fgvr_images_total{{path="{p}"}} {n}' for p, n in sorted(self.images.items())]
            out += ["# HELP fgvr_slow_path_total Images System 2 looked at.", "# TYPE fgvr_slow_path_total counter",
                    f"fgvr_slow_path_total {self.slow_ran}",
                    "# HELP fgvr_batches_total Model calls made by each queue's worker.",
                    "# TYPE fgvr_batches_total counter"]
            out += [f'fgvr_batches_total{{queue="{q}"}} {b}' for q, (b, _) in self.batches.items()]
            out += ["# HELP fgvr_batched_images_total Images those calls carried (divide for the mean batch size).",
                    "# TYPE fgvr_batched_images_total counter"]
            out += [f'fgvr_batched_images_total{{queue="{q}"}} {n}' for q, (_, n) in self.batches.items()]
        return "\n".join(out + extra) + "\n"


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def model_memory_lines() -> list[str]:
    """The registry's ledger as gauges: bytes per loaded model and per device."""
    from fgvr.models import registry

    rep = registry.report()
    out = ["# HELP fgvr_model_bytes Memory of each model the registry holds (measured, else estimated).",
           "# TYPE fgvr_model_bytes gauge"]
    for m in rep.models:
        b = m.measured_bytes if m.measured_bytes is not None else (m.estimated_bytes or 0)
        out.append(f'fgvr_model_bytes{{model="{_label(m.name)}",family="{m.family}",device="{m.device}",'
                   f'state="{m.state}"}} {b}')
    out += ["# HELP fgvr_device_model_bytes Bytes on the registry's ledger per device.",
            "# TYPE fgvr_device_model_bytes gauge"]
    out += [f'fgvr_device_model_bytes{{device="{d.device}"}} {d.current}' for d in rep.devices]
    rss = resident_bytes()
    if rss is not None:
        out += ["# HELP fgvr_process_resident_bytes Resident memory of the server process.",
                "# TYPE fgvr_process_resident_bytes gauge", f"fgvr_process_resident_bytes {rss}"]
    return out
