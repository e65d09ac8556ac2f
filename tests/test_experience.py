"""Experience library: robust parsing, keep-what-helps, retrieval, storage, resume, and no label leakage.

The keep/reject decisions are tested with a scripted System 2 and reflector (their answers follow a script,
so the test knows which rule helps and which harms); everything else runs the real VLM reasoner and
reflector on the tiny random Qwen2.5-VL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvr.backends.transformers_vlm import TransformersVlm
from fgvr.experience import (
    ExperienceError,
    ExperienceLibrary,
    Rule,
    TextSimilarity,
    Trial,
    accept,
    build_experience,
    describe_rules,
    extract_json_object,
    parse_rule,
)
from fgvr.slow_path import SlowAnswer

CLASSES = ["coat", "pullover", "shirt", "T-shirt"]
HERE = Path(__file__).parent


# --- parsing -----------------------------------------------------------------------------------------------

NASTY = [
    # (answer text, expected dict or None)
    ('{"classes": ["shirt", "T-shirt"], "cue": "buttons", "rule": "Shirts have buttons.", "applies_when": "tops"}',
     {"classes": ["shirt", "T-shirt"], "cue": "buttons", "rule": "Shirts have buttons.", "applies_when": "tops"}),
    ('Sure! Here it is:\n```json\n{"classes": ["shirt", "T-shirt"], "cue": "buttons", "rule": "x",}\n```\nBye',
     {"classes": ["shirt", "T-shirt"], "cue": "buttons", "rule": "x"}),
    ("{'classes': ['shirt', 'coat'], 'cue': 'length', 'rule': 'A coat's hem falls below the hip.'}",
     {"classes": ["shirt", "coat"], "cue": "length", "rule": "A coat's hem falls below the hip."}),
    ('{classes: ["shirt", "coat"], cue: "length", rule: "coats are long", applies_when: always}',
     {"classes": ["shirt", "coat"], "cue": "length", "rule": "coats are long", "applies_when": "always"}),
    ('{"classes": ["shirt", "coat"], "cue": "length", "rule": "coats are lo',  # cut off mid-string
     {"classes": ["shirt", "coat"], "cue": "length", "rule": "coats are lo"}),
    ('{"classes": ["shirt", "coat"], "cue": "length" "rule": "coats"}',  # missing comma
     {"classes": ["shirt", "coat"], "cue": "length", "rule": "coats"}),
    ('{"classes": ["shirt", "coat"], "cue":', {"classes": ["shirt", "coat"], "cue": None}),  # dangling key
    ('{“classes”: [“shirt”], “rule”: “curly quotes”}', {"classes": ["shirt"], "rule": "curly quotes"}),
    ('{"rule": "first", "classes": ["coat"]} and then {"rule": "second"}', {"rule": "first", "classes": ["coat"]}),
    ('{"classes": ["shirt"], "rule": "True story", "ok": True, "n": None}',
     {"classes": ["shirt"], "rule": "True story", "ok": True, "n": None}),
    ("no json at all, just words", None),
    ("", None),
    ("}{", {}),
    ("[1, 2, 3]", None),
]


@pytest.mark.parametrize("text,want", NASTY)
def test_extract_json_object_repairs_nasty_answers(text, want):
    assert extract_json_object(text) == want


def test_parse_rule_validates_classes_against_the_candidates():
    cands = ["shirt", "T-shirt", "coat"]
    rule, why = parse_rule('{"classes": ["SHIRT", "t_shirt", "dog", "shirt"], "cue": "c", "rule": "r"}', cands)
    assert rule == {"classes": ["shirt", "T-shirt"], "cue": "c", "rule": "r", "applies_when": ""}
    assert parse_rule('{"classes": ["dog", "cat"], "rule": "r"}', cands) == (
        None, "none of the classes ['dog', 'cat'] is a candidate")
    assert parse_rule('{"classes": ["shirt"], "cue": "c"}', cands)[0] is None  # no rule text
    assert parse_rule("I cannot help with that.", cands) == (None, "no JSON object in the answer")
    # one string of classes is split, never fuzzy-matched ("shirts" is not "shirt")
    assert parse_rule('{"classes": "shirt vs coat", "rule": "r"}', cands)[0]["classes"] == ["shirt", "coat"]
    assert parse_rule('{"classes": ["shirts"], "rule": "r"}', cands)[0] is None


# --- acceptance rule, retrieval, storage ------------------------------------------------------------------


def test_acceptance_rule():
    assert accept(Trial(n=6, before=3, after=5, fixed=2, broken=0))  # helps
    assert accept(Trial(n=6, before=3, after=3, fixed=1, broken=1))  # tie that moved the confusion: kept
    assert not accept(Trial(n=0, before=0, after=0, fixed=0, broken=0))  # no accept image to judge it on
    assert not accept(Trial(n=6, before=3, after=3, fixed=0, broken=0))  # changes nothing: tokens for nothing
    assert not accept(Trial(n=6, before=3, after=2, fixed=1, broken=2))  # hurts
    assert Trial(n=4, before=1, after=3, fixed=2, broken=0).effect == 0.5


def _rule(i, classes, effect, support=5):
    return Rule(id=f"r{i}", classes=classes, cue="cue", text=f"rule {i}", effect=effect, support=support)


def test_retrieve_by_candidate_classes_best_effect_first():
    lib = ExperienceLibrary([
        _rule(1, ["shirt", "T-shirt"], 0.10),
        _rule(2, ["coat", "pullover"], 0.50),
        _rule(3, ["shirt", "coat"], 0.30),
        _rule(4, ["T-shirt"], 0.30),
        _rule(5, ["sandal", "sneaker"], 0.90),
    ], classes=CLASSES)
    got = [r.id for r in lib.retrieve(["shirt", "T-shirt"], n=3)]
    assert got == ["r4", "r3", "r1"]  # r4/r3 tie on effect; r4 has all of its classes among the candidates
    assert [r.id for r in lib.retrieve(["shirt", "T-shirt"], n=2)] == ["r4", "r3"]
    # by class id (index into the base's classes), and a candidate set no rule meets
    assert [r.id for r in lib.retrieve([0, 1], n=3)] == ["r2", "r3"]
    assert lib.retrieve(["dress"], n=3) == []
    assert lib.retrieve(["shirt"], n=0) == []


def test_rules_file_versioned_atomic_and_described(tmp_path):
    exp = tmp_path / "experience"
    lib = ExperienceLibrary([_rule(1, ["shirt", "T-shirt"], 0.25, support=8)], CLASSES, exp)
    lib.save()
    data = json.loads((exp / "rules.json").read_text())
    assert data["format_version"] == 1 and data["rules"][0]["classes"] == ["shirt", "T-shirt"]
    assert not list(exp.glob("*.tmp"))
    back = ExperienceLibrary.load(tmp_path, CLASSES)
    assert back.rules[0] == lib.rules[0]
    text = describe_rules(tmp_path)
    assert "shirt / T-shirt" in text and "+0.250" in text and "on 8 images" in text and "rule 1" in text
    assert "no rules" in describe_rules(tmp_path / "elsewhere")
    data["format_version"] = 99
    (exp / "rules.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="format_version 99.*fgvr build-experience"):
        ExperienceLibrary.load(tmp_path)


@pytest.fixture(scope="module")
def minilm():
    return TextSimilarity()


def test_duplicates_by_minilm_similarity(minilm):
    sim = minilm
    assert sim.method == "minilm"  # the offline package is a dependency: the fallback must not be silent here
    assert sim.same("Shirts have buttons down the front; T-shirts do not.",
                    "shirts have buttons down the front, t-shirts don't")
    assert not sim.same("Shirts have buttons down the front.", "Coats reach below the hip.")
    # the inverted rule is close in embedding space (0.93) but must not count as the same rule
    assert not sim.same("Shirts have buttons down the front.", "T-shirts have buttons down the front.")
    assert TextSimilarity(use_model=False).same("Shirts: buttons!", "shirts buttons")


# --- build: a small labelled folder and a knowledge base on the tiny CLIP ----------------------------------

COLOURS = {"coat": (200, 40, 40), "pullover": (40, 200, 40), "shirt": (40, 40, 200), "T-shirt": (200, 200, 40)}


@pytest.fixture(scope="module")
def kb_and_data(tmp_path_factory, tiny_clip_dir):
    """4 classes x 11 images (32x32); the base takes 2 per class, 9 per class are held out (36 images: 12 to
    propose rules on, 12 to accept them on, 12 to report on; 3 of each class in each part)."""
    from fgvr.knowledge_base import build_knowledge_base

    root = tmp_path_factory.mktemp("exp-data")
    data = root / "data"
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (data / name).mkdir(parents=True)
        for i in range(11):
            a = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(data / name / f"{i}.png")
    kb = root / "kb"
    build_knowledge_base(data, kb, shots=2, seed=0, encoder=str(tiny_clip_dir), progress=False)
    return kb, data


@pytest.fixture
def kb_copy(kb_and_data, tmp_path):
    import shutil

    kb, data = kb_and_data
    dst = tmp_path / "kb"
    shutil.copytree(kb, dst)
    return dst, data


def _labels(data: Path) -> dict[str, str]:
    from fgvr.data import read_dataset

    return {str(s.path): s.label for s in read_dataset(data).samples}


class ScriptedSlow:
    """A stand-in System 2 whose answers follow a script (decision tests only):

    * it confuses every shirt for a T-shirt, unless a rule mentioning buttons is in its prompt;
    * a rule whose text starts with 'harmful' makes it answer 'coat' for every image;
    * any other rule changes nothing.
    `kill_after`: SIGKILL this process when rank() is called that many times (the resume test).
    """

    name = "scripted"

    def __init__(self, labels: dict[str, str], classes: list[str], kill_after: int | None = None,
                 stubborn: frozenset = frozenset()):
        self.labels, self.classes, self.kill_after = labels, classes, kill_after
        self.stubborn = stubborn  # images the buttons rule does not fix
        self.calls = 0
        self.queries = []

    def rank(self, queries):
        self.calls += 1
        if self.kill_after is not None and self.calls >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = []
        for q in queries:
            self.queries.append(q)
            names = [self.classes[c] for c in q.candidates]
            truth = self.labels[q.path]
            said = "T-shirt" if truth == "shirt" else truth
            if any("button" in r.text.lower() for r in q.rules) and q.path not in self.stubborn:
                said = truth
            if any(r.text.lower().startswith("harmful") for r in q.rules):
                said = "coat"
            probs = [0.97 if n == said else 0.03 / (len(names) - 1) for n in names]
            out.append(SlowAnswer(probs=probs, rules_used=[r.id for r in q.rules]))
        return out


class ScriptedReflector:
    """Answers per held-out shirt image (in processing order) and attempt: script[i] = (first, retry).
    Keyed by image, not by call count, so that a resumed process answers as the killed one would have."""

    def __init__(self, script: list[tuple[str, str]], order: list[str] | None = None):
        self.script, self.order, self.requests = script, order, []

    def reflect(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            i = self.order.index(r.path) if self.order else 0
            out.append(self.script[min(i, len(self.script) - 1)][1 if r.strict else 0])
        return out


HELPFUL = ("```json\n{'classes': ['shirt', 'T-shirt'], 'cue': 'buttons', "
           "'rule': 'Shirts have buttons down the front; T-shirts don't.', 'applies_when': 'tops',}\n```")
IDLE = '{"classes": ["shirt", "T-shirt"], "cue": "attention", "rule": "Look carefully at the garment."}'
SCRIPT = [
    # first shirt: no JSON at all, then (strict retry) a harmful rule
    ("Hmm, I think it was a shirt because of the collar.",
     '{"classes": ["shirt", "T-shirt"], "cue": "nothing", "rule": "Harmful: when unsure, say coat."}'),
    (IDLE, IDLE),  # second shirt: a rule that changes nothing
    (HELPFUL, HELPFUL),  # third shirt: the rule that helps (single quotes, fences, trailing comma)
]


def _support(kb: Path) -> set[str]:
    m = json.loads((kb / "manifest.json").read_text())
    return {str((Path(m["data"]["root"]) / s["path"]).resolve()) for s in m["support"]}


def _held_out_shirts(kb: Path, data: Path, part: str | None = "propose") -> list[str]:
    """The held-out shirts of one part of the build (all parts with None), in the build's order."""
    from fgvr.data import read_dataset
    from fgvr.experience import split_parts

    support = _support(kb)
    names = [c["name"] for c in sorted(json.loads((kb / "manifest.json").read_text())["classes"],
                                       key=lambda c: c["id"])]
    held = [s for s in read_dataset(data).samples if str(Path(s.path).resolve()) not in support]
    return [it.path for it in split_parts(held, names)
            if names[it.label] == "shirt" and (part is None or it.part == part)]


