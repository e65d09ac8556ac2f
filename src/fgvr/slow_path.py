"""System 2: a slow, careful look at one image and its top-k candidates.

Every System 2 meets the same small interface (`SlowPath.rank`), so the pipeline does not care whether a
VLM reasons over lettered options or a visual re-ranker compares exemplars: it gets, for each query, a
probability for each candidate, always a valid class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from PIL import Image

from fgvr.defaults import DEFAULTS
from fgvr.rules import normalise_name

# LETTERS and the chat helpers live with the backends; re-exported for callers that build conversations.
from fgvr.backends import LETTERS, user_turn  # noqa: F401
from fgvr.backends.transformers_vlm import letter_token_ids, render_chat, vlm_generate, vlm_inputs  # noqa: F401

if TYPE_CHECKING:
    from fgvr.backends import VlmBackend


@dataclass
class SlowQuery:
    """One image sent slow: its candidate class ids (System 1's top-k, best first) and the rules that concern them."""

    image: Image.Image
    candidates: list[int]
    rules: list[Any] = field(default_factory=list)  # fgvr.rules.Rule
    path: str | None = None


@dataclass
class SlowAnswer:
    """System 2's distribution over the query's candidates (same order), and what it cost."""

    probs: list[float]
    rationale: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    rules_used: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None  # this query's System 2 failed (the others in its batch may not have)
    none_prob: float | None = None  # the "none of these" option's probability, when it was offered (open set)


class SlowPath(Protocol):
    """What the pipeline needs from a System 2. `name` says what it is (e.g. 'vlm-reasoner', 'visual-reranker')."""

    name: str

    def rank(self, queries: Sequence[SlowQuery]) -> list[SlowAnswer]: ...


# --- the VLM reasoner (option scoring through a backend) --------------------------------------------------

RATIONALE_QUESTION = "In one short sentence: which visible feature decided your answer?"


def one_line(text: str | None, max_chars: int = 160) -> str:
    """The first line of a description, cut at a word boundary: the option list must stay short."""
    if not text:
        return ""
    first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    first = " ".join(first.split())
    if len(first) <= max_chars:
        return first
    return first[:max_chars].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def rule_concerns(rule: Any, names: Sequence[str]) -> bool:
    """A rule concerns a query when one of its classes is among the query's candidates."""
    wanted = {normalise_name(n) for n in names}
    return any(normalise_name(c) in wanted for c in getattr(rule, "classes", []))


def build_question(names: Sequence[str], descriptions: dict[str, str] | None = None,
                   rules: Sequence[Any] = (), none_option: bool = False) -> str:
    """The user turn: lettered candidates (with one-line descriptions), the rules, 'answer with the letter'.

    Only what System 1 and the experience library know goes in; the true label never does, so the same
    prompt serves at inference and while the experience library is being built. `none_option` (open set,
    `fgvr.open_set`) adds one more letter after the candidates: "none of these".
    """
    if len(names) + int(none_option) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options can be lettered, got {len(names)} candidates"
                         + (" and 'none of these'" if none_option else ""))
    lines = ["Which one of these is shown in the image?"]
    for letter, name in zip(LETTERS, names):
        desc = one_line((descriptions or {}).get(name))
        lines.append(f"{letter}. {name} — {desc}" if desc else f"{letter}. {name}")
    if none_option:
        from fgvr.open_set import NONE_OF_THESE

        lines.append(f"{LETTERS[len(names)]}. {NONE_OF_THESE} — the image shows something not listed above")
    if rules:
        lines.append("Lessons from earlier mistakes:")
        for r in rules:
            cue = f" (look at: {r.cue})" if getattr(r, "cue", "") else ""
            lines.append(f"- {r.text}{cue}")
    lines.append("Answer with the letter only.")
    return "\n".join(lines)


