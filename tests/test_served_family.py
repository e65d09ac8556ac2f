"""A served VLM's images are sized for its own VLM family: the family `--vlm-family` names, else the one whose
declaration recognises the served model (the `root` /v1/models lists, the id, the `model` its answers name),
else the default family with a warning. Against tests/vlm_server.py --scripted, which logs the size of every
image it receives. The family binds the run like the model does; an unknown name is one line."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from fgvr.backends import BackendError, BackendOptions, get_backend
from fgvr.models import families
from fgvr.models.family import VlmDeclaration
from vlm_client import admin, serving, state
from vlm_client import request_log as log

QUESTION = "Which one?\nA. x\nB. y\nC. z\nAnswer with the letter only."
VLMS = [f.name for f in families.by_role("vlm")]
DEFAULT = families.default_vlm_family().name
NAMES = dict(served_name=None, root=None, answer_name=None)
# ids as the hub and the engines spell them (vLLM lists the id it was started with)
HUB_IDS = [("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"), ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"),
           ("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl"), ("OpenGVLab/InternVL3-8B-hf", "internvl"),
           ("OpenGVLab/InternVL2_5-8B", "internvl"), ("/models/qwen2.5-vl-7b", "qwen2_5_vl")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("family-server"), "--scripted", wait_s=30) as url:
        yield url


@pytest.fixture()
def url(server):
    with state(server, **NAMES):
        yield server


def photo() -> Image.Image:
    """300 wide, 200 high: 308x196 on Qwen2.5-VL's 28-pixel grid, 320x224 on Qwen3-VL's 32-pixel grid
    (enlarged to its 65,536-pixel floor), sent as it is to InternVL (its processor tiles the original)."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))


def backend(url: str, **kw):
    return get_backend(url, BackendOptions(**{"retries": 1, "backoff_s": 0.01, "timeout_s": 5.0, **kw}))


def sent_size(url: str, b) -> tuple[int, int]:
    """Score one question with `photo()`; the (width, height) the server received."""
    before = len(log(url))
    assert b.score_options([QUESTION], [photo()], [3])[0].error is None
    sizes = [tuple(s) for e in log(url)[before:] if e["has_image"] for s in e["image_sizes"]]
    assert len(sizes) == 1, sizes
    return sizes[0]


def expected_size(family: str, b) -> tuple[int, int]:
    """What family `family`'s processor would see, at the cap the backend chose, and a check that the family
    is on a grid where it resizes (a multiple of its patch, i.e. patch size x merge size, per side)."""
    decl = families.vlm_declaration(family)
    w, h = decl.fit_pixels(photo(), b.options.max_pixels, b.options.min_pixels).size
    if type(decl).fit_pixels is VlmDeclaration.fit_pixels:  # resized onto a patch grid (not tiled)
        assert w % decl.patch == 0 and h % decl.patch == 0, (family, w, h)
    return w, h


def test_the_photo_tells_every_family_apart():
    """The test image lands on a different size for each VLM family, so a family's test cannot pass by
    being sent the default family's pixels."""
    sizes = {f: families.vlm_declaration(f).fit_pixels(photo()).size for f in VLMS}
    assert len(set(sizes.values())) == len(VLMS), sizes


@pytest.mark.parametrize("family", VLMS)
def test_a_served_model_gets_its_given_familys_pixels(url, family):
    b = backend(url, family=family)
    assert b.family == family and b.family_reason == "given by --vlm-family"
    assert sent_size(url, b) == expected_size(family, b)
    assert b.describe()["family"] == family
    # the default family stays out of the key: runs and caches made before the family was chosen used its
    # pixels and must resume; every other family is in it
    assert (f"|family={family}|" in b.key) == (family != DEFAULT) and b.key.count("|family=") <= 1
    b.close()


