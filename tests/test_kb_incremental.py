"""Incremental knowledge bases (`fgvr kb add/remove/log/revert`): a changed base answers as a base built from
scratch on the same images, every change is a logged version with its own digest, a killed change leaves
the old version whole, and a second writer is refused."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fakes import pattern_images

from fgvr.binding import knowledge_base_digest
from fgvr.cli import cli
from fgvr.fast_path import system1
from fgvr.knowledge_base import build_knowledge_base, load_knowledge_base
from fgvr.knowledge_base.versions import read_log


def _build(data: Path, out: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer images than k: all of them are used
        return build_knowledge_base(data, out, shots=10, progress=False, **kw)[0]


def _kb(*args: str) -> str:
    result = CliRunner().invoke(cli, ["kb", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def _assert_same_answers(kb, ref) -> None:
    """Same classes (by name), same fusion, and System 1 posteriors within 1e-5 on queries of every class
    and on random directions."""
    assert sorted(kb.classes) == sorted(ref.classes)
    assert {k: kb.fusion[k] for k in ("w", "tau", "exemplar_weight")} == \
        {k: ref.fusion[k] for k in ("w", "tau", "exemplar_weight")}
    g = torch.Generator().manual_seed(0)
    queries = torch.cat([ref.exemplars, torch.nn.functional.normalize(torch.randn(8, ref.embed_dim, generator=g), dim=1)])
    order = [kb.classes.index(c) for c in ref.classes]
    got, want = system1(kb, queries, k=1).probs[:, order], system1(ref, queries, k=1).probs
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    for c in ref.classes:  # the leave-one-out statistics per class, too
        i, j = kb.classes.index(c), ref.classes.index(c)
        assert int(kb.stats.true_total[i]) == int(ref.stats.true_total[j])
        assert int(kb.stats.true_correct[i]) == int(ref.stats.true_correct[j])


@pytest.fixture()
def data(tmp_path) -> Path:
    """all/: 3 patterns x 3 images; base/: the same without red_disc."""
    pattern_images(tmp_path / "all", 3, seed=0)
    shutil.copytree(tmp_path / "all", tmp_path / "base")
    shutil.rmtree(tmp_path / "base" / "red_disc")
    return tmp_path


def test_add_class_then_remove_it_equals_fresh_builds(data):
    kb_dir = data / "kb"
    before = knowledge_base_digest(_build(data / "base", kb_dir))
    out = _kb("add", kb_dir, data / "all" / "red_disc", "--label", "red disc")
    assert "version 2 (add)" in out and "images encoded 3" in out
    added = load_knowledge_base(kb_dir)
    _assert_same_answers(added, _build(data / "all", data / "ref"))
    assert knowledge_base_digest(added) != before  # runs and caches bound to version 1 refuse version 2

    _kb("remove", kb_dir, "--class", "red disc")
    removed = load_knowledge_base(kb_dir)
    _assert_same_answers(removed, load_knowledge_base(kb_dir / "versions" / "1"))
    assert knowledge_base_digest(removed) == before  # the same content as the base as built


def test_add_and_remove_images_of_an_existing_class(data):
    extra = data / "extra"
    pattern_images(extra, 2, seed=7)  # two more images per pattern
    kb_dir = data / "kb"
    _build(data / "base", kb_dir)
    _kb("add", kb_dir, extra / "blue_stripes" / "0.png", extra / "blue_stripes" / "1.png", "--label", "blue stripes")
    ref_data = data / "ref-data"
    shutil.copytree(data / "base", ref_data)
    for i in (0, 1):
        shutil.copy(extra / "blue_stripes" / f"{i}.png", ref_data / "blue_stripes" / f"x{i}.png")
    kb = load_knowledge_base(kb_dir)
    assert kb.classes == ["blue stripes", "green checker"]
    assert int((kb.exemplar_labels == 0).sum()) == 5
    _assert_same_answers(kb, _build(ref_data, data / "ref"))

    _kb("remove", kb_dir, "--image", extra / "blue_stripes" / "1.png")
    (ref_data / "blue_stripes" / "x1.png").unlink()
    _assert_same_answers(load_knowledge_base(kb_dir), _build(ref_data, data / "ref2"))


def test_new_class_gets_a_text_prototype(data, tiny_clip_dir):
    kb_dir = data / "kb"
    _build(data / "base", kb_dir, encoder=str(tiny_clip_dir))
    _kb("add", kb_dir, data / "all" / "red_disc", "--label", "red disc")
    kb, ref = load_knowledge_base(kb_dir), _build(data / "all", data / "ref", encoder=str(tiny_clip_dir))
    assert kb.text_prototypes.shape == ref.text_prototypes.shape
    assert torch.allclose(kb.text_prototypes[kb.classes.index("red disc")],
                          ref.text_prototypes[ref.classes.index("red disc")], atol=1e-5)
    _assert_same_answers(kb, ref)


def test_log_and_revert_restore_an_earlier_digest(data):
    kb_dir = data / "kb"
    _build(data / "base", kb_dir)
    (kb_dir / "experience").mkdir()
    (kb_dir / "experience" / "rules.json").write_text("[]")
    _kb("add", kb_dir, data / "all" / "red_disc", "--label", "red disc")
    v2 = knowledge_base_digest(load_knowledge_base(kb_dir))
    _kb("remove", kb_dir, "--image", data / "all" / "red_disc" / "0.png")
    assert knowledge_base_digest(load_knowledge_base(kb_dir)) != v2
    _kb("revert", kb_dir, "2")
    assert knowledge_base_digest(load_knowledge_base(kb_dir)) == v2
    assert (kb_dir / "experience" / "rules.json").read_text() == "[]"  # kept with the base

    log = read_log(kb_dir)
    assert [(r.version, r.change) for r in log] == [(1, "build"), (2, "add"), (3, "remove"), (4, "revert")]
    assert log[3].digest == log[1].digest != log[2].digest
    assert log[1].detail == {"label": "red disc", "new_class": True, "images": 3} and "@" in log[1].who
    lines = _kb("log", kb_dir).splitlines()
    assert len(lines) == 4 and "revert" in lines[3] and "to=2" in lines[3]

    runner = CliRunner()
    assert runner.invoke(cli, ["kb", "revert", str(kb_dir), "9"]).exit_code == 4  # no such version
    assert runner.invoke(cli, ["kb", "remove", str(kb_dir), "--class", "nope"]).exit_code == 4
    last = runner.invoke(cli, ["kb", "remove", str(kb_dir), "--image", str(data / "base" / "green_checker")])
    assert last.exit_code == 4 and "not a support image" in last.output
    assert len(read_log(kb_dir)) == 4  # refused changes make no version


# `fgvr kb ...` that pauses for a minute just before swapping the new version in (after the staged copy is
# complete), after writing a marker file (argv[1]), so the test can try a second writer and then kill it.
PAUSED_CHANGE = """
import sys, time
from pathlib import Path
from fgvr import cli
from fgvr.knowledge_base import versions
marker = Path(sys.argv[1])
def _swap(stage, path):
    marker.write_text("staged")
    time.sleep(60)
