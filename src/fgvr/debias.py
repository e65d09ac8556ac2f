"""Option-order debiasing for any System 2 that reads lettered options (an optional layer; off by default).

System 1's top-1 is always option A, and VLMs prefer some letters whatever the content (Zheng et al., ICLR
2024, "Large Language Models Are Not Robust Multiple Choice Selectors"). So a VLM that likes "A" agrees
with System 1 more often than the image warrants. Two corrections, both wrappers around a `SlowPath` (they
permute the query's candidates, which is what the options are built from, so they work with any backend
and need no change to it):

* `cyclic`: score every cyclic shift of the options and average the probabilities each candidate got
  (k calls per query for k options). Every candidate sits at every letter once: position bias cancels.
* `prior` (PriDe, Zheng et al.): the model's letter prior is estimated from the first `n_estimate` queries
  with all cyclic shifts: under p_observed(option at letter d) ∝ p_debiased(option) · prior(d), the mean over
  shifts of log p(d) is log prior(d) plus a constant. Later queries are scored once and divided by the prior
  (about 1 call per query after the estimate). The prior is estimated per option count.

Cost and effect on the tiny random checkpoint: benchmarks/debias.py.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

MODES = ("none", "cyclic", "prior")


def _shifted(query: Any, s: int) -> Any:
    c = list(query.candidates)
    return replace(query, candidates=c[s:] + c[:s])


def _normalise(p: Sequence[float]) -> list[float]:
    z = sum(p)
    return [x / z for x in p] if z > 0 else [1.0 / len(p)] * len(p)


def _failed(answer: Any, k: int) -> bool:
    return answer.error is not None or len(answer.probs) != k


class DebiasedSlowPath:
    """A `SlowPath` whose option probabilities do not depend on the order of the options (see module)."""

    def __init__(self, inner: Any, mode: str = "cyclic", n_estimate: int = 16) -> None:
        if mode not in ("cyclic", "prior"):
            raise ValueError(f"debias mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.inner, self.mode, self.n_estimate = inner, mode, max(1, n_estimate)
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}+debias-{mode}"
        self.log_prior_sums: dict[int, list[float]] = {}  # option count -> summed per-letter log prior
        self.estimated_on: dict[int, int] = {}
        self.calls = 0  # queries sent to the inner System 2

    def prior(self, k: int) -> list[float] | None:
        """The estimated letter prior for k options (normalised), once `n_estimate` queries went into it."""
        if self.estimated_on.get(k, 0) < self.n_estimate:
            return None
        sums = self.log_prior_sums[k]
        m = max(sums)
        return _normalise([math.exp((x - m) / self.estimated_on[k]) for x in sums])

    def rank(self, queries: Sequence[Any]) -> list[Any]:
        full: list[int] = []  # queries scored under every shift: all in `cyclic`, the estimate in `prior`
        wanted: dict[int, int] = {}
        for i, q in enumerate(queries):
            k = len(q.candidates)
            wanted.setdefault(k, self.n_estimate - self.estimated_on.get(k, 0))
            if self.mode == "cyclic" or wanted[k] > 0:
                full.append(i)
                wanted[k] -= 1
        out: list[Any] = [None] * len(queries)
        if full:
            for i, a in zip(full, self._cyclic([queries[i] for i in full])):
                out[i] = a
        once = [i for i in range(len(queries)) if out[i] is None]
        if once:  # `prior` after the estimate: one call, the letter prior divided out
            answers = self.inner.rank([queries[i] for i in once])
            self.calls += len(once)
            for i, a in zip(once, answers):
                if _failed(a, len(queries[i].candidates)):
                    out[i] = a  # a failure stays one (the pipeline keeps System 1's answer and logs it)
                    continue
                pri = self.prior(len(queries[i].candidates))
                out[i] = replace(a, probs=_normalise([p / max(pr, 1e-12) for p, pr in zip(a.probs, pri)]))
        return out

    def _cyclic(self, queries: Sequence[Any]) -> list[Any]:
        """Every cyclic shift of every query in one inner call; averaged back per candidate."""
        batch, where = [], []
        for qi, q in enumerate(queries):
            for s in range(len(q.candidates)):
                batch.append(_shifted(q, s))
                where.append((qi, s))
        answers = self.inner.rank(batch)
        self.calls += len(batch)
        per: list[list[tuple[int, Any]]] = [[] for _ in queries]
        for (qi, s), a in zip(where, answers):
            per[qi].append((s, a))
        out = []
        for q, shifts in zip(queries, per):
            k = len(q.candidates)
            bad = next((a for _, a in shifts if _failed(a, k)), None)
            if bad is not None:  # an average without one shift is biased again: the query failed
                out.append(replace(bad, error=bad.error or f"System 2 gave {len(bad.probs)} probabilities for {k} "
                                   "options under one shift of the options"))
                continue
            probs = [0.0] * k
            log_letter = [0.0] * k
            for s, a in shifts:
                for d, p in enumerate(a.probs):  # letter d of shift s shows candidate (d + s) % k
                    probs[(d + s) % k] += p / k
                    log_letter[d] += math.log(max(p, 1e-12)) / k
            if self.mode == "prior" and self.estimated_on.get(k, 0) < self.n_estimate:
                sums = self.log_prior_sums.setdefault(k, [0.0] * k)
                self.log_prior_sums[k] = [x + y for x, y in zip(sums, log_letter)]
                self.estimated_on[k] = self.estimated_on.get(k, 0) + 1
            first = shifts[0][1]
            out.append(replace(first, probs=_normalise(probs),
                               tokens_in=sum(a.tokens_in for _, a in shifts),
                               tokens_out=sum(a.tokens_out for _, a in shifts),
                               seconds=sum(a.seconds for _, a in shifts)))
        return out


def debiased(slow: Any, mode: str | None) -> Any:
    """`slow` wrapped for `mode` ('cyclic' or 'prior'); unchanged for None / 'none' (the default)."""
    if slow is None or mode in (None, "none"):
        return slow
    return DebiasedSlowPath(slow, mode)