@pytest.mark.parametrize("served_id,family", HUB_IDS)
def test_the_family_is_inferred_from_the_served_models_id(url, served_id, family, caplog):
    admin(url, served_name=served_id)
    with caplog.at_level(logging.INFO, logger="fgvr"):
        b = backend(url)
    assert (b.family, b.family_reason) == (family, f"inferred from the served model id {served_id!r}")
    assert sent_size(url, b) == expected_size(family, b)
    said = [r.getMessage() for r in caplog.records if "images sized for VLM family" in r.getMessage()]
    assert said == [f"{url}: images sized for VLM family {family} (inferred from the served model id {served_id!r})"]
    b.close()


@pytest.mark.parametrize("family", VLMS)
def test_every_known_model_name_of_a_family_is_recognised_as_that_family(family):
    names = list(families.get(family).known_configs)
    assert names, f"{family} declares no known model names"
    for name in names:
        for served in (name, f"org/{name}", f"/models/{name}/"):
            assert [f.name for f in families.recognising_vlm_families(served)] == [family], served


def test_an_id_no_family_recognises_is_recognised_by_none():
    for served in ("scripted", "gpt-4o", "my-vlm", "llava-v1.6-mistral-7b", "Qwen/Qwen2.5-7B-Instruct",
                   "/tmp/test_qwen3_vl0/internvl/tinyqwen"):  # the folders above the model's say nothing
        assert families.recognising_vlm_families(served) == (), served


def test_the_root_vllm_lists_names_the_family_behind_an_alias(url):
    admin(url, served_name="my-vlm", root="/data/models/Qwen3-VL-8B-Instruct")
    b = backend(url)
    assert b.model == "my-vlm" and b.family == "qwen3_vl" and "Qwen3-VL-8B-Instruct" in b.family_reason
    assert sent_size(url, b) == expected_size("qwen3_vl", b)
    b.close()


def test_the_model_the_answers_name_is_asked_last(url):
    """A proxy listing an alias and answering as the model behind it (LiteLLM's `model_name`)."""
    admin(url, served_name="vision", answer_name="OpenGVLab/InternVL3-8B-hf")
    b = backend(url)
    assert b.family == "internvl" and b.answered_model == "OpenGVLab/InternVL3-8B-hf"
    assert sent_size(url, b) == photo().size
    b.close()


def test_an_unrecognised_model_gets_the_default_family_with_a_warning(url, caplog):
    with caplog.at_level(logging.INFO, logger="fgvr"):
        b = backend(url)
    assert b.family == DEFAULT and b.family_reason.startswith("the default")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "images sized for" in r.getMessage()]
    assert len(warned) == 1 and "'scripted'" in warned[0].getMessage() and "--vlm-family" in warned[0].getMessage()
    assert sent_size(url, b) == expected_size(DEFAULT, b)
    b.close()


@pytest.mark.parametrize("family", VLMS)
def test_the_given_family_wins_over_the_inferred_one(url, family):
    other_id = next(i for i, f in HUB_IDS if f != family)  # an id that names another family
    admin(url, served_name=other_id)
    b = backend(url, family=family)
    assert b.family == family and b.family_reason == "given by --vlm-family"
    assert sent_size(url, b) == expected_size(family, b)
    b.close()


def test_the_cap_in_visual_tokens_is_counted_on_the_chosen_familys_grid(url):
    admin(url, served_name="Qwen/Qwen3-VL-8B-Instruct")
    b = backend(url, max_visual_tokens=64)
    decl = families.vlm_declaration("qwen3_vl")
    assert b.options.max_pixels == decl.pixels_for_tokens(64) == 64 * 32 * 32
    assert b.options.min_pixels == decl.default_min_pixels and f"maxpx={64 * 32 * 32}" in b.key
    b.close()


@pytest.mark.parametrize("name", ["qwen9_vl", "clip"])
def test_an_unknown_family_is_one_line_before_anything_is_sent(url, name):
    before = len(log(url))
    with pytest.raises(BackendError) as e:
        backend(url, family=name)
    msg = str(e.value)
    assert "\n" not in msg and f"--vlm-family {name}" in msg and "not a VLM family" in msg
    assert all(f in msg for f in VLMS)
    assert len(log(url)) == before  # refused before the server was asked


