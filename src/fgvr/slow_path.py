"""System 2: a slow, careful look at one image and its top-k candidates.

Every System 2 meets the same small interface (`SlowPath.rank`), so the pipeline does not care whether a
VLM reasons over lettered options or a visual re-ranker compares exemplars: it gets, for each query, a
probability for each candidate, always a valid class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from PIL import Image

from fgvr.rules import normalise_name


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


class SlowPath(Protocol):
    """What the pipeline needs from a System 2. `name` says what it is (e.g. 'vlm-reasoner', 'visual-reranker')."""

    name: str

    def rank(self, queries: Sequence[SlowQuery]) -> list[SlowAnswer]: ...


# --- the VLM reasoner (Qwen2.5-VL option scoring) ------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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
                   rules: Sequence[Any] = ()) -> str:
    """The user turn: lettered candidates (with one-line descriptions), the rules, 'answer with the letter'.

    Only what System 1 and the experience library know goes in; the true label never does, so the same
    prompt serves at inference and while the experience library is being built.
    """
    if len(names) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} candidates can be lettered, got {len(names)}")
    lines = ["Which one of these is shown in the image?"]
    for letter, name in zip(LETTERS, names):
        desc = one_line((descriptions or {}).get(name))
        lines.append(f"{letter}. {name} — {desc}" if desc else f"{letter}. {name}")
    if rules:
        lines.append("Lessons from earlier mistakes:")
        for r in rules:
            cue = f" (look at: {r.cue})" if getattr(r, "cue", "") else ""
            lines.append(f"- {r.text}{cue}")
    lines.append("Answer with the letter only.")
    return "\n".join(lines)


def user_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def render_chat(processor: Any, messages: list[dict]) -> str:
    """The chat template's text for a conversation, ending with the assistant prefix."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def vlm_inputs(vlm: Any, texts: list[str], images: list[Image.Image]) -> Any:
    """Tokenise a batch (left-padded, so the last position of every row is its next-token position) with
    the pixel cap of the spec, on the model's device; pixel values in the model's dtype."""
    spec = vlm.spec
    kwargs = {}
    if spec.max_pixels:
        kwargs["max_pixels"] = spec.max_pixels
    if spec.min_pixels:
        kwargs["min_pixels"] = spec.min_pixels
    inputs = vlm.processor(text=texts, images=[im.convert("RGB") for im in images], padding=True,
                           padding_side="left", return_tensors="pt", **kwargs)
    param = next(vlm.model.parameters())
    inputs = inputs.to(param.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


def letter_token_ids(tokenizer: Any, prompt: str, k: int) -> list[int]:
    """The token the model would emit for each option letter right after the assistant prefix.

    After Qwen's '<|im_start|>assistant\\n' the letter is its own token without a leading space ('A' = 32,
    not ' A' = 362); checked here by tokenising prefix+letter rather than assumed.
    """
    tail = prompt[-64:]
    base = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:k]:
        full = tokenizer(tail + letter, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise RuntimeError(f"option letter {letter!r} does not tokenise as one token after the prompt")
        ids.append(full[-1])
    return ids


def vlm_generate(vlm: Any, texts: list[str], images: list[Image.Image],
                 max_new_tokens: int) -> list[tuple[str, int, int]]:
    """Greedy generation for a batch of rendered prompts: (text, tokens in, tokens out) per row."""
    import torch

    inputs = vlm_inputs(vlm, texts, images)
    tok = vlm.tokenizer
    stop = [i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, tok.eos_token_id)
            if isinstance(i, int) and i >= 0]
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    results = []
    for row, mask in zip(new, inputs["attention_mask"]):
        n_out = next((j for j, t in enumerate(row) if t in stop), len(row))
        text = tok.decode(row[:n_out], skip_special_tokens=True).strip()
        results.append((text, int(mask.sum()), n_out))
    return results


