"""Reflection: the only prompt that sees the true class, and the VLM reflector that answers it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    from fgvr.backends import VlmBackend


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
    descriptions and rationales): greedy, a few dozen tokens."""

    def __init__(self, backend: "VlmBackend", max_new_tokens: int = 160) -> None:
        if not hasattr(backend, "generate"):
            raise TypeError(f"VlmReflector needs an open backend (fgvr.backends.get_backend), not {backend!r}")
        self.backend = backend
        self.max_new_tokens = max_new_tokens

    def reflect(self, requests: Sequence[ReflectRequest]) -> list[str]:
        from fgvr.backends import user_turn

        got = self.backend.generate([[user_turn(reflection_question(r))] for r in requests],
                                    [[r.image] for r in requests], self.max_new_tokens)
        return [g.text for g in got]  # a failed request is empty text: unparseable, logged and skipped