def test_a_ray_actors_copy_chooses_the_same_family(url):
    admin(url, served_name="Qwen/Qwen3-VL-8B-Instruct")
    for kw in ({}, {"family": "internvl"}):
        b = backend(url, **kw)
        copy = pickle.loads(pickle.dumps(b))
        assert (copy.family, copy.key) == (b.family, b.key)
        b.close()
        copy.close()


def test_a_bench_is_bound_to_the_family(url):
    """`fgvr bench` reuses a done cell only when its settings match: the family is one of them."""
    from fgvr.bench import vlm_identity

    keys = set()
    for family in VLMS:
        b = backend(url, family=family)
        keys.add(vlm_identity(b)[0])
        assert (f"family={family}" in vlm_identity(b)[0]) == (family != DEFAULT)
        b.close()
    assert len(keys) == len(VLMS)


def test_a_local_folder_refuses_another_family(tiny_qwen_dir):
    with pytest.raises(BackendError, match="is a Qwen2.5-VL model"):
        get_backend(str(tiny_qwen_dir), BackendOptions(family="qwen3_vl"))
    with pytest.raises(BackendError, match="not a VLM family"):
        get_backend(str(tiny_qwen_dir), BackendOptions(family="qwen9_vl"))


def test_every_command_with_a_vlm_takes_a_vlm_family_listing_the_declared_families():
    import click

    from fgvr.cli import cli

    def commands(group, prefix=()):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, (*prefix, name))
            else:
                yield (*prefix, name), cmd

    with_vlm = {path: cmd for path, cmd in commands(cli) if any("--vlm" in p.opts for p in cmd.params)}
    assert {("classify",), ("evaluate",), ("bench",), ("serve",), ("build-kb",), ("build-experience",),
            ("kb", "add")} <= set(with_vlm)
    for path, cmd in with_vlm.items():
        if path == ("memory", "plan"):  # plans, opens no server: no image is sent
            continue
        opt = next((p for p in cmd.params if "--vlm-family" in p.opts), None)
        assert opt is not None, f"fgvr {' '.join(path)} has --vlm but no --vlm-family"
        ctx = click.Context(cmd)
        assert opt.type.get_metavar(opt, ctx) == "[" + "|".join(VLMS) + "]"


def test_the_cli_option_reaches_the_run_and_binds_it(url, tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli
    from fgvr.knowledge_base import build_knowledge_base

    for split, n in (("support", 2), ("test", 2)):
        for c in range(2):
            (tmp_path / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.random.default_rng(100 * c + 10 * n + i + (split == "test")).integers(
                    0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / f"class{c}" / f"{i}.png")
    build_knowledge_base(tmp_path / "support", tmp_path / "kb", shots=2, progress=False)
    args = ["evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--out", str(tmp_path / "run"),
            "--slow-budget", "0.5", "--vlm", url]
    before = len(log(url))
    r = CliRunner().invoke(cli, [*args, "--vlm-family", "qwen3_vl"])
    assert r.exit_code == 0, r.output
    assert f"{url}: images sized for VLM family qwen3_vl (given by --vlm-family)" in r.output
    spec = json.loads((tmp_path / "run" / "run.json").read_text())["system2_spec"]
    assert spec.startswith(f"openai|{url}|scripted|family=qwen3_vl|")
    sizes = [tuple(s) for e in log(url)[before:] if e["has_image"] for s in e["image_sizes"]]
    assert sizes and all(w % 32 == 0 and h % 32 == 0 for w, h in sizes), sizes
    # the same run resumed with images for another family: refused like another model
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 6 and "System 2's model" in r.output and "family" in r.output, r.output
    r = CliRunner().invoke(cli, [*args, "--vlm-family", "qwen9_vl"])
    assert r.exit_code == 2 and "not a VLM family" in r.output
    assert [line for line in r.output.splitlines() if line.startswith("Error:")] == [
        line for line in r.output.splitlines() if "qwen9_vl" in line]