class VlmReasoner:
    """System 2 with a VLM: the image and System 1's top-k as lettered options; the answer is read by
    scoring the options, so it is always one of the candidates and comes with a distribution.

    The VLM is leased from the registry for the duration of `rank` only; this object keeps the spec.
    """

    name = "vlm-reasoner"

    def __init__(self, spec: Any, class_names: Sequence[str], descriptions: dict[str, str] | None = None,
                 rationale: bool = False, batch_size: int = 4, max_rules: int = 3,
                 rationale_tokens: int = 40) -> None:
        self.spec = spec
        self.class_names = list(class_names)
        self.descriptions = dict(descriptions or {})
        self.rationale = rationale
        self.batch_size = max(1, int(batch_size))
        self.max_rules = max_rules
        self.rationale_tokens = rationale_tokens

    def question(self, query: SlowQuery) -> tuple[str, list[Any]]:
        """The question for one query and the rules it uses (those that concern its candidates, at most N)."""
        names = [self.class_names[c] for c in query.candidates]
        rules = [r for r in query.rules if rule_concerns(r, names)][: self.max_rules]
        return build_question(names, self.descriptions, rules), rules

    def encode(self, vlm: Any, queries: Sequence[SlowQuery]) -> tuple[Any, list[str], list[list[Any]]]:
        """Rendered prompts → processor inputs for one batch; also the prompts and the rules used."""
        prompts, used = [], []
        for q in queries:
            question, rules = self.question(q)
            prompts.append(render_chat(vlm.processor, [user_turn(question)]))
            used.append(rules)
        return vlm_inputs(vlm, prompts, [q.image for q in queries]), prompts, used

    def rank(self, queries: Sequence[SlowQuery]) -> list[SlowAnswer]:
        from fgvr.models import registry

        answers: list[SlowAnswer] = []
        if not queries:
            return answers
        with registry.use(self.spec) as vlm:
            for i in range(0, len(queries), self.batch_size):
                answers.extend(self._rank_batch(vlm, queries[i : i + self.batch_size]))
        return answers

    def _rank_batch(self, vlm: Any, queries: Sequence[SlowQuery]) -> list[SlowAnswer]:
        import time

        import torch

        t0 = time.perf_counter()
        inputs, prompts, used = self.encode(vlm, queries)
        with torch.inference_mode():
            # logits_to_keep=1: only the next-token row is projected onto the 152k vocabulary; full logits
            # would cost (tokens x 152k) per sample, ~0.4 GB in bf16 for a 1,300-token prompt.
            logits = vlm.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        answers = []
        for row, (q, prompt, rules) in enumerate(zip(queries, prompts, used)):
            ids = letter_token_ids(vlm.tokenizer, prompt, len(q.candidates))
            probs = torch.softmax(logp[row, ids], dim=0).tolist()
            answers.append(SlowAnswer(probs=probs, tokens_in=int(inputs["attention_mask"][row].sum()),
                                      tokens_out=1, rules_used=[str(r.id) for r in rules]))
        if self.rationale:
            self._add_rationales(vlm, queries, answers)
        dt = (time.perf_counter() - t0) / len(queries)
        for a in answers:
            a.seconds = dt
        return answers

    def _add_rationales(self, vlm: Any, queries: Sequence[SlowQuery], answers: list[SlowAnswer]) -> None:
        """A short greedy 'why' after the chosen letter: the conversation goes on, the answer stays the
        scored one (the rationale explains, it never changes the prediction)."""
        texts = []
        for q, a in zip(queries, answers):
            question, _ = self.question(q)
            letter = LETTERS[max(range(len(a.probs)), key=a.probs.__getitem__)]
            messages = [user_turn(question), {"role": "assistant", "content": [{"type": "text", "text": letter}]},
                        {"role": "user", "content": [{"type": "text", "text": RATIONALE_QUESTION}]}]
            texts.append(render_chat(vlm.processor, messages))
        for a, (text, n_in, n_out) in zip(answers, vlm_generate(vlm, texts, [q.image for q in queries],
                                                                 self.rationale_tokens)):
            a.rationale = text
            a.tokens_in += n_in
            a.tokens_out += n_out