def _run_scripted(kb: Path, data: Path, slow=None, reflector=None, **kw):
    from fgvr.data import read_dataset

    classes = json.loads((kb / "manifest.json").read_text())["classes"]
    names = [c["name"] for c in sorted(classes, key=lambda c: c["id"])]
    slow = slow or ScriptedSlow(_labels(data), names)
    reflector = reflector or ScriptedReflector(SCRIPT, _held_out_shirts(kb, data))
    summary = build_experience(kb, read_dataset(data), rounds=kw.pop("rounds", 2), k=4, weight=1.0,
                               slow=slow, reflector=reflector, similarity=TextSimilarity(use_model=False),
                               show_progress=False, **kw)
    return summary, slow, reflector


def _log(kb: Path) -> list[dict]:
    return [json.loads(x) for x in (kb / "experience" / "log.jsonl").read_text().splitlines()]


def test_build_keeps_the_helpful_rule_and_rejects_harmful_and_idle_ones(kb_copy):
    kb, data = kb_copy
    summary, slow, refl = _run_scripted(kb, data)
    # 36 held-out images, none of them a support image, in three parts; the shirts are wrong before any rule
    assert summary.images == 36 and not ({q.path for q in slow.queries} & _support(kb))
    assert summary.parts == {"propose": 12, "accept": 12, "report": 12}
    assert summary.accuracy_before == {"propose": 0.75, "accept": 0.75, "report": 0.75}
    assert summary.accuracy_after == {"propose": 1.0, "accept": 1.0, "report": 1.0}

    lib = ExperienceLibrary.load(kb)
    assert len(lib.rules) == 1
    rule = lib.rules[0]
    assert rule.text == "Shirts have buttons down the front; T-shirts don't." and rule.cue == "buttons"
    assert rule.classes == ["shirt", "T-shirt"]
    # measured on the 12 ACCEPT images (all have shirt or T-shirt among their 4 candidates), never on the
    # propose image that wrote it: it fixed the 3 accept shirts
    assert rule.source_image in _held_out_shirts(kb, data, "propose")
    assert (rule.support, rule.fixed, rule.broken, rule.effect) == (12, 3, 0, 0.25)

    events = [(e["event"], e.get("reason")) for e in _log(kb)]
    assert events == [("rejected", "accuracy on its accept images dropped"),
                      ("rejected", "fixed no accept image (its own source image does not count)"),
                      ("accepted", None)]
    harmful = _log(kb)[0]
    assert harmful["trial"] == {"n": 12, "before": 9, "after": 3, "fixed": 0, "broken": 6, "effect": -0.5}
    assert harmful["rule"]["rule"].startswith("Harmful")  # the rejected rule's history stays in the log
    # only propose images are reflected on; the garbage answer was retried once with the strict prompt
    assert {r.path for r in refl.requests} <= set(_held_out_shirts(kb, data, "propose"))
    assert [r.strict for r in refl.requests] == [False, True, False, False]
    assert all(r.truth == "shirt" and r.predicted == "T-shirt" for r in refl.requests)
    assert summary.rounds_run == 2 and (summary.accepted, summary.rejected, summary.parse_failed) == (1, 2, 0)


