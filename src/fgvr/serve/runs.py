"""The run browser (--runs): evaluation runs under a folder, addressed by name, read and never modified."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgvr.serve.settings import UploadError

if TYPE_CHECKING:
    from fgvr.records import ResultRow


class RunBrowser:
    """Evaluation runs under a folder (or the folder itself if it is one run), addressed by folder name.
    Files are read from the names listed here, never from a name the request makes up."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    def list(self) -> dict[str, Path]:
        if (self.folder / "summary.json").is_file():
            return {self.folder.resolve().name: self.folder}
        if not self.folder.is_dir():
            return {}
        return {p.name: p for p in sorted(self.folder.iterdir()) if (p / "summary.json").is_file()}

    def get(self, name: str) -> Path:
        runs = self.list()
        if name not in runs:
            raise UploadError(404, f"no evaluation run named {name!r}")
        return runs[name]

    def summary(self, name: str) -> dict[str, Any]:
        """A run's summary.json; one that cannot be read as a JSON object is a 422 naming the run (the
        other runs stay browsable)."""
        f = self.get(name) / "summary.json"
        try:
            s = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UploadError(422, f"run {name}: summary.json cannot be read ({type(e).__name__}: "
                                   f"{str(e)[:120]}); rerun `fgvr evaluate` on it") from None
        if not isinstance(s, dict):
            raise UploadError(422, f"run {name}: summary.json is not a JSON object; rerun `fgvr evaluate` on it")
        return s

    def overview(self) -> dict[str, Any]:
        """Every run's headline numbers, and a warning for each run whose summary cannot be read (skipped)."""
        out, warnings = [], []
        for name in self.list():
            try:
                s = self.summary(name)
            except UploadError as e:
                warnings.append(e.reason)
                continue
            out.append({"name": name, "n_images": s.get("n_images"), "accuracy": s.get("accuracy"),
                        "slow_rate": s.get("slow_rate")})
        return {"runs": out, **({"warnings": warnings} if warnings else {})}

    def records(self, name: str) -> list[ResultRow]:
        """A run's result rows. A results file written by a newer fgvr (a record schema this one does not
        read) is a 409 naming the run's file, not a server error: the server is older than the run, and
        the other runs stay browsable."""
        from fgvr.records import RESULTS, RecordSchemaError, read_rows

        f = self.get(name) / RESULTS
        mtime = f.stat().st_mtime if f.is_file() else 0.0
        hit = self._cache.get(name)
        if hit is None or hit[0] != mtime:
            try:
                hit = (mtime, read_rows(f, repair=False))  # never modify a run from here
            except RecordSchemaError as e:
                raise UploadError(409, f"run {name}: {RESULTS} holds a record of schema {e.schema!r}, newer "
                                       f"than this server's fgvr reads ({e.known}); upgrade fgvr where the "
                                       f"server runs to browse it") from None
            self._cache[name] = hit
        return hit[1]


def cell_item(name: str, i: int, r: ResultRow) -> dict[str, Any]:
    """One record of a run as the confusion-cell view shows it (candidates best first)."""
    def score(c: Any) -> float:
        return c.final if c.final is not None else c.fast

    t = r.trigger or {}
    return {"n": i, "file": Path(r.path).name, "label": r.label, "label_id": r.label_id,
            "prediction": r.prediction, "prediction_name": r.prediction_name, "path_taken": r.path_taken,
            "confidence": r.confidence, "image": f"/v1/runs/{name}/image/{i}",
            "trigger": {"score": t.get("score"), "threshold": t.get("threshold")},
            "candidates": [{"id": c.id, "name": c.name, "score": score(c), "fast": c.fast, "slow": c.slow}
                           for c in sorted(r.candidates, key=lambda c: -(score(c) or 0))]}
