"""The held-out images a build learns from: which images, their three parts, accuracy per part."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fgvr.rules import ExperienceError

PARTS = ("propose", "accept", "report")


@dataclass
class Item:
    """A held-out validation image: its part of the build, and System 1's candidates (rules never change
    them; filled in by the first pass)."""

    path: str
    label: int
    part: str  # one of PARTS
    candidates: list[int] = field(default_factory=list)


@dataclass
class BuildSummary:
    rounds_run: int = 0
    images: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # images per part (propose / accept / report)
    wrong: int = 0  # wrong answers on propose images (over all rounds)
    fast_miss: int = 0  # wrong with the true class not among the candidates: no rule can fix those
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0
    merged: int = 0
    parse_failed: int = 0
    rules: int = 0
    # dual-system accuracy per part before any new rule and with the final rules. The REPORT part chose
    # nothing: its before/after is the out-of-sample effect of the rules; propose/accept are in-sample.
    accuracy_before: dict[str, float | None] = field(default_factory=dict)
    accuracy_after: dict[str, float | None] = field(default_factory=dict)
    similarity: str = ""
    skipped_classes: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _support_paths(kb: Any, dataset: Any) -> set[str]:
    """The images that built the prototypes: from the base's manifest, else re-drawn with its k and seed."""
    files = kb.support_files()
    if files:  # stored relative to the data root the base was built from, where possible
        return {str(f.path.resolve()) for f in files}
    from fgvr.data import split_k_shot

    k, seed = getattr(kb, "k", None), getattr(kb, "seed", None)
    if k is None or seed is None:
        raise ExperienceError(
            f"the knowledge base at {kb.path} records neither its support images nor its k and seed, so "
            "held-out images cannot be told apart from support ones; rebuild it with `fgvr build-kb`"
        )
    support, _ = split_k_shot(dataset, int(k), int(seed))
    return {str(Path(s.path).resolve()) for s in support}


def split_parts(samples: Sequence[Any], classes: Sequence[str]) -> list[Item]:
    """Held-out samples -> Items in three disjoint parts, stratified by class and deterministic.

    Within a class (paths sorted), image i goes to PARTS[(i + class id) % 3]: every class spreads over the
    parts as evenly as its count allows, and the rotation by class id spreads classes with one or two images
    too, so no part is empty while there are three images.
    """
    index = {c: i for i, c in enumerate(classes)}
    by_class: dict[int, list[str]] = {}
    for s in samples:
        by_class.setdefault(index[s.label], []).append(str(s.path))
    items = []
    for cid in sorted(by_class):
        for i, p in enumerate(sorted(by_class[cid])):
            items.append(Item(p, cid, PARTS[(i + cid) % len(PARTS)]))
    return items


def held_out(kb: Any, dataset: Any, max_per_class: int | None, summary: BuildSummary) -> list[Item]:
    """The labelled images of the base's classes that did not build it, split into the three parts."""
    support = _support_paths(kb, dataset)
    known = set(kb.classes)
    summary.skipped_classes = sorted({s.label for s in dataset.samples if s.label not in known})
    samples = [s for s in dataset.samples if s.label in known and str(Path(s.path).resolve()) not in support]
    if max_per_class:
        per: dict[str, int] = {}
        kept = []
        for s in samples:
            per[s.label] = per.get(s.label, 0) + 1
            if per[s.label] <= max_per_class:
                kept.append(s)
        samples = kept
    if not samples:
        raise ExperienceError(f"{dataset.root}: no labelled images outside the knowledge base's support set "
                              "(and of its classes) to learn from; pass a folder of held-out images")
    return split_parts(samples, kb.classes)


def accuracy_per_part(preds: Sequence[int], items: Sequence[Item]) -> dict[str, float | None]:
    """Accuracy per part ({part: None} where a part has no image)."""
    out: dict[str, float | None] = {}
    for part in PARTS:
        rows = [p == it.label for p, it in zip(preds, items) if it.part == part]
        out[part] = sum(rows) / len(rows) if rows else None
    return out