def test_a_rule_that_fixes_only_its_own_source_image_is_rejected(kb_copy):
    """The buttons rule fixes the shirt that proposed it and no other (every other shirt is stubborn). The
    old in-sample acceptance counted that one fix and kept it; out of sample it fixes nothing: rejected."""
    kb, data = kb_copy
    source = _held_out_shirts(kb, data)[0]
    others = frozenset(_held_out_shirts(kb, data, None)) - {source}
    names = [c["name"] for c in sorted(json.loads((kb / "manifest.json").read_text())["classes"],
                                       key=lambda c: c["id"])]
    slow = ScriptedSlow(_labels(data), names, stubborn=others)
    reflector = ScriptedReflector([(HELPFUL, HELPFUL)], _held_out_shirts(kb, data))
    summary, _, _ = _run_scripted(kb, data, slow=slow, reflector=reflector, rounds=1)
    assert summary.accepted == 0 and ExperienceLibrary.load(kb).rules == []
    first = _log(kb)[0]
    assert first["image"] == source and first["event"] == "rejected"
    assert first["trial"] == {"n": 12, "before": 9, "after": 9, "fixed": 0, "broken": 0, "effect": 0.0}
    assert first["reason"] == "fixed no accept image (its own source image does not count)"
    assert summary.accuracy_after["report"] == summary.accuracy_before["report"] == 0.75