class VlmReasoner:
    """System 2 with a VLM: the image and System 1's top-k as lettered options; the answer is read by
    scoring the options, so it is always one of the candidates and comes with a distribution.

    The VLM is reached through an open backend (`fgvr.backends.get_backend`): in-process transformers or a
    served model; this class builds the question and reads the answer, the backend decides how the model is
    asked.
    """

    name = "vlm-reasoner"

    def __init__(self, backend: "VlmBackend", class_names: Sequence[str], descriptions: dict[str, str] | None = None,
                 rationale: bool = False, max_rules: int = DEFAULTS.rules, rationale_tokens: int = 40,
                 none_option: bool = False) -> None:
        if not hasattr(backend, "score_options"):
            raise TypeError(f"VlmReasoner needs an open backend (fgvr.backends.get_backend), not {backend!r}")
        self.backend = backend
        self.class_names = list(class_names)
        self.descriptions = dict(descriptions or {})
        self.rationale = rationale
        self.max_rules = max_rules
        self.rationale_tokens = rationale_tokens
        self.none_option = none_option  # open set: a "none of these" letter after the candidates

    @property
    def spec(self) -> Any:
        """The in-process model's spec (None for a served model)."""
        return getattr(self.backend, "spec", None)

    def describe(self) -> dict[str, Any]:
        return {"system2": self.name, **self.backend.describe()}

    def question(self, query: SlowQuery) -> tuple[str, list[Any]]:
        """The question for one query and the rules it uses (those that concern its candidates, at most N)."""
        names = [self.class_names[c] for c in query.candidates]
        rules = [r for r in query.rules if rule_concerns(r, names)][: self.max_rules]
        return build_question(names, self.descriptions, rules, none_option=self.none_option), rules

    def rank(self, queries: Sequence[SlowQuery]) -> list[SlowAnswer]:
        import time

        if not queries:
            return []
        t0 = time.perf_counter()
        asked = [self.question(q) for q in queries]
        extra = int(self.none_option)
        scores = self.backend.score_options([q for q, _ in asked], [q.image for q in queries],
                                            [len(q.candidates) + extra for q in queries])
        if len(scores) != len(queries):
            raise RuntimeError(f"the {self.backend.name} backend gave {len(scores)} answers for {len(queries)} questions")
        answers = []
        for s, q, (_, rules) in zip(scores, queries, asked):
            probs, none = list(s.probs), None
            if extra and len(probs) == len(q.candidates) + 1:  # the last letter is "none of these"
                probs, none = probs[:-1], float(probs[-1])
                if sum(probs) <= 0:  # all its mass on "none of these": no preference among the candidates
                    probs = [1.0 / len(probs)] * len(probs)
            answers.append(SlowAnswer(probs=probs, tokens_in=s.tokens_in, tokens_out=s.tokens_out,
                                      rules_used=[str(r.id) for r in rules], error=s.error, none_prob=none))
        if self.rationale:
            self._add_rationales(queries, asked, answers)
        dt = (time.perf_counter() - t0) / len(queries)
        for a in answers:
            a.seconds = dt
        return answers

    def _add_rationales(self, queries: Sequence[SlowQuery], asked: list[tuple[str, list[Any]]],
                        answers: list[SlowAnswer]) -> None:
        """A short greedy 'why' after the chosen letter: the conversation goes on, the answer stays the
        scored one (the rationale explains, it never changes the prediction)."""
        rows = [i for i, a in enumerate(answers) if a.error is None]
        conversations = []
        for i in rows:
            a = answers[i]
            letter = (LETTERS[len(a.probs)] if a.none_prob is not None and a.none_prob > max(a.probs, default=0.0)
                      else LETTERS[max(range(len(a.probs)), key=a.probs.__getitem__)])
            conversations.append([user_turn(asked[i][0]),
                                  {"role": "assistant", "content": [{"type": "text", "text": letter}]},
                                  {"role": "user", "content": [{"type": "text", "text": RATIONALE_QUESTION}]}])
        got = self.backend.generate(conversations, [[queries[i].image] for i in rows], self.rationale_tokens)
        for i, g in zip(rows, got):
            if g.error is None:
                answers[i].rationale = g.text
            answers[i].tokens_in += g.tokens_in
            answers[i].tokens_out += g.tokens_out


def system2_identity(slow: Any) -> str | None:
    """What answers as System 2, for the run a result is bound to: the loaded model's spec key, else the
    backend's own identity (`describe()["key"]`: a served model's URL, model, VLM family and pixel cap)."""
    if slow is None:
        return None
    spec = getattr(slow, "spec", None)
    if spec is not None:
        return spec.key
    key = getattr(getattr(slow, "backend", None), "key", None)
    if key is not None:
        return key
    describe = getattr(slow, "describe", None)
    return describe().get("key") if callable(describe) else None
