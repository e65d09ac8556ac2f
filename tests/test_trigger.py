"""The trigger follows its slow-path budget (on the calibration samples and on held-out samples from the
same distribution), does not fire on everything (SARE's trap), and logs every input of its decision."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fgvr.fast_path import system1
from fgvr.trigger import Trigger, beta_lower_bound


def normed(x):
    return torch.nn.functional.normalize(x, dim=-1)


def make_kb(num_classes=20, shots=5, dim=32, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = normed(torch.randn(num_classes, dim, generator=g))
    ex = normed(centres.repeat_interleave(shots, 0) + noise * torch.randn(num_classes * shots, dim, generator=g) / dim**0.5 * 4)
    labels = torch.arange(num_classes).repeat_interleave(shots)
    protos = normed(torch.zeros(num_classes, dim).index_add_(0, labels, ex))
    # precision counts that differ per class: class c right (c % 5 + 1) of 6 times predicted
    stats = SimpleNamespace(pred_correct=torch.tensor([c % 5 + 1 for c in range(num_classes)]),
                            pred_total=torch.full((num_classes,), 6))
    return SimpleNamespace(classes=[str(c) for c in range(num_classes)], prototypes=protos, exemplars=ex,
                           exemplar_labels=labels, text_prototypes=None, fusion={"w": 1.0, "tau": 0.05},
                           stats=stats, centres=centres)


def queries(kb, n, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, len(kb.classes), (n,), generator=g)
    dim = kb.centres.shape[1]
    return normed(kb.centres[c] + noise * torch.randn(n, dim, generator=g) / dim**0.5 * 4)


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5])
def test_slow_rate_tracks_budget_on_calibration_and_held_out(budget):
    kb = make_kb()
    trig = Trigger(budget=budget)
    calib = system1(kb, queries(kb, 400, seed=1))
    trig.calibrate(trig.scores(calib, kb))
    rate_calib = sum(d.go_slow for d in trig.decide(calib, kb)) / 400
    held = system1(kb, queries(kb, 400, seed=2))
    rate_held = sum(d.go_slow for d in trig.decide(held, kb)) / 400
    assert abs(rate_calib - budget) <= 0.05
    assert abs(rate_held - budget) <= 0.05


def test_budget_calibrated_on_support_leave_one_out():
    kb = make_kb(shots=10)
    trig = Trigger(budget=0.3)
    thr = trig.calibrate_on_support(kb)
    assert math.isfinite(thr) and 0 < thr < 1
    from fgvr.fast_path import support_loo
    fast, _ = support_loo(kb)
    rate = sum(d.go_slow for d in trig.decide(fast, kb)) / len(fast)
    assert abs(rate - 0.3) <= 0.05


def test_does_not_fire_on_everything():
    """SARE's trap: a score that grows with N and ignores the counts fires on every sample. Ours is a
    bounded mean: confident samples of a reliable class stay under a mid threshold, however many classes."""
    for num_classes in (10, 1000):
        kb = make_kb(num_classes=num_classes, noise=0.2)
        kb.stats = SimpleNamespace(pred_correct=torch.full((num_classes,), 50), pred_total=torch.full((num_classes,), 50))
        fast = system1(kb, queries(kb, 200, seed=3, noise=0.2))
        trig = Trigger(threshold=0.5)
        scores = trig.scores(fast, kb)
        assert ((scores >= 0) & (scores <= 1)).all()
        rate = sum(d.go_slow for d in trig.decide(fast, kb)) / 200
        assert rate < 0.2, (num_classes, rate)
    # and uncertain samples (pure noise queries) do fire at the same threshold
    noise = system1(kb, normed(torch.randn(50, kb.centres.shape[1], generator=torch.Generator().manual_seed(7))))
    assert sum(d.go_slow for d in Trigger(threshold=0.5).decide(noise, kb)) / 50 > 0.5


def test_budget_extremes():
    kb = make_kb()
    fast = system1(kb, queries(kb, 50, seed=4))
    none, every = Trigger(budget=0.0), Trigger(budget=1.0)
    none.calibrate(none.scores(fast, kb))
    every.calibrate(every.scores(fast, kb))
    assert not any(d.go_slow for d in none.decide(fast, kb))
    assert all(d.go_slow for d in every.decide(fast, kb))


def test_beta_lower_bound_hand_computed():
    # Beta(1,1) is uniform: the 5% quantile is 0.05. Beta(a,1) has CDF x^a: quantile alpha^(1/a).
    lb = beta_lower_bound(torch.tensor([0, 10, 3]), torch.tensor([0, 10, 3]), alpha=0.05)
    assert lb[0] == pytest.approx(0.05)
    assert lb[1] == pytest.approx(0.05 ** (1 / 11))
    assert lb[2] == pytest.approx(0.05 ** (1 / 4))
    # Beta(1, b) has CDF 1-(1-x)^b: m = 0 of n = 4 -> 1 - 0.95^(1/5)
    assert beta_lower_bound(torch.tensor([0]), torch.tensor([4]))[0] == pytest.approx(1 - 0.95 ** (1 / 5))
    with pytest.raises(ValueError, match="inconsistent"):
        beta_lower_bound(torch.tensor([5]), torch.tensor([3]))


def test_precision_term_uses_the_predicted_class_counts():
    kb = make_kb(num_classes=2)
    kb.stats = SimpleNamespace(pred_correct=torch.tensor([40, 0]), pred_total=torch.tensor([40, 40]))
    fast = system1(kb, kb.centres)  # sample 0 predicted as class 0, sample 1 as class 1
    assert fast.topk_ids[:, 0].tolist() == [0, 1]
    d = Trigger(threshold=0.5, weights={"top1": 0, "margin": 0, "entropy": 0}).decide(fast, kb)
    assert d[0].precision_correct == 40 and d[1].precision_correct == 0
    assert d[0].score < 0.1 < 0.9 < d[1].score
    assert not d[0].go_slow and d[1].go_slow


def test_decision_logs_every_input_and_is_json():
    kb = make_kb()
    fast = system1(kb, queries(kb, 3, seed=5))
    d = Trigger(threshold=0.3).decide(fast, kb)[0]
    rec = json.loads(json.dumps(d.to_dict()))
    for key in ("go_slow", "score", "threshold", "predicted", "top1_prob", "margin", "entropy",
                "precision_lb", "precision_correct", "precision_total"):
        assert key in rec
    assert set(rec["u"]) == {"top1", "margin", "entropy", "precision"}
    assert rec["score"] == pytest.approx(sum(rec["u"].values()) / 4)
    assert rec["u"]["top1"] == pytest.approx(1 - rec["top1_prob"])


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="threshold or a slow-path budget"):
        Trigger()
    with pytest.raises(ValueError, match="budget"):
        Trigger(budget=1.5)
    with pytest.raises(ValueError, match="unknown trigger signals"):
        Trigger(threshold=0.5, weights={"vibes": 1.0})
    with pytest.raises(ValueError, match="no threshold yet"):
        kb = make_kb()
        Trigger(budget=0.3).decide(system1(kb, queries(kb, 2, seed=6)), kb)