versions._swap = _swap
sys.argv = ["fgvr", *sys.argv[2:]]
cli.main()
"""


def test_killed_add_leaves_the_old_version_and_a_second_writer_is_refused(data):
    kb_dir = data / "kb"
    before = knowledge_base_digest(_build(data / "base", kb_dir))
    marker = data / "staged"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CHANGE, str(marker), "kb", "add", str(kb_dir),
                             str(data / "all" / "red_disc"), "--label", "red disc"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, "the add ended before it could be killed"
            assert time.time() < deadline, "the add did not reach its swap within 120 s"
            time.sleep(0.05)
        second = CliRunner().invoke(cli, ["kb", "remove", str(kb_dir), "--class", "green checker"])
        assert second.exit_code == 7 and "is being written by" in second.output  # LockedError
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(data.glob(".kb.stage-*"))  # the new version was complete beside the old one
    old = load_knowledge_base(kb_dir)  # checksums verified
    assert knowledge_base_digest(old) == before and old.classes == ["blue stripes", "green checker"]
    assert [r.change for r in read_log(kb_dir)] == ["build"]

    _kb("add", kb_dir, data / "all" / "red_disc", "--label", "red disc")  # the rerun cleans up and succeeds
    assert not list(data.glob(".kb.stage-*")) and not list(data.glob(".kb.add-partial"))
    assert load_knowledge_base(kb_dir).classes[-1] == "red disc"


def test_removing_a_class_retires_the_rules_that_name_it(data):
    from fgvr.rules import ExperienceLibrary, Rule

    kb_dir = data / "kb"
    _build(data / "all", kb_dir)
    lib = ExperienceLibrary.load(kb_dir)
    lib.rules = [Rule("r1", ["Red_Disc", "blue stripes"], "a disc", "A red disc is round."),
                 Rule("r2", ["green checker", "blue stripes"], "squares", "Checks are squares.")]
    lib.images = {"accept": ["/x/1.png"]}
    lib.save()
    _kb("remove", kb_dir, "--class", "red disc")
    kept = ExperienceLibrary.load(kb_dir)
    assert [r.id for r in kept.rules] == ["r2"] and kept.images == {"accept": ["/x/1.png"]}
    retired = json.loads((kb_dir / "experience" / "retired.json").read_text())
    assert [(r["rule"]["id"], r["reason"]) for r in retired] == [("r1", "class 'red disc' removed")]
    assert read_log(kb_dir)[-1].detail == {"class": "red disc", "images": 3, "rules_retired": 1}
    _kb("remove", kb_dir, "--image", data / "all" / "blue_stripes" / "0.png")  # an image: no rule retired
    assert [r.id for r in ExperienceLibrary.load(kb_dir).rules] == ["r2"]