def test_rules_record_the_build_images_and_evaluate_leaves_them_out(kb_copy):
    from fgvr.data import read_dataset
    from fgvr.evaluate import run_evaluation
    from fgvr.pipeline import open_system
    from fgvr.rules import experience_images

    kb, data = kb_copy
    summary, _, _ = _run_scripted(kb, data, reflector=ScriptedReflector([(HELPFUL, HELPFUL)]), max_per_class=6,
                                  rounds=1)  # 24 of the 36 held-out images
    assert summary.images == 24 and summary.accepted == 1
    used = experience_images(kb)
    stored = json.loads((kb / "experience" / "rules.json").read_text())["build"]["images"]
    assert sorted(stored) == ["accept", "propose", "report"] and sum(map(len, stored.values())) == 24 == len(used)
    with open_system(kb, threshold=1.0) as system:
        s = run_evaluation(system, read_dataset(data), kb.parent / "run", {"kb": str(kb), "data": str(data)},
                           progress=False, report=False)
    assert (s["support_images_excluded"], s["experience_images_excluded"], s["n_images"]) == (8, 24, 12)
    done = {json.loads(x)["path"] for x in (kb.parent / "run" / "results.jsonl").read_text().splitlines()}
    assert not (done & used) and len(done) == 12
    # a --fresh build keeps the accepted rules, so it keeps the record of the images that chose them
    _run_scripted(kb, data, reflector=ScriptedReflector([]), max_per_class=3, rounds=1, fresh=True)
    assert used <= experience_images(kb)
    # rules with no record of their images (a rules.json from before the record): refused, never guessed
    rules = json.loads((kb / "experience" / "rules.json").read_text())
    rules["build"] = {}
    (kb / "experience" / "rules.json").write_text(json.dumps(rules))
    with pytest.raises(ExperienceError, match="no record of the images"):
        experience_images(kb)


