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

from fgvr.experience import (
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


def test_duplicates_by_minilm_similarity():
    sim = TextSimilarity()
    assert sim.method == "minilm"  # the offline package is a dependency: the fallback must not be silent here
    assert sim.same("Shirts have buttons down the front; T-shirts do not.",
                    "shirts have buttons down the front, t-shirts don't")
    assert not sim.same("Shirts have buttons down the front.", "Coats reach below the hip.")
    assert TextSimilarity(use_model=False).same("Shirts: buttons!", "shirts buttons")
