"""The dual system end to end on solid-colour images with a stand-in encoder and System 2: decode once,
error records, escalation without a System 2, batching of slow samples, rules from the experience seam,
the decision applied, slow_all mode. (The real Lite0 end-to-end lives in tests/test_evaluate.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from fgvr.backends.transformers_vlm import TransformersVlm
from fgvr.pipeline import PATH_ERROR, PATH_FAST, PATH_SLOW, PATH_SLOW_FAILED, PATH_UNAVAILABLE, DualSystem
from fgvr.trigger import Trigger

from fakes import COLOURS, ColourEncoder, PickLast, colour_kb


class Boom:
    name = "boom"

    def rank(self, queries):
        raise RuntimeError("out of memory (pretend)")


@pytest.fixture()
def images(tmp_path):
    paths = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        mixed = tuple((a + b) // 2 for a, b in zip(rgb, (128, 128, 128))) if i % 2 else rgb
        p = tmp_path / f"{i}_{name}.png"
        Image.new("RGB", (16, 16), mixed).save(p)
        paths.append(p)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    return paths[:2] + [bad] + paths[2:]


def test_error_record_and_order(images):
    enc = ColourEncoder()
    ds = DualSystem(colour_kb(enc), enc, None, Trigger(threshold=2.0), k=3)
    res = ds.classify_paths(images)
    assert [r.path for r in res] == [str(p) for p in images]
    assert res[2].path_taken == PATH_ERROR and res[2].prediction is None and "not an image" in res[2].error
    assert enc.calls == 2  # KB build + ONE batched encode of the readable images
    pure = [r for r in res if r.path_taken != PATH_ERROR and "_" in r.path]
    assert res[0].prediction_name == "red"  # solid red image
    assert all(r.path_taken == PATH_FAST for r in pure)
    json.dumps([r.to_dict() for r in res])  # JSON-ready


def test_without_system2_the_fast_answer_stands(images):
    enc = ColourEncoder()
    ds = DualSystem(colour_kb(enc), enc, None, Trigger(threshold=-1.0), k=3)  # everything triggers
    res = [r for r in ds.classify_paths(images) if r.path_taken != PATH_ERROR]
    assert all(r.path_taken == PATH_UNAVAILABLE for r in res)
    assert all(r.prediction == r.fast_prediction and not r.slow_ran for r in res)
    assert all(r.candidates[0].final == r.candidates[0].fast for r in res)


def test_slow_path_batched_with_rules_and_decided(images):
    enc = ColourEncoder()
    kb = colour_kb(enc)
    slow = PickLast()
    asked = []
    experience = SimpleNamespace(retrieve=lambda cands, n: asked.append((list(cands), n)) or [f"rule-for-{cands[0]}"])
    ds = DualSystem(kb, enc, slow, Trigger(threshold=-1.0), k=3, weight=1.0, experience=experience,
                    n_rules=2, slow_batch=2)
    res = [r for r in ds.classify_paths(images) if r.path_taken != PATH_ERROR]
    assert [len(b) for b in slow.batches] == [2, 2, 1]
    assert all(n == 2 for _, n in asked) and len(asked) == 5
    for r in res:
        assert r.path_taken == PATH_SLOW and r.slow_ran
        assert r.prediction == r.candidates[-1].id  # weight 1: System 2 alone
        assert r.rules_used == [f"rule-for-{r.candidates[0].id}"]
        assert r.slow_tokens_in == 10 and r.rationale == "last one"
        assert abs(sum(c.final for c in r.candidates) - 1) < 1e-9
    # weight 0: System 1 alone, although System 2 ran
    ds0 = DualSystem(kb, enc, PickLast(), Trigger(threshold=-1.0), k=3, weight=0.0)
    assert all(r.prediction == r.fast_prediction for r in ds0.classify_paths(images) if r.prediction is not None)


def test_only_triggered_samples_go_slow_unless_slow_all(images):
    enc = ColourEncoder()
    kb = colour_kb(enc)
    probe = DualSystem(kb, enc, None, Trigger(threshold=2.0), k=3).classify_paths(images)
    scores = sorted(r.trigger["score"] for r in probe if r.trigger)
    thr = (scores[1] + scores[2]) / 2  # the three most uncertain go slow
    slow = PickLast()
    res = DualSystem(kb, enc, slow, Trigger(threshold=thr), k=3, weight=1.0).classify_paths(images)
    assert sum(len(b) for b in slow.batches) == 3
    assert sorted(r.path_taken for r in res) == sorted([PATH_ERROR, PATH_FAST, PATH_FAST, PATH_SLOW, PATH_SLOW, PATH_SLOW])
    for r in res:
        if r.path_taken == PATH_FAST:
            assert not r.slow_ran and r.slow_prediction is None and r.prediction == r.fast_prediction
    # slow_all: System 2 on everything, decisions unchanged, slow answers logged for the curve
    slow_all = PickLast()
    res2 = DualSystem(kb, enc, slow_all, Trigger(threshold=thr), k=3, weight=1.0, slow_all=True).classify_paths(images)
    assert sum(len(b) for b in slow_all.batches) == 5
    assert [r.path_taken for r in res2] == [r.path_taken for r in res]
    assert [r.prediction for r in res2] == [r.prediction for r in res]
    assert all(r.slow_ran and r.slow_prediction == r.candidates[-1].id for r in res2 if r.path_taken != PATH_ERROR)


def test_failing_system2_is_logged_and_the_run_goes_on(images, caplog):
    enc = ColourEncoder()
    res = DualSystem(colour_kb(enc), enc, Boom(), Trigger(threshold=-1.0), k=2).classify_paths(images)
    ok = [r for r in res if r.path_taken != PATH_ERROR]
    assert all(r.path_taken == PATH_SLOW_FAILED and "out of memory" in r.error for r in ok)
    assert all(r.prediction == r.fast_prediction for r in ok)
    assert "System 2 (boom) failed" in caplog.text


def test_budget_trigger_is_calibrated_on_the_support_set():
    enc = ColourEncoder()
    kb = colour_kb(enc)
    kb.exemplars = torch.cat([kb.prototypes, kb.prototypes * 0.9 + 0.1])
    kb.exemplars = torch.nn.functional.normalize(kb.exemplars, dim=1)
    kb.exemplar_labels = torch.arange(5).repeat(2)
    trig = Trigger(budget=0.4)
    calibrated = trig.calibrated_on_support(kb)  # explicit, by the caller (open_system does this)
    assert calibrated.threshold is not None and 0 <= calibrated.threshold <= 1
    DualSystem(kb, enc, None, calibrated)
    # the threshold is the support set's (1 - budget) quantile, scored leave-one-out: 4 of the 10 support
    # images lie above it, and a threshold from anywhere else (a default, the queries) would not do that
    from fgvr.fast_path import support_loo

    fast, _ = support_loo(kb)
    scores = calibrated.scores(fast, kb)
    assert calibrated.threshold == pytest.approx(float(torch.quantile(scores, 0.6)))
    assert int((scores > calibrated.threshold).sum()) == 4
    # no hidden mutation: the system does not calibrate (or otherwise change) the trigger it is given,
    # and one left without a threshold says so at the first image instead of guessing
    uncalibrated = DualSystem(kb, enc, None, trig)
    assert trig.threshold is None and uncalibrated.trigger is trig
    with pytest.raises(ValueError, match="no threshold yet"):
        uncalibrated.classify_images([Image.new("RGB", (8, 8), COLOURS["red"])], ["red.png"])


def test_dual_system_with_the_tiny_qwen_reasoner_and_experience_rules(images, tiny_qwen_dir):
    """The real System 2 seam: the tiny random Qwen2.5-VL scores lettered options for the triggered samples,
    with the experience library's rules for their candidates; the decision combines its distribution."""
    from fgvr.experience import ExperienceLibrary, Rule
    from fgvr.models.spec import parse_spec
    from fgvr.slow_path import VlmReasoner

    enc = ColourEncoder()
    kb = colour_kb(enc)
    rule = Rule(id="r1", classes=["orange", "red"], cue="hue", text="Orange is lighter than red.", effect=0.1)
    lib = ExperienceLibrary([rule], classes=kb.classes)
    vlm = VlmReasoner(TransformersVlm(parse_spec(str(tiny_qwen_dir))), kb.classes, rationale=True, rationale_tokens=4)
    res = DualSystem(kb, enc, vlm, Trigger(threshold=-1.0), k=3, experience=lib).classify_paths(images)
    ok = [r for r in res if r.path_taken != PATH_ERROR]
    assert ok and all(r.path_taken == PATH_SLOW and r.slow_ran for r in ok)
    for r in ok:
        slow = [c.slow for c in r.candidates]
        assert len(slow) == 3 and abs(sum(slow) - 1) < 1e-4
        assert abs(sum(c.final for c in r.candidates) - 1) < 1e-9
        assert r.prediction in [c.id for c in r.candidates]
        assert r.slow_tokens_in > 0 and isinstance(r.rationale, str)
        names = {c.name for c in r.candidates}
        assert r.rules_used == (["r1"] if names & {"orange", "red"} else [])
    assert json.loads(json.dumps(ok[0].to_dict()))["path_taken"] == PATH_SLOW