def test_retrieved_rules_reach_the_prompt_and_are_recorded(kb_copy):
    """After the build, the dual system's slow path gets the kept rule for images whose candidates it
    concerns, and each answer records it."""
    kb, data = kb_copy
    _, slow, _ = _run_scripted(kb, data)
    last = {q.path: q for q in slow.queries}  # each image's last prompt: with the final rules
    assert len(last) == 36 and all([r.id for r in q.rules] == ["r1"] for q in last.values())


def test_unparseable_answers_are_logged_and_skipped(kb_copy):
    kb, data = kb_copy
    garbage = [("", "null"), ("{'classes': ['dog'], 'rule': 'dogs bark'}", "{{{{"), ("[]", "{'rule': ''}")]
    summary, _, refl = _run_scripted(kb, data, reflector=ScriptedReflector(garbage, _held_out_shirts(kb, data)),
                                     rounds=1)
    assert summary.parse_failed == 3 and summary.accepted == 0  # the 3 shirts, each tried twice
    assert len(refl.requests) == 6 and [r.strict for r in refl.requests[:2]] == [False, True]
    log = _log(kb)
    assert [e["event"] for e in log] == ["parse_failed"] * 3
    assert log[0]["answers"] == ["", "null"] and "no JSON object" in log[0]["reason"]
    assert json.loads((kb / "experience" / "rules.json").read_text())["rules"] == []


def test_a_reflector_that_raises_does_not_abort_the_build(kb_copy):
    class Broken:
        def reflect(self, requests):
            raise RuntimeError("CUDA out of memory")

    kb, data = kb_copy
    summary, _, _ = _run_scripted(kb, data, reflector=Broken(), rounds=1)
    assert summary.parse_failed == 3
    assert "CUDA out of memory" in _log(kb)[0]["reason"]


_RESUME_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    import test_experience as t
    kb, data, kill = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    names = [c["name"] for c in sorted(t.json.loads((kb / "manifest.json").read_text())["classes"],
                                       key=lambda c: c["id"])]
    slow = t.ScriptedSlow(t._labels(data), names, kill_after=kill or None)
    t._run_scripted(kb, data, slow=slow)
