"""The dual system on the build's images: System 2 on every image, its answers cached, a trial rule first."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from fgvr.experience.heldout import Item
from fgvr.rules import ExperienceError, ExperienceLibrary, Rule


class CachedSlow:
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


class RulesWithTrial:
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


class Scorer:
    """The dual system (`fgvr.pipeline.DualSystem`) on the build's images, System 2 on every image, from
    their stored embeddings; answers of System 2 are cached (see `CachedSlow`)."""

    def __init__(self, kb: Any, slow: Any, embeddings: Any, paths: Sequence[str], *, k: int, weight: float,
                 n_rules: int) -> None:
        from fgvr.pipeline import DualSystem
        from fgvr.trigger import Trigger

        self.slow = CachedSlow(slow)
        self.system = DualSystem(kb, None, self.slow, Trigger(threshold=-math.inf), k=min(k, len(kb.classes)),
                                 weight=weight, n_rules=n_rules, slow_all=True, slow_batch=32)
        self.embeddings, self.row = embeddings, {p: i for i, p in enumerate(paths)}

    def answers(self, lib: ExperienceLibrary, items: Sequence[Item], trial: Rule | None = None) -> list[Any]:
        """One `Result` per item: what `fgvr classify` would say with these rules and System 2 on it."""
        if not items:
            return []
        self.system.experience = RulesWithTrial(lib, trial)
        emb = self.embeddings[[self.row[it.path] for it in items]]
        results = self.system.classify_embeddings(emb, [it.path for it in items], None)
        for r in results:
            if r.slow_prediction is None:
                raise ExperienceError(f"System 2 gave no answer for {r.path}: {r.error}; fix that and rerun "
                                      "`fgvr build-experience` (it resumes)")
        return results

    def predict(self, lib: ExperienceLibrary, items: Sequence[Item], trial: Rule | None = None) -> list[int]:
        return [r.slow_prediction for r in self.answers(lib, items, trial)]
