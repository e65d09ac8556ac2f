"""Experience rules as inference reads them: the `Rule` record, the stored library, retrieval by classes.

Small on purpose and free of the build machinery (`fgvr.experience`: reflection, trials, JSON repair), so
the slow path and the pipeline import it without pulling in the build, and without an import cycle.

Storage, inside the knowledge base directory: `experience/rules.json`

    {"format_version": 1, "rules": [...], "build": {"images": {"propose": [...], "accept": [...],
                                                                 "report": [...]}}}

`build.images` lists the held-out images the build used (resolved paths): `fgvr evaluate` leaves them out
like support images, because the rules were chosen on them (see `experience_images`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

from fgvr.errors import InputError
from fgvr.io import atomic_write_json, read_json

FORMAT_VERSION = 1
EXPERIENCE_DIR = "experience"
RULES_FILE = "rules.json"


class ExperienceError(InputError, RuntimeError):
    """A rules file that cannot be used; the message names the file and what to do."""


def normalise_name(name: str) -> str:
    """Class names as a VLM writes them back: case, '_' / '-', quotes and stray punctuation do not matter."""
    s = str(name).strip().strip("\"'`“”‘’").lower().replace("_", " ").replace("-", " ")
    s = re.sub(r"\s+", " ", s)
    return s.strip(" .,;:!?")


@dataclass
class Rule:
    """One learned rule. `effect` and `support` are measured when it was accepted (see `Trial`)."""

    id: str
    classes: list[str]  # class names it concerns (>= 1, typically two confusable ones)
    cue: str  # the discriminative visual cue, a few words
    text: str  # the rule itself, one or two sentences
    applies_when: str = ""
    support: int = 0  # validation images its effect was measured on
    effect: float = 0.0  # accuracy change on those images when the rule is in the prompt
    fixed: int = 0  # images it turned right
    broken: int = 0  # images it turned wrong
    proposals: int = 1  # how many mistakes proposed it (merged duplicates add up)
    created_round: int = 0
    source_image: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Rule":
        """A rule from rules.json; ValueError naming the field that is missing or of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"a rule is a JSON object, got {type(d).__name__}")
        for name in ("id", "cue", "text"):
            if not isinstance(d.get(name), str):
                raise ValueError(f"a rule needs a string {name!r}")
        if not isinstance(d.get("classes"), list) or not all(isinstance(c, str) for c in d["classes"]):
            raise ValueError("a rule's 'classes' is a list of class names")
        for f in fields(cls):
            v = d.get(f.name)
            if f.name in d and f.type in ("int", "float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"a rule's {f.name!r} is a number, got {v!r}")
            if f.name in d and f.type == "str" and not isinstance(v, str):
                raise ValueError(f"a rule's {f.name!r} is a string, got {v!r}")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def overlap(self, names: Iterable[str]) -> int:
        """How many of this rule's classes are among `names`."""
        wanted = {normalise_name(n) for n in names}
        return sum(normalise_name(c) in wanted for c in self.classes)


class ExperienceLibrary:
    """The accepted rules of one knowledge base, and retrieval by candidate classes."""

    def __init__(self, rules: list[Rule] | None = None, classes: Sequence[str] | None = None,
                 path: Path | None = None) -> None:
        self.rules: list[Rule] = list(rules or [])
        self.classes = list(classes) if classes is not None else None  # for retrieval by class id
        self.path = path  # the experience/ directory
        self.images: dict[str, list[str]] = {}  # part -> resolved paths of the images the build used

    @classmethod
    def load(cls, kb_path: str | Path, classes: Sequence[str] | None = None) -> "ExperienceLibrary":
        """The library stored in `kb_path/experience/`; empty if none was built yet."""
        d = Path(kb_path) / EXPERIENCE_DIR
        f = d / RULES_FILE
        if not f.is_file():
            return cls([], classes, d)
        try:
            data = read_json(f)
        except (OSError, ValueError) as e:
            raise ExperienceError(f"{f}: cannot read the rules ({e}); delete it and rerun `fgvr build-experience`") from e
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise ExperienceError(
                f"{f}: format_version {version!r}, this fgvr reads {FORMAT_VERSION}; rebuild it with "
                "`fgvr build-experience`"
            )
        rules, build = data.get("rules", []), data.get("build") or {}
        images = build.get("images") if isinstance(build, dict) else None
        if not isinstance(rules, list) or not isinstance(build, dict) or not isinstance(images, (dict, type(None))) \
                or not all(isinstance(v, list) for v in (images or {}).values()):
            raise ExperienceError(f"{f}: 'rules' must be a list and 'build' an object of image lists; delete it and "
                                  "rerun `fgvr build-experience`")
        try:
            parsed = [Rule.from_json(r) for r in rules]
        except ValueError as e:
            raise ExperienceError(f"{f}: {e}; delete it and rerun `fgvr build-experience`") from None
        lib = cls(parsed, classes, d)
        lib.images = {str(k): [str(p) for p in v] for k, v in (images or {}).items()}
        return lib

    def save(self) -> None:
        if self.path is None:
            raise ExperienceError("this library has no directory to save to")
        atomic_write_json(self.path / RULES_FILE,
                          {"format_version": FORMAT_VERSION, "rules": [r.to_json() for r in self.rules],
                           "build": {"images": self.images}})

    def _names(self, candidates: Iterable[int | str]) -> list[str]:
        names = []
        for c in candidates:
            if isinstance(c, str):
                names.append(c)
            else:
                if self.classes is None:
                    raise ExperienceError("retrieval by class id needs the knowledge base's class list")
                names.append(self.classes[int(c)])
        return names

    def retrieve(self, candidates: Iterable[int | str], n: int = 3) -> list[Rule]:
        """At most `n` rules whose classes meet the candidates: best measured effect first.

        Ties on effect go to the rule with a larger share of its classes among the candidates (a rule
        about shirt/T-shirt fits a shirt/T-shirt query better than one about shirt/coat), then more support.
        """
        names = self._names(candidates)
        hits = [(r.overlap(names) / max(1, len(r.classes)), r) for r in self.rules]
        hits = [(o, r) for o, r in hits if o > 0]
        hits.sort(key=lambda t: (-t[1].effect, -t[0], -t[1].support))
        return [r for _, r in hits[: max(0, n)]]

    def next_id(self) -> str:
        taken = {r.id for r in self.rules}
        i = len(self.rules) + 1
        while f"r{i}" in taken:
            i += 1
        return f"r{i}"

    def describe(self) -> str:
        if not self.rules:
            return "experience: no rules (build them with `fgvr build-experience KB DATA`)"
        lines = [f"experience: {len(self.rules)} rule(s)"]
        for r in sorted(self.rules, key=lambda r: -r.effect):
            lines.append(
                f"  {r.id}  [{' / '.join(r.classes)}]  effect {r.effect:+.3f} "
                f"(fixed {r.fixed}, broke {r.broken}, on {r.support} images; proposed {r.proposals}x)"
            )
            lines.append(f"      {r.text}" + (f"  (cue: {r.cue})" if r.cue else ""))
        return "\n".join(lines)


def describe_rules(kb_path: str | Path) -> str:
    """What `fgvr kb show` prints about the experience library of a base."""
    return ExperienceLibrary.load(kb_path).describe()


def experience_images(kb_path: str | Path | None) -> set[str]:
    """Resolved paths of the images an experience build used on this base (empty if it has no rules).

    A base whose rules were proposed and accepted on some images must not be scored on them: like support
    images, they are left out of an evaluation. A library without rules changes no prompt, so nothing is
    left out for it.
    """
    if kb_path is None or not (Path(kb_path) / EXPERIENCE_DIR / RULES_FILE).is_file():
        return set()
    lib = ExperienceLibrary.load(kb_path)
    if not lib.rules:
        return set()
    if not any(lib.images.values()):  # written before builds recorded their images: which to leave out is unknown
        raise ExperienceError(
            f"{lib.path / RULES_FILE}: {len(lib.rules)} rule(s) but no record of the images they were chosen on, "
            "so an evaluation could score those very images; rebuild them with `fgvr build-experience --fresh`")
    return {p for paths in lib.images.values() for p in paths}
