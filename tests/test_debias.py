"""Option-order debiasing (fgvr.debias): a System 2 that prefers letter A is corrected; on the tiny random
Qwen2.5-VL the cyclic mode gives the same distribution whatever order the options come in."""

from __future__ import annotations

import pytest
from PIL import Image

from fgvr.backends.transformers_vlm import TransformersVlm
from fgvr.debias import DebiasedSlowPath, debiased
from fgvr.slow_path import SlowAnswer, SlowQuery

BIAS = [8.0, 1.0, 2.0, 1.0]  # what the model adds per letter, whatever the option says
TRUE = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.25, 5: 0.05}  # its real opinion of each class


class LetterBiased:
    """p(letter d) ∝ TRUE[candidate at d] * BIAS[d]: PriDe's model of a biased multiple-choice reader."""

    name = "biased"

    def __init__(self):
        self.calls = 0

    def rank(self, queries):
        self.calls += len(queries)
        out = []
        for q in queries:
            raw = [TRUE[c] * BIAS[d] for d, c in enumerate(q.candidates)]
            out.append(SlowAnswer(probs=[x / sum(raw) for x in raw], tokens_in=10, tokens_out=1))
        return out


def _q(cands):
    return SlowQuery(image=Image.new("RGB", (4, 4)), candidates=list(cands), path="x")


def _by_class(query, answer):
    return {c: p for c, p in zip(query.candidates, answer.probs)}


def test_letter_bias_decides_without_debiasing_and_not_with_it():
    inner = LetterBiased()
    q = _q([0, 1, 2, 3])  # System 1's top-1 (class 0, the worst in truth) sits at letter A
    plain = inner.rank([q])[0].probs
    assert max(range(4), key=plain.__getitem__) == 0  # the A bias wins
    cyc = DebiasedSlowPath(LetterBiased(), "cyclic")
    a = cyc.rank([q])[0]
    assert max(range(4), key=a.probs.__getitem__) == 3 and cyc.calls == 4  # k calls for k options
    assert a.tokens_in == 40 and sum(a.probs) == pytest.approx(1.0)
    # invariant under any cyclic order of the same options
    for shift in range(1, 4):
        q2 = _q(q.candidates[shift:] + q.candidates[:shift])
        b = cyc.rank([q2])[0]
        assert _by_class(q2, b) == pytest.approx(_by_class(q, a))


def test_pride_prior_is_estimated_then_divided_out():
    inner = LetterBiased()
    pri = DebiasedSlowPath(inner, "prior", n_estimate=3)
    estimate = [_q([0, 1, 2, 3]), _q([2, 3, 4, 5]), _q([5, 0, 3, 1])]
    pri.rank(estimate)
    assert inner.calls == 12
    assert pri.prior(4) == pytest.approx([b / sum(BIAS) for b in BIAS])  # exactly the letter bias
    later = [_q([4, 1, 0, 2]), _q([1, 5, 3, 2])]
    answers = pri.rank(later)
    assert inner.calls == 14  # one call per query once the prior is known
    for q, a in zip(later, answers):
        z = sum(TRUE[c] for c in q.candidates)
        assert a.probs == pytest.approx([TRUE[c] / z for c in q.candidates])  # the model's real opinion
    assert pri.prior(3) is None  # another option count has its own prior, not estimated yet


def test_off_by_default_and_bad_mode_refused():
    inner = LetterBiased()
    assert debiased(inner, None) is inner and debiased(inner, "none") is inner and debiased(None, "cyclic") is None
    with pytest.raises(ValueError, match="debias mode"):
        DebiasedSlowPath(inner, "sorted")


def test_cyclic_debiasing_with_the_tiny_qwen_is_order_invariant(tiny_qwen_dir):
    from fgvr.models.spec import parse_spec
    from fgvr.slow_path import VlmReasoner

    classes = ["coat", "pullover", "shirt", "T-shirt", "dress"]
    vlm = VlmReasoner(TransformersVlm(parse_spec(str(tiny_qwen_dir), max_pixels=16 * 28 * 28)), classes)
    image = Image.new("RGB", (56, 56), (120, 30, 200))
    q1 = SlowQuery(image=image, candidates=[0, 1, 2, 3], path="a")
    q2 = SlowQuery(image=image, candidates=[2, 3, 0, 1], path="a")
    plain = vlm.rank([q1, q2])
    cyc = DebiasedSlowPath(vlm, "cyclic")
    a1, a2 = cyc.rank([q1, q2])
    assert cyc.calls == 8 and a1.tokens_in > plain[0].tokens_in
    assert _by_class(q1, a1) == pytest.approx(_by_class(q2, a2), abs=1e-4)
    assert sum(a1.probs) == pytest.approx(1.0)


def test_pride_estimates_within_one_batch():
    inner = LetterBiased()
    pri = DebiasedSlowPath(inner, "prior", n_estimate=2)
    qs = [_q([0, 1, 2, 3]), _q([2, 3, 4, 5]), _q([4, 1, 0, 2]), _q([1, 5, 3, 2])]
    answers = pri.rank(qs)
    assert inner.calls == 2 * 4 + 2  # the first two under every shift, the other two once
    z = sum(TRUE[c] for c in qs[3].candidates)
    assert answers[3].probs == pytest.approx([TRUE[c] / z for c in qs[3].candidates])


class FailsOn(LetterBiased):
    """LetterBiased, but the query whose first option is `bad_first` fails (a served VLM's timeout, say)."""

    def __init__(self, bad_first):
        super().__init__()
        self.bad_first = bad_first

    def rank(self, queries):
        answers = super().rank(queries)
        return [SlowAnswer(probs=[], error="timed out") if q.candidates[0] == self.bad_first else a
                for q, a in zip(queries, answers)]


def test_a_failed_call_stays_a_failure_never_a_biased_or_crashed_answer():
    cyc = DebiasedSlowPath(FailsOn(bad_first=2), "cyclic")  # one of the four shifts of [0, 1, 2, 3] fails
    a, b = cyc.rank([_q([0, 1, 2, 3]), _q([4, 5, 0, 1])])
    assert a.error == "timed out" and b.error is None and sum(b.probs) == pytest.approx(1.0)
    pri = DebiasedSlowPath(FailsOn(bad_first=5), "prior", n_estimate=1)
    pri.rank([_q([0, 1, 2, 3])])  # the estimate
    ok, failed = pri.rank([_q([1, 2, 3, 4]), _q([5, 0, 1, 2])])  # the second fails after the estimate
    assert failed.error == "timed out" and failed.probs == []
    assert ok.error is None and sum(ok.probs) == pytest.approx(1.0)
