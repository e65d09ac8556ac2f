"""experience/log.jsonl: the build's append-only record of its decisions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class ExperienceLog:
    """experience/log.jsonl: append-only. A resumed build re-derives the decision for an image it had not
    checkpointed; the (round, image, event) key keeps that from writing the line twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # present from the start, so an empty log means "no decision yet", not "no build"
        with open(path, "rb+") as f:  # a kill mid-line leaves a fragment: end it, so the next line is whole
            if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                f.write(b"\n")
        self.keys: set[tuple] = set()
        self.rejected: list[dict] = []  # rejected rule proposals, for "never propose it again"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: ignore it
            self.keys.add((rec.get("round"), rec.get("image"), rec.get("event")))
            if rec.get("event") == "rejected" and isinstance(rec.get("rule"), dict):
                self.rejected.append(rec["rule"])

    def write(self, event: str, round_: int, image: str | None, **data: Any) -> None:
        key = (round_, image, event)
        if key in self.keys:
            return
        self.keys.add(key)
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "round": round_, "image": image, "event": event, **data}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
        if event == "rejected" and isinstance(data.get("rule"), dict):
            self.rejected.append(data["rule"])
