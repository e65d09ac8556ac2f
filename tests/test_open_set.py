"""Open set (fgvr.open_set): the metrics against scikit-learn, the leave-one-out threshold, an evaluation with
classes held out of the base, "none of these" from a scripted VLM, and the CLI's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fgvr.backends import OptionScores
from fgvr.cli import cli
from fgvr.data import load_image
from fgvr.evaluate import run_evaluation
from fgvr.knowledge_base import KnowledgeBase
from fgvr.open_set import (MANIFEST_KEY, NONE_OF_THESE, OpenSet, OpenSetError, auroc, calibration,
                           calibration_record, fpr_at_tpr, loo_scores, threshold_for_rate)
from fgvr.pipeline import DualSystem
from fgvr.slow_path import VlmReasoner
from fgvr.trigger import Trigger
from fakes import COLOURS, ColourEncoder, colour_kb
import dataset_replicas as R


# --- metrics ------------------------------------------------------------------------------------------------


def test_auroc_and_fpr_at_95_equal_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(5):
        known = rng.normal(1.0, 1.0, 200 + trial)
        unknown = np.round(rng.normal(0.0, 1.0, 57 + 3 * trial), 1)  # rounded: ties across and within groups
        known[:20] = np.round(known[:20], 1)
        y = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
        s = np.r_[known, unknown]
        assert auroc(known, unknown) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        fpr, tpr, _ = metrics.roc_curve(y, s)
        want = fpr[np.searchsorted(tpr, 0.95 - 1e-12)]  # the first ROC point reaching 95% TPR
        assert fpr_at_tpr(known, unknown) == pytest.approx(want, abs=1e-12)


def test_metrics_by_hand_on_a_small_case():
    known, unknown = [0.9, 0.8, 0.4], [0.5, 0.1]
    # pairs (k > u): 0.9>0.5, 0.9>0.1, 0.8>0.5, 0.8>0.1, 0.4>0.1 = 5 of 6
    assert auroc(known, unknown) == pytest.approx(5 / 6)
    # 95% of 3 knowns needs all 3 accepted: threshold 0.4 accepts the unknown 0.5, not 0.1
    assert fpr_at_tpr(known, unknown) == pytest.approx(0.5)
    assert auroc([1.0], [1.0]) == 0.5


# --- the leave-one-out calibration ----------------------------------------------------------------------


def _clustered_kb(classes: int = 12, shots: int = 6, dim: int = 16, seed: int = 0) -> KnowledgeBase:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    ex = torch.nn.functional.normalize(centres.repeat_interleave(shots, 0) + 0.35 * torch.randn(classes * shots, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(shots)
    protos = torch.nn.functional.normalize(torch.zeros(classes, dim).index_add_(0, labels, ex), dim=1)
    return KnowledgeBase(classes=[f"c{i}" for i in range(classes)], encoder_spec={}, encoder_key="x", embed_dim=dim,
                         prototypes=protos, exemplars=ex, exemplar_labels=labels,
                         fusion={"w": 1.0, "tau": 0.05, "exemplar_weight": 0.5})


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
def test_loo_threshold_rejects_about_rate_of_the_support_scores(rate):
    kb = _clustered_kb()
    kb.manifest[MANIFEST_KEY] = calibration_record(kb)
    t = threshold_for_rate(kb, rate)
    s = loo_scores(kb).numpy()
    assert len(s) == 72
    assert abs(float((s < t).mean()) - rate) <= 1.5 / len(s)  # a quantile of 72 scores: within one image
    # a higher rate rejects more
    assert threshold_for_rate(kb, min(rate * 2, 0.9)) > t


def test_loo_scores_leave_each_image_out():
    """An image scored against a base that still held it would score ~1 against itself (its own exemplar)."""
    kb = _clustered_kb()
    s = loo_scores(kb)
    assert float(s.max()) < 0.999
    # single-image classes are left out: they have no image evidence once the image is removed
    kb2 = _clustered_kb(classes=3, shots=1)
    assert loo_scores(kb2).numel() == 0
    with pytest.raises(OpenSetError, match="unknown-threshold"):
        threshold_for_rate(kb2, 0.05)


def test_old_base_without_calibration_computes_it_on_load(caplog):
    kb = _clustered_kb()
    assert MANIFEST_KEY not in kb.manifest
    import logging

    with caplog.at_level(logging.INFO, logger="fgvr.open_set"):
        got = calibration(kb)
    assert "computed now" in caplog.text and got["images"] == 72
    assert calibration(kb) is got  # once per base in memory


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_built_base_stores_the_calibration_and_the_cli_answers_unknown(lite0_setup, tmp_path):
    """End to end on a real (Lite0) base: the build's fit step wrote the quantile table; classify and
    evaluate take --unknown-rate; evaluate reports the open-set numbers for the test class the base lacks."""
    from fgvr.knowledge_base import load_knowledge_base

    root, _ = lite0_setup
    kb = load_knowledge_base(root / "kb")
    rec = kb.manifest[MANIFEST_KEY]
    assert rec["score"] == "top1_similarity" and len(rec["quantiles"]) == 1001 and rec["images"] == 9
    assert rec["quantiles"] == sorted(rec["quantiles"])
    assert calibration(kb) is rec  # stored: nothing recomputed on load
    img = root / "test" / "yellow_half" / "0.png"
    res = CliRunner().invoke(cli, ["classify", str(root / "kb"), str(img), "--unknown-threshold", "0.999"])
    assert res.exit_code == 0, res.output
    line = _json_lines(res.stdout)[-1]
    assert line["unknown"] is True and line["prediction"] is None and len(line["candidates"]) == 3
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["evaluate", str(root / "kb"), str(root / "test"), "--unknown-rate", "0.1",
                                   "--batch-size", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    head = _json_lines(res.stdout)[0]
    o = json.loads((out / "summary.json").read_text())["open_set"]
    assert o["n_unknown"] == 1 and o["n_known"] == 12
    assert head["open_set"]["auroc"] == o["auroc"] and o["setting"]["threshold"] == pytest.approx(
        threshold_for_rate(kb, 0.1))


# --- the pipeline ---------------------------------------------------------------------------------------------


def _image(name):
    return Image.new("RGB", (8, 8), (230, 220, 30) if name == "yellow" else COLOURS[name])


def test_answers_below_the_threshold_are_unknown_with_candidates_listed():
    enc = ColourEncoder()
    kb = colour_kb(enc)
    base = DualSystem(kb, enc, None, Trigger(threshold=1.0), k=3)
    known = base.classify_images([_image("red")], ["red.png"])[0]
    yellow = base.classify_images([_image("yellow")], ["y.png"])[0]
    assert not known.unknown and known.unknown_score > yellow.unknown_score  # the score is recorded when off
    cut = (known.unknown_score + yellow.unknown_score) / 2
    system = DualSystem(kb, enc, None, Trigger(threshold=1.0), k=3, open_set=OpenSet(threshold=cut))
    r_known, r_yellow = system.classify_images([_image("red"), _image("yellow")], ["red.png", "y.png"])
    assert not r_known.unknown and r_known.prediction_name == "red"
    assert r_yellow.unknown and r_yellow.prediction is None and r_yellow.prediction_name is None
    assert len(r_yellow.candidates) == 3 and r_yellow.closed_prediction == yellow.prediction
    assert r_yellow.to_dict()["unknown"] is True


class ScriptedBackend:
    """A VLM backend that answers with a scripted letter index (-1: the last option offered)."""

    name = "scripted"

    def __init__(self, pick: int = -1):
        self.pick, self.questions, self.n_options = pick, [], []

    def score_options(self, questions, images, n_options):
        self.questions += list(questions)
        self.n_options += list(n_options)
        out = []
        for n in n_options:
            p = [0.02] * n
            p[self.pick % n] = 1.0
            z = sum(p)
            out.append(OptionScores(probs=[x / z for x in p], tokens_in=5, tokens_out=1))
        return out

    def generate(self, conversations, images, max_new_tokens):
        raise AssertionError("no rationale asked")

    def describe(self):
        return {"backend": "scripted", "mode": "fixed", "key": "scripted"}


def test_vlm_picking_none_of_these_makes_the_answer_unknown():
    enc = ColourEncoder()
    kb = colour_kb(enc)
    backend = ScriptedBackend(pick=-1)
    slow = VlmReasoner(backend, kb.classes, none_option=True)
    # a threshold no image fails, so only System 2 can say unknown; every image goes slow
    system = DualSystem(kb, enc, slow, Trigger(threshold=-1.0), k=3, weight=0.5, open_set=OpenSet(threshold=-2.0))
    r = system.classify_images([_image("red")], ["red.png"])[0]
    assert backend.n_options == [4]  # three candidates and "none of these"
    assert f"D. {NONE_OF_THESE}" in backend.questions[0]
    assert r.path_taken == "slow" and r.unknown and r.prediction is None and len(r.candidates) == 3
    # the same VLM picking the first candidate: a class of the base
    backend2 = ScriptedBackend(pick=0)
    system2 = DualSystem(kb, enc, VlmReasoner(backend2, kb.classes, none_option=True), Trigger(threshold=-1.0), k=3,
                         weight=0.5, open_set=OpenSet(threshold=-2.0))
    r2 = system2.classify_images([_image("red")], ["red.png"])[0]
    assert not r2.unknown and r2.prediction is not None
    # open set off: no extra option
    backend3 = ScriptedBackend(pick=-1)
    DualSystem(kb, enc, VlmReasoner(backend3, kb.classes), Trigger(threshold=-1.0), k=3).classify_images(
        [_image("red")], ["red.png"])
    assert backend3.n_options == [3] and NONE_OF_THESE not in backend3.questions[0]


# --- evaluate on the CUB replica with classes held out ------------------------------------------------------


def test_evaluate_on_a_replica_with_held_out_classes(tmp_path):
    from fgvr.datasets import load_splits

    splits = load_splits("cub-200-2011", R.make_cub(tmp_path / "data", n_classes=8, train_per_class=3,
                                                    test_per_class=3))
    known = splits.train.classes[:6]  # a quarter held out
    enc = ColourEncoder()
    train = [s for s in splits.train.samples if s.label in known]
    ex = enc.encode_images([load_image(s.path) for s in train])
    labels = torch.tensor([known.index(s.label) for s in train])
    protos = torch.nn.functional.normalize(torch.zeros(6, ex.shape[1]).index_add_(0, labels, ex), dim=1)
    kb = KnowledgeBase(classes=list(known), encoder_spec={}, encoder_key="colour", embed_dim=ex.shape[1],
                       prototypes=protos, exemplars=ex, exemplar_labels=labels,
                       fusion={"w": 1.0, "tau": 0.05, "exemplar_weight": 0.5})
    system = DualSystem(kb, enc, None, Trigger(threshold=1.0), k=3,
                        open_set=OpenSet.from_options(kb, rate=0.1))
    out = tmp_path / "run"
    s = run_evaluation(system, splits.test, out, {"kb": "cub", "encoder": "colour", "data": "d"}, batch_size=8,
                       progress=False)
    o = s["open_set"]
    assert o["n_known"] == 18 and o["n_unknown"] == 6
    assert 0.0 <= o["auroc"] <= 1.0 and o["auroc_ci"][0] <= o["auroc"] <= o["auroc_ci"][1]
    assert 0.0 <= o["fpr_at_95_tpr"] <= 1.0 and o["fpr_at_95_tpr_ci"][0] <= o["fpr_at_95_tpr_ci"][1]
    assert o["known_accuracy_with_rejection"] <= o["known_accuracy_without_rejection"]
    assert o["known_accuracy_cost"] == pytest.approx(o["known_accuracy_without_rejection"]
                                                     - o["known_accuracy_with_rejection"])
    assert o["setting"]["rate"] == 0.1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert s["n_answered_unknown"] == sum(r["unknown"] for r in rows)
    assert all(r["prediction"] is None for r in rows if r["unknown"])
    assert "## Open set" in (out / "report.md").read_text() and "AUROC" in (out / "report.md").read_text()
    from fgvr.evaluate import headline

    assert headline(s)["open_set"]["auroc"] == o["auroc"]
    # a resume with another threshold would mix two experiments: refused
    other = system.__class__(kb, enc, None, Trigger(threshold=1.0), k=3, open_set=OpenSet(threshold=0.0))
    from fgvr.evaluate import EvaluateError

    with pytest.raises(EvaluateError, match="unknown_threshold"):
        run_evaluation(other, splits.test, out, {"kb": "cub", "encoder": "colour", "data": "d"}, progress=False)


def test_evaluate_without_unknown_classes_has_no_open_set_section(tmp_path):
    enc = ColourEncoder()
    kb = colour_kb(enc)
    root = tmp_path / "d"
    for name in ("red", "blue"):
        (root / name).mkdir(parents=True)
        _image(name).save(root / name / "0.png")
    from fgvr.data import read_dataset

    s = run_evaluation(DualSystem(kb, enc, None, Trigger(threshold=1.0), k=3), read_dataset(root), tmp_path / "r",
                       {"kb": "c", "encoder": "e", "data": "d"}, progress=False)
    assert s["open_set"] is None and "## Open set" not in (tmp_path / "r" / "report.md").read_text()


# --- the CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [(["--unknown-rate", "-0.1"], "--unknown-rate"),
                                          (["--unknown-rate", "1"], "--unknown-rate"),
                                          (["--unknown-rate", "1.5"], "--unknown-rate"),
                                          (["--unknown-rate", "nan"], "--unknown-rate"),
                                          (["--unknown-threshold", "inf"], "--unknown-threshold"),
                                          (["--unknown-rate", "0.1", "--unknown-threshold", "0.5"], "not both")])
@pytest.mark.parametrize("command", ["classify", "evaluate"])
def test_cli_refuses_silly_open_set_values(tmp_path, args, needle, command):
    (tmp_path / "kb").mkdir()
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "data" / name / "0.png")
    img = tmp_path / "data" / "a" / "0.png"
    extra = ["--out", str(tmp_path / "run")] if command == "evaluate" else []
    res = CliRunner().invoke(cli, [command, str(tmp_path / "kb"), str(img if command == "classify" else tmp_path / "data"),
                                   *extra, *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_open_set_from_options_refuses_bad_values():
    kb = _clustered_kb()
    for bad in (-0.01, 1.0, 2.0, float("nan")):
        with pytest.raises(OpenSetError, match="unknown-rate"):
            OpenSet.from_options(kb, rate=bad)
    with pytest.raises(OpenSetError, match="not both"):
        OpenSet.from_options(kb, rate=0.1, threshold=0.5)
    assert OpenSet.from_options(kb) is None


# --- serve -------------------------------------------------------------------------------------------------


def test_serve_answers_unknown_with_the_candidates(shapes_kb):
    pytest.importorskip("fastapi", reason="fgvr serve needs the serve extra")
    import time

    from fastapi.testclient import TestClient

    from fgvr.pipeline import open_system
    from fgvr.serve import ServeSettings, create_app

    app = create_app(lambda: open_system(shapes_kb, threshold=0.5, unknown_threshold=0.9999), ServeSettings())
    img = shapes_kb.parent / "test" / "red_disc" / "0.png"
    with TestClient(app, base_url="http://127.0.0.1") as c:
        deadline = time.time() + 120
        while c.get("/healthz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        got = c.post("/v1/classify", files={"image": ("0.png", img.read_bytes(), "image/png")}).json()
    assert got["unknown"] is True and got["prediction"] is None and got["prediction_name"] is None
    assert len(got["candidates"]) == 3 and "answered unknown" in got["why"]
    assert got["unknown_score"] < 0.9999