""")


def test_build_resumes_after_sigkill(kb_copy, tmp_path, kb_and_data):
    import shutil

    kb, data = kb_copy
    reference = tmp_path / "reference"
    shutil.copytree(kb_and_data[0], reference)
    _run_scripted(reference, data)

    cmd = [sys.executable, "-c", _RESUME_SCRIPT, str(HERE), str(kb), str(data)]
    # rank() calls: 1-2 = first pass (two System 2 batches of the pipeline), 3 = harmful trial, 4 = idle
    # trial (killed inside it)
    killed = subprocess.run(cmd + ["4"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = json.loads((kb / "experience" / "progress.json").read_text())
    assert progress["round"] == 1 and len(progress["done"]) >= 1  # the harmful rule's image was checkpointed
    assert [e["event"] for e in _log(kb)] == ["rejected"]

    done = subprocess.run(cmd + ["0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    strip = lambda log: [{k: v for k, v in e.items() if k != "time"} for e in log]  # noqa: E731
    assert strip(_log(kb)) == strip(_log(reference))  # same decisions, none logged twice
    assert (json.loads((kb / "experience" / "rules.json").read_text())
            == json.loads((reference / "experience" / "rules.json").read_text()))


def test_no_label_in_any_reasoning_prompt_with_the_tiny_qwen(kb_copy, tmp_path, kb_and_data, tiny_qwen_dir,
                                                            monkeypatch):
    """The real reasoner and reflector on the tiny random Qwen2.5-VL. Every chat the VLM sees is captured.
    Relabelling every held-out image must leave every reasoning prompt unchanged (they cannot depend on the
    label), while the reflection prompts, whose job is to name the true class, change with it. The random
    model's reflections are not JSON: they are logged and the build goes on."""
    import shutil

    import fgvr.backends.transformers_vlm as sp  # where every chat the in-process VLM sees is rendered
    from fgvr.data import Dataset, Sample, read_dataset
    from fgvr.experience import VlmReflector
    from fgvr.models import parse_spec

    captured: list[str] = []
    real = sp.render_chat

    def spy(processor, messages):
        text = real(processor, messages)
        captured.append(text)
        return text

    monkeypatch.setattr(sp, "render_chat", spy)
    spec = parse_spec(str(tiny_qwen_dir), max_pixels=16 * 28 * 28)
    kb, data = kb_copy
    ds = read_dataset(data)
    held_out = set(_held_out_shirts(kb, data))  # only used to check the relabelling below
    support = {str((Path(json.loads((kb / "manifest.json").read_text())["data"]["root"]) / s["path"]).resolve())
               for s in json.loads((kb / "manifest.json").read_text())["support"]}
    shift = {c: ds.classes[(i + 1) % len(ds.classes)] for i, c in enumerate(ds.classes)}
    relabelled = Dataset(ds.root, ds.classes, [
        s if str(Path(s.path).resolve()) in support else Sample(s.path, shift[s.label]) for s in ds.samples])
    assert held_out and all(Sample(Path(p), "shirt") not in relabelled.samples for p in held_out)

    runs = []
    for dataset, where in ((ds, kb), (relabelled, tmp_path / "kb2")):
        if where != kb:
            shutil.copytree(kb_and_data[0], where)
        captured.clear()
        summary = build_experience(where, dataset, TransformersVlm(spec), rounds=1, k=3, max_per_class=2,
                                   weight=1.0, reflector=VlmReflector(TransformersVlm(spec), max_new_tokens=4),
                                   similarity=TextSimilarity(use_model=False), show_progress=False)
        reasoning = [p for p in captured if "Answer with the letter only." in p]
        reflection = [p for p in captured if "the correct class is" in p]
        assert len(reasoning) + len(reflection) == len(captured)
        runs.append((summary, reasoning, reflection, _log(where)))

    (s1, reason1, refl1, log1), (s2, reason2, refl2, log2) = runs
    # identical prompts whatever the labels (their order follows the parts, which are stratified by label)
    assert reason1 and sorted(reason1) == sorted(reason2)
    for p in reason1:
        assert "correct" not in p and "You answered" not in p
    # the reflections did see the labels (and differ between the runs), and nothing crashed
    assert refl1 and refl2 and refl1 != refl2
    for log, refl in ((log1, refl1), (log2, refl2)):
        failed = [e for e in log if e["event"] == "parse_failed"]
        assert len(failed) * 2 == len(refl)  # each wrong answer: first try + strict retry, then skipped
        for e in failed:
            assert any(f'the correct class is "{e["truth"]}"' in p for p in refl)
    assert s1.rules == 0 and s1.images == 8


