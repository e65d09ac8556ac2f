"""The decision rule on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from fgvr.decision import decide


def test_equal_weight_is_normalised_geometric_mean():
    # sqrt(0.8*0.2)=0.4, sqrt(0.2*0.8)=0.4 -> 0.5 / 0.5
    assert decide([0.8, 0.2], [0.2, 0.8], 0.5) == pytest.approx([0.5, 0.5])
    # sqrt(0.5*0.9)=0.670820, sqrt(0.5*0.1)=0.223607 -> 0.75 / 0.25
    assert decide([0.5, 0.5], [0.9, 0.1], 0.5) == pytest.approx([0.75, 0.25])


def test_weight_endpoints_are_each_system_alone():
    assert decide([0.6, 0.3, 0.1], [0.1, 0.1, 0.8], 0.0) == pytest.approx([0.6, 0.3, 0.1])
    assert decide([0.6, 0.3, 0.1], [0.1, 0.1, 0.8], 1.0) == pytest.approx([0.1, 0.1, 0.8])


def test_hand_computed_three_candidates():
    # weight 0.25: f^0.75 * s^0.25
    f, s = [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]
    raw = [0.6**0.75 * 0.1**0.25, 0.3**0.75 * 0.1**0.25, 0.1**0.75 * 0.8**0.25]
    z = sum(raw)
    assert decide(f, s, 0.25) == pytest.approx([r / z for r in raw])
    # System 1's raw top-k probabilities need not sum to 1: they are renormalised over the candidates
    assert decide([0.3, 0.15, 0.05], s, 0.25) == pytest.approx([r / z for r in raw])


def test_agreement_does_not_sharpen_and_a_firm_veto_overturns():
    out = decide([0.7, 0.3], [0.7, 0.3], 0.5)
    assert out == pytest.approx([0.7, 0.3])  # same opinion: unchanged under geometric pooling
    # two agreeing but different opinions: the result lies between them, never more confident than both
    between = decide([0.7, 0.3], [0.9, 0.1], 0.5)[0]
    assert 0.7 < between < 0.9 and between == pytest.approx(math.sqrt(0.63) / (math.sqrt(0.63) + math.sqrt(0.03)))
    veto = decide([0.9, 0.1], [0.001, 0.999], 0.5)
    assert veto[1] > veto[0]
    # moderate disagreement: sqrt(.95*.2)=.436 vs sqrt(.05*.8)=.2 -> candidate 0 stays ahead
    ll = decide([0.95, 0.05], [0.2, 0.8], 0.5)
    assert ll[0] == pytest.approx(math.sqrt(0.19) / (math.sqrt(0.19) + math.sqrt(0.04)))


def test_zero_probability_is_floored_not_a_certain_veto():
    out = decide([1.0, 0.0], [0.0, 1.0], 0.5)
    assert out == pytest.approx([0.5, 0.5])
    assert sum(decide([0.0, 0.0], [0.3, 0.7], 0.5)) == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same non-empty"):
        decide([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="weight"):
        decide([0.5, 0.5], [0.5, 0.5], 1.5)
    with pytest.raises(ValueError, match="finite"):
        decide([float("nan"), 0.5], [0.5, 0.5])
