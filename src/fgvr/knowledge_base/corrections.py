"""Corrections: a person says an answer was wrong and names the right class; an operator accepts or rejects.

    q = CorrectionQueue("kb/")
    c = q.submit(image_bytes, "red disc", who="ana", replaced={"prediction_name": "blue stripes"})
    q.accept(c.id, who="operator")   # the same code as `fgvr kb add kb IMAGE --label "red disc"`: a new version
    q.undo(c.id, who="operator")     # removes that image again (`kb remove --image`): another new version

The queue lives beside the base, in `<base>.corrections/` (not inside it: a base change swaps the base's
folder by rename, and a correction written meanwhile must not be lost with the old folder):

    images/<sha256>.<ext>   the uploaded image, content-addressed (the same photo twice is one file)
    records/<id>.json       one correction: its state, the class it names, who, when, the answer it replaced,
                            every state change (who, when, the base version it made), contradicted rules

Every write is atomic (write, then rename). Nothing is ever deleted: a rejected or undone correction keeps its
record and its image, and undo is a new base version, never a rewrite of the base's history.

An accepted correction that names class X for an image answered Y is reported against the experience rules
that concern both X and Y (rules name the classes they concern), and against any rule the replaced answer
cited that concerns Y: those rules steered toward Y on the kind of confusion the person corrected.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from fgvr.errors import KnowledgeBaseError
from fgvr.io import atomic_write_bytes, atomic_write_json, read_json
from fgvr.locks import output_lock

QUEUE_SUFFIX = ".corrections"
STATES = ("pending", "accepted", "rejected", "undone")
MAX_LABEL = 200  # characters of a class name given in a correction
MAX_WHO = 64  # characters of a client-supplied name
MAX_NOTE = 500
MAX_RULES_CITED = 32
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class CorrectionError(KnowledgeBaseError):
    """A correction that cannot be made, found or changed as asked; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Correction:
    """One correction and what became of it."""

    id: str
    label: str  # the class the person says the image is
    new_class: bool  # whether `label` was not a class of the base when the correction was made
    image: str  # the stored image (absolute path, content-addressed)
    sha256: str
    who: str
    authenticated: bool  # made with the server's token (else `who` is only what the client said)
    when: str
    replaced: dict = field(default_factory=dict)  # the answer it replaced: prediction_name, confidence, ...
    base_version: int = 0  # the base version the answer came from
    note: str = ""
    state: str = "pending"
    version: int | None = None  # the base version its accept made
    undo_version: int | None = None  # the base version its undo made
    contradicted_rules: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # every state change: state, who, when, version

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Correction":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def format(self) -> str:
        was = self.replaced.get("prediction_name") or "?"
        rules = f"  contradicts rules {', '.join(self.contradicted_rules)}" if self.contradicted_rules else ""
        ver = f" v{self.version}" if self.version else ""
        return (f"{self.id}  {self.state:<8}{ver:<5} {self.when:<25} {self.who[:20]:<20} "
                f"{was!r} -> {self.label!r}{' (new class)' if self.new_class else ''}{rules}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def queue_dir(kb_path: str | Path) -> Path:
    """Where the corrections of the base at `kb_path` are kept: `<base>.corrections/` beside it."""
    p = Path(kb_path).absolute()
    return p.parent / f"{p.name}{QUEUE_SUFFIX}"


def _image_format(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
    except Exception:  # noqa: BLE001 - whatever PIL raises, it is not an image we keep
        raise CorrectionError("the correction's image is not an image (unknown or unsupported format)") from None
    if fmt not in _FORMATS:
        raise CorrectionError(f"the correction's image is {fmt or 'of an unknown format'}: send "
                              f"{', '.join(_FORMATS)}", 415)
    return _FORMATS[fmt]


def _bounded(text: Any, limit: int, what: str) -> str:
    s = "" if text is None else str(text).strip()
    if len(s) > limit:
        raise CorrectionError(f"{what} is {len(s)} characters, over the limit of {limit}")
    if any(ord(ch) < 32 for ch in s):
        raise CorrectionError(f"{what} has control characters")
    return s


def _replaced(replaced: dict | None) -> dict:
    """The replaced answer's fields we keep, bounded (the client sends them; they are kept as sent)."""
    r = replaced or {}
    if not isinstance(r, dict):
        raise CorrectionError("'replaced' must be an object (the answer the correction replaces)")
    out: dict[str, Any] = {}
    for k in ("prediction_name", "path_taken"):
        if r.get(k) is not None:
            out[k] = _bounded(r[k], MAX_LABEL, f"replaced.{k}")
    for k in ("prediction",):
        if isinstance(r.get(k), int):
            out[k] = int(r[k])
    if isinstance(r.get("confidence"), (int, float)):
        out["confidence"] = float(r["confidence"])
    rules = r.get("rules_used") or []
    if not isinstance(rules, list) or len(rules) > MAX_RULES_CITED:
        raise CorrectionError(f"replaced.rules_used must be a list of at most {MAX_RULES_CITED} rule ids")
    if rules:
        out["rules_used"] = [_bounded(x, 100, "a rule id") for x in rules]
    return out


class CorrectionQueue:
    """The review queue of one base (see the module docstring). Writers take the queue's lock; an accept or
    undo also takes the base's own (inside `kb add` / `kb remove`), so the CLI and a server can share it."""

    def __init__(self, kb_path: str | Path) -> None:
        self.kb_path = Path(kb_path).absolute()
        self.dir = queue_dir(self.kb_path)
        self.images, self.records = self.dir / "images", self.dir / "records"

    # --- reading -------------------------------------------------------------------------------------
    def list(self, state: str | None = None) -> list[Correction]:
        """The corrections, oldest first; only those in `state` where one is given."""
        if state is not None and state not in STATES:
            raise CorrectionError(f"no correction state {state!r}: one of {', '.join(STATES)}")
        if not self.records.is_dir():
            return []
        out = []
        for f in self.records.glob("*.json"):
            try:
                out.append(Correction.from_json(read_json(f)))
            except (OSError, ValueError, TypeError) as e:
                raise CorrectionError(f"{f} cannot be read ({e}): move it aside to list the others", 500) from None
        out.sort(key=lambda c: (c.when, c.id))
        return [c for c in out if state is None or c.state == state]

    def get(self, cid: str) -> Correction:
        if not (isinstance(cid, str) and 0 < len(cid) <= 32 and cid.isalnum()):
            raise CorrectionError(f"no correction {str(cid)[:40]!r} (ids are letters and digits)", 404)
        f = self.records / f"{cid}.json"
        if not f.is_file():
            raise CorrectionError(f"no correction {cid!r} in {self.dir} (see `fgvr kb corrections {self.kb_path}`)", 404)
        return Correction.from_json(read_json(f))

    def _save(self, c: Correction) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.records / f"{c.id}.json", c.to_json())

    # --- writing -------------------------------------------------------------------------------------
    def submit(self, data: bytes, label: str, *, who: str = "", authenticated: bool = False,
               replaced: dict | None = None, note: str = "", classes: Sequence[str] | None = None,
               base_version: int = 0, max_bytes: int = 10 * 2**20) -> Correction:
        """Queue a correction: the image (stored by its content) and the class it should have been."""
        from fgvr.knowledge_base.storage import load_knowledge_base

        label = _bounded(label, MAX_LABEL, "the corrected class name")
        if not label:
            raise CorrectionError("the correction names no class: give the right class (or a new class name)")
        who = _bounded(who, MAX_WHO, "the name given") or "anonymous"
        note = _bounded(note, MAX_NOTE, "the note")
        if not data:
            raise CorrectionError("the correction has no image (0 bytes)")
        if len(data) > max_bytes:
            raise CorrectionError(f"the correction's image is {len(data):,} bytes, over the limit of {max_bytes:,}", 413)
        ext = _image_format(data)
        if classes is None:
            classes = load_knowledge_base(self.kb_path).classes
        sha = hashlib.sha256(data).hexdigest()
        img = self.images / f"{sha}.{ext}"
        with output_lock(self.dir, "kb corrections"):
            if not img.is_file():
                self.images.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(img, data)
            when = _now()
            c = Correction(id=secrets.token_hex(6), label=label, new_class=label not in classes, image=str(img),
                           sha256=sha, who=who, authenticated=authenticated, when=when,
                           replaced=_replaced(replaced), base_version=int(base_version), note=note,
                           history=[{"state": "pending", "who": who, "when": when}])
            self._save(c)
        return c

    def accept(self, cid: str, *, who: str = "operator", device: str = "cpu") -> Correction:
        """Add the correction's image under its class (`kb add`; a new class is allowed): a new version."""
        from fgvr.knowledge_base.incremental import add_images

        with output_lock(self.dir, "kb corrections"):
            c = self.get(cid)
            if c.state != "pending":
                raise CorrectionError(f"correction {cid} is {c.state}; only a pending one can be accepted", 409)
            summary = add_images(self.kb_path, [c.image], c.label, device=device)
            c.state, c.version = "accepted", summary.record.version
            c.contradicted_rules = contradicted_rules(self.kb_path, c)
            c.history.append({"state": "accepted", "who": who, "when": _now(), "version": c.version})
            self._save(c)
        return c

    def reject(self, cid: str, *, who: str = "operator") -> Correction:
        with output_lock(self.dir, "kb corrections"):
            c = self.get(cid)
            if c.state != "pending":
                raise CorrectionError(f"correction {cid} is {c.state}; only a pending one can be rejected", 409)
            c.state = "rejected"
            c.history.append({"state": "rejected", "who": who, "when": _now()})
            self._save(c)
        return c

    def undo(self, cid: str, *, who: str = "operator") -> Correction:
        """Take back an accept (the image is removed from the base as a new version; the class too, where
        the correction made it and it has no other image) or a reject (back to pending)."""
        from fgvr.knowledge_base.incremental import remove_from_base
        from fgvr.knowledge_base.storage import load_knowledge_base

        with output_lock(self.dir, "kb corrections"):
            c = self.get(cid)
            if c.state == "rejected":
                c.state = "pending"
                c.history.append({"state": "pending", "who": who, "when": _now(), "undo": "rejected"})
            elif c.state == "accepted":
                kb = load_knowledge_base(self.kb_path)
                mine = [s for s in kb.support_files() if Path(s.path).resolve() == Path(c.image).resolve()]
                if not mine:
                    raise CorrectionError(f"correction {cid}'s image is no longer a support image of {self.kb_path} "
                                          "(removed or reverted since): nothing to undo", 409)
                cls = kb.classes[mine[0].class_id]
                alone = int((kb.exemplar_labels == mine[0].class_id).sum()) == len(mine)
                if alone and c.new_class:
                    summary = remove_from_base(self.kb_path, class_name=cls)
                else:
                    summary = remove_from_base(self.kb_path, image=c.image)
                c.state, c.undo_version = "undone", summary.record.version
                c.history.append({"state": "undone", "who": who, "when": _now(), "version": c.undo_version})
            else:
                raise CorrectionError(f"correction {cid} is {c.state}: only an accepted or rejected one can be "
                                      "undone", 409)
            self._save(c)
        return c


def contradicted_rules(kb_path: str | Path, c: Correction) -> list[str]:
    """Ids of the base's experience rules the correction contradicts: rules that concern both the replaced
    answer's class and the corrected one, and rules the replaced answer cited that concern its class."""
    from fgvr.rules import ExperienceLibrary, normalise_name

    was = c.replaced.get("prediction_name")
    if not was or normalise_name(was) == normalise_name(c.label):
        return []
    lib = ExperienceLibrary.load(kb_path)
    want, got = normalise_name(c.label), normalise_name(was)
    cited = set(c.replaced.get("rules_used") or [])
    out = []
    for r in lib.rules:
        names = {normalise_name(x) for x in r.classes}
        if got in names and (want in names or r.id in cited):
            out.append(r.id)
    return out


def rule_report(corrections: Iterable[Correction]) -> dict[str, list[str]]:
    """rule id -> ids of the accepted corrections that contradict it."""
    out: dict[str, list[str]] = {}
    for c in corrections:
        if c.state == "accepted":
            for r in c.contradicted_rules:
                out.setdefault(r, []).append(c.id)
    return out