def test_cli_build_experience_and_kb_show(kb_copy, tiny_qwen_dir, tiny_clip_dir):
    from click.testing import CliRunner

    from fgvr.cli import cli

    kb, data = kb_copy
    runner = CliRunner()
    res = runner.invoke(cli, ["build-experience", str(kb), str(data), "--vlm", str(tiny_qwen_dir),
                              "--max-per-class", "1", "--top-k", "3", "--max-visual-tokens", "16"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["images"] == 4 and summary["rounds_run"] == 1
    assert json.loads((kb / "experience" / "rules.json").read_text())["format_version"] == 1

    bad = runner.invoke(cli, ["build-experience", str(kb), str(data), "--vlm", str(tiny_clip_dir)])
    assert bad.exit_code != 0 and "must be a VLM model folder" in bad.output

    ExperienceLibrary([_rule(1, ["shirt", "T-shirt"], 0.25, support=12)], CLASSES, kb / "experience").save()
    show = runner.invoke(cli, ["kb", "show", str(kb)])
    assert show.exit_code == 0, show.output
    assert "experience: 1 rule(s)" in show.output and "[shirt / T-shirt]  effect +0.250" in show.output


def test_a_paraphrase_of_a_kept_rule_is_merged_not_trialled(kb_copy, minilm):
    """The buttons rule fixes the accept shirts and two of the three propose shirts; the third propose
    shirt's reflection says the same thing in other words: MiniLM calls it a duplicate over the same classes,
    so it is merged (no second rule, no re-run)."""
    from fgvr.data import read_dataset

    kb, data = kb_copy
    shirts = _held_out_shirts(kb, data)
    names = [c["name"] for c in sorted(json.loads((kb / "manifest.json").read_text())["classes"],
                                       key=lambda c: c["id"])]
    slow = ScriptedSlow(_labels(data), names, stubborn=frozenset(shirts[2:]))
    paraphrase = '{"classes": ["T-shirt", "shirt"], "cue": "buttons", "rule": "shirts have buttons down the front, t-shirts don\'t"}'
    reflector = ScriptedReflector([(HELPFUL, HELPFUL), (HELPFUL, HELPFUL), (paraphrase, paraphrase)], shirts)
    summary = build_experience(kb, read_dataset(data), rounds=1, k=4, weight=1.0, slow=slow, reflector=reflector,
                               similarity=minilm, show_progress=False)
    assert summary.similarity == "minilm"
    lib = ExperienceLibrary.load(kb)
    assert len(lib.rules) == 1 and lib.rules[0].proposals == 2
    assert (lib.rules[0].fixed, lib.rules[0].broken) == (3, 0)
    assert [(e["event"], e.get("into")) for e in _log(kb)] == [("accepted", None), ("merged", "r1")]
    assert "trial" not in _log(kb)[1]  # merged without a re-run
    assert summary.merged == 1 and summary.accuracy_after["propose"] == 11 / 12


def test_log_survives_a_line_cut_by_a_kill(tmp_path):
    from fgvr.experience import ExperienceLog

    f = tmp_path / "experience" / "log.jsonl"
    f.parent.mkdir()
    f.write_text('{"round": 1, "image": "a", "event": "rejected", "rule": {"classes": ["shirt"], "rule": "x"}}\n'
                 '{"round": 1, "image": "b", "ev')  # killed mid-write
    log = ExperienceLog(f)
    assert log.rejected == [{"classes": ["shirt"], "rule": "x"}]
    log.write("rejected", 1, "a", rule={"classes": ["shirt"], "rule": "x"})  # already logged: not again
    log.write("accepted", 1, "c", id="r1")
    lines = f.read_text().splitlines()  # the cut line dropped, the repeat not written, the new line whole
    assert [json.loads(x)["image"] for x in lines] == ["a", "c"] and json.loads(lines[1])["event"] == "accepted"


def test_a_resume_on_other_held_out_images_is_refused_naming_what_differs(kb_copy):
    kb, data = kb_copy
    _run_scripted(kb, data, reflector=ScriptedReflector([]), max_per_class=3, rounds=1)
    progress = (kb / "experience" / "progress.json").read_bytes()
    with pytest.raises(ExperienceError, match=r"another build \(the held-out images or their parts: \S+ then, "
                                              r"\S+ now\); rerun with --fresh"):
        _run_scripted(kb, data, reflector=ScriptedReflector([]), max_per_class=6, rounds=1)
    assert (kb / "experience" / "progress.json").read_bytes() == progress  # nothing of the first build lost
