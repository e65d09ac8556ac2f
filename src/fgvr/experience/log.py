"""experience/log.jsonl: the build's append-only record of its decisions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fgvr.run_dir import Journal


def _key(rec: dict[str, Any]) -> tuple:
    return (rec.get("round"), rec.get("image"), rec.get("event"))


class ExperienceLog:
    """experience/log.jsonl: append-only (a `fgvr.run_dir.Journal`: a line cut by a kill is dropped). A
    resumed build re-derives the decision for an image it had not checkpointed; the (round, image, event)
    key keeps that from writing the line twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # present from the start, so an empty log means "no decision yet", not "no build"
        self.journal = Journal(path, key=_key, valid=lambda r: "event" in r)
        self.rejected: list[dict] = []  # rejected rule proposals, for "never propose it again"
        for rec in self.journal.read():
            if rec.get("event") == "rejected" and isinstance(rec.get("rule"), dict):
                self.rejected.append(rec["rule"])

    @property
    def keys(self) -> set:
        return self.journal.keys

    def write(self, event: str, round_: int, image: str | None, **data: Any) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "round": round_, "image": image, "event": event, **data}
        if self.journal.append([rec]) and event == "rejected" and isinstance(data.get("rule"), dict):
            self.rejected.append(data["rule"])
