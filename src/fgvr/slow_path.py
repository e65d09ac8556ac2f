"""System 2: a slow, careful look at one image and its top-k candidates.

Every System 2 meets the same small interface (`SlowPath.rank`), so the pipeline does not care whether a
VLM reasons over lettered options or a visual re-ranker compares exemplars: it gets, for each query, a
probability for each candidate, always a valid class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from PIL import Image


@dataclass
class SlowQuery:
    """One image sent slow: its candidate class ids (System 1's top-k, best first) and the rules that concern them."""

    image: Image.Image
    candidates: list[int]
    rules: list[Any] = field(default_factory=list)  # fgvr.experience.Rule
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
