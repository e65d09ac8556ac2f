"""Engines: who computes the `Result`s of a run, batch by batch.

`LocalEngine` runs the stages in this process; `fgvr.ray_run.RayEngine` has the same two methods on Ray.
Both `fgvr classify` (fgvr.collection) and `fgvr evaluate` (fgvr.evaluate) drive one; it lives here so
neither of those modules imports the other for it.
"""

from __future__ import annotations

from typing import Any, Iterator

from fgvr.pipeline import DualSystem, Result


class LocalEngine:
    """The stages in this process, batch by batch (the engine `fgvr classify` and `fgvr evaluate` use
    without --ray). `fgvr.ray_run.RayEngine` has the same two methods."""

    def __init__(self, system: DualSystem, batch_size: int = 16) -> None:
        self.system, self.batch_size = system, max(1, batch_size)

    def with_system(self, system: DualSystem) -> "LocalEngine":
        """The same engine running `system` (e.g. with the trigger a run calibrated); this one is left as it is."""
        return LocalEngine(system, self.batch_size)

    def encode(self, paths: list[str]) -> Iterator[tuple[list[str], Any]]:
        """(paths, EncodedBatch) per batch: decode + encode only (pass 1 of a run-calibrated evaluation)."""
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            yield chunk, self.system.encode_paths(chunk, keep_images=False)

    def classify(self, paths: list[str], cache: Any = None) -> Iterator[tuple[list[str], list[Result]]]:
        """(paths, Results) per batch: the whole dual system, or from System 1 on with cached embeddings."""
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            yield chunk, (self.system.classify_paths(chunk) if cache is None else cache.classify(self.system, chunk))
