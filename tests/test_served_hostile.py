"""The served System 2 against a hostile server (tests/vlm_server.py --scripted: canned answers, no model),
one that answers every start-up probe right and misbehaves only on real questions.

An answer counts only when it is one: `{}`, no choices, an `error` member, no option letter, empty text, a
reply from another model or not JSON is a failed try (retried, counted, never cached) and fails that image
alone. Every try is bounded in time (a trickling server) and in bytes (a 1.5 GB reply); streamed (SSE)
answers are read; letter tokens are read as tokenizers render them; credentials go only where named; the
served model's identity (URL, model, pixel cap) keys the cache and binds a run."""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from fgvr.backends import BackendError, BackendOptions, get_backend, user_turn
from fgvr.backends.openai_vlm import CACHE_FILE, api_key_for
from vlm_client import admin, serving, state
from vlm_client import request_log as log

DEFAULTS = dict(token_ids=True, logprobs=True, max_logprobs=20, fail_503=0, hang_after=None, delay_s=0.0,
                ignore_logprobs=False, stream_always=False, token_style="plain", letter_boost=0.0,
                models_shape="dict", misbehave=None, misbehave_n=None, reply=None, constraints=True,
                models_reply=None)
# the scripted server's letters: mass 0.9 over 26 letters falling off by exp(-0.7); over A, B, C:
ABC = np.exp(-0.7 * np.arange(3)) / np.exp(-0.7 * np.arange(3)).sum()
QUESTION = "Which one?\nA. x\nB. y\nC. z\nAnswer with the letter only."


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("hostile"), "--scripted", wait_s=30) as url:
        yield url


@pytest.fixture()
def url(hostile):
    with state(hostile, **DEFAULTS):
        yield hostile


def backend(url: str, **kw):
    return get_backend(url, BackendOptions(**{"retries": 1, "backoff_s": 0.01, "timeout_s": 5.0, **kw}))


def image(i: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def real_questions(url: str, since: int) -> list[dict]:
    return [r for r in log(url)[since:] if r["has_image"]]


@pytest.mark.parametrize("how", ["empty", "no_choices", "error_member", "no_letters", "wrong_model", "bad_json"])
@pytest.mark.parametrize("token_ids", [True, False])
def test_a_reply_that_is_not_an_answer_is_a_failed_try_never_cached(url, tmp_path, how, token_ids):
    admin(url, token_ids=token_ids)
    b = backend(url, retries=2, cache_dir=tmp_path)
    assert b.mode == ("logprob_token_ids" if token_ids else "top_logprobs")  # the probes were answered right
    admin(url, misbehave=how)
    before = len(log(url))
    got = b.score_options([QUESTION], [image()], [3])[0]
    assert got.error is not None and not got.probs and "\n" not in got.error and url in got.error
    assert len(real_questions(url, before)) == 3  # retried per --vlm-retries, all refused
    d = b.describe()
    assert d["bad_answers"] == 3 and d["failed_answers"] == 1 and d["cache_hits"] == 0
    assert not (tmp_path / CACHE_FILE).is_file()  # nothing refused is kept for a resume to trust
    admin(url, misbehave=None)  # the same question again: asked, not read from any cache
    again = b.score_options([QUESTION], [image()], [3])[0]
    assert again.error is None and np.allclose(again.probs, ABC) and len(real_questions(url, before)) == 4
    assert len((tmp_path / CACHE_FILE).read_text().splitlines()) == 1
    b.close()


def test_a_bad_reply_then_a_good_one_is_retried_to_the_answer(url):
    b = backend(url, retries=2)
    admin(url, misbehave="empty", misbehave_n=1)
    got = b.score_options([QUESTION], [image()], [3])[0]
    assert got.error is None and np.allclose(got.probs, ABC) and b.describe()["bad_answers"] == 1
    b.close()


def test_an_empty_description_is_a_failure_not_text(url, tmp_path):
    b = backend(url, retries=0)
    admin(url, misbehave="empty_text")
    g = b.generate([[user_turn("Describe the class.")]], [[image()]], 16)[0]
    assert g.error is not None and "empty" in g.error and g.text == ""
    admin(url, misbehave=None)
    g = b.generate([[user_turn("Describe the class.")]], [[image()]], 16)[0]
    assert g.error is None and g.text == "a scripted description of the class"
    b.close()


def test_build_kb_with_empty_descriptions_fails_and_saves_none(url, tmp_path, tiny_clip_dir):
    from click.testing import CliRunner

    from fgvr.cli import cli

    for c in range(2):
        (tmp_path / "d" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            image(10 * c + i).save(tmp_path / "d" / f"class{c}" / f"{i}.png")
    admin(url, misbehave="empty_text")
    r = CliRunner().invoke(cli, ["build-kb", str(tmp_path / "d"), "--shots", "2", "--encoder", str(tiny_clip_dir),
                                 "--vlm", url, "--vlm-retries", "0", "--out", str(tmp_path / "kb")])
    assert r.exit_code != 0 and "description" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "kb" / "descriptions.json").exists()


def test_one_malformed_answer_fails_its_image_alone(url):
    """`choices: ["x"]` (a string where an object is due) used to end the whole batch in an AttributeError."""
    b = backend(url, retries=0, concurrency=1)
    admin(url, misbehave="raw", reply={"choices": ["x"], "model": "scripted"}, misbehave_n=1)
    got = b.score_options([QUESTION] * 3, [image(i) for i in range(3)], [3] * 3)
    assert got[0].error is not None and [g.error for g in got[1:]] == [None, None]
    assert all(np.allclose(g.probs, ABC) for g in got[1:])
    b.close()


def test_a_trickling_server_is_cut_at_the_deadline(url):
    b = backend(url, retries=0, timeout_s=1.0)
    admin(url, misbehave="trickle")
    t0 = time.monotonic()
    got = b.score_options([QUESTION], [image()], [3])[0]
    took = time.monotonic() - t0
    assert got.error is not None and "no answer within 1 s" in got.error
    assert took < 8  # the trickle lasts 60 s; a per-read time-out never fires on it
    b.close()


@pytest.mark.parametrize("how", ["huge", "huge_chunked"])
def test_a_huge_reply_is_refused_with_bounded_memory(url, how):
    b = backend(url, retries=0, max_reply_bytes=2 * 2**20)
    admin(url, misbehave=how)
    tracemalloc.start()
    try:
        got = b.score_options([QUESTION], [image()], [3])[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.error is not None and "cap" in got.error
    assert peak < 16 * 2**20  # the server offers 1.5 GB
    b.close()


def test_a_streamed_answer_is_read_like_a_whole_one(url):
    b = backend(url)
    admin(url, misbehave="sse")
    got = b.score_options([QUESTION], [image()], [3])[0]
    g = b.generate([[user_turn("Describe.")]], [[image()]], 16)[0]
    assert got.error is None and np.allclose(got.probs, ABC) and got.tokens_in == 20
    assert g.error is None and g.text == "a scripted description of the class"
    b.close()


@pytest.mark.parametrize("style", ["space", "lower", "both"])
def test_letter_tokens_are_read_as_tokenizers_render_them(url, style):
    """" A" (leading space), "a", or all three forms at once: the same letter, its mass summed."""
    admin(url, token_ids=False, token_style=style)
    b = backend(url)
    assert b.mode == "top_logprobs"
    got = b.score_options([QUESTION], [image()], [3])[0]
    assert got.error is None and np.allclose(got.probs, ABC, atol=1e-9), got.probs
    b.close()


def test_logprobs_without_any_letter_are_not_a_mode(url):
    """A server whose listed tokens never hold a letter is not scored by them (it would be all guesses)."""
    admin(url, token_ids=False, letter_boost=0.0, misbehave=None)
    admin(url, reply=None)
    b = backend(url)
    assert b.mode == "top_logprobs"
    b.close()
    admin(url, token_style="plain", misbehave="no_letters")  # real questions only: the probe still has letters
    b = backend(url, retries=0)
    got = b.score_options([QUESTION], [image()], [3])[0]
    assert got.error is not None and "none of the option letters" in got.error  # never an equal split
    b.close()


def test_transformers_serve_is_refused_in_one_line_that_says_why(url):
    admin(url, stream_always=True, ignore_logprobs=True, constraints=False)
    with pytest.raises(BackendError, match="transformers serve") as e:
        backend(url)
    assert "\n" not in str(e.value) and "streams" in str(e.value)


def test_models_list_not_an_object_is_a_served_model_error(url, tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli

    admin(url, models_shape="list")
    with pytest.raises(BackendError, match="not an OpenAI model list"):
        backend(url)
    (tmp_path / "kb").mkdir()
    (tmp_path / "data" / "c").mkdir(parents=True)
    image().save(tmp_path / "data" / "c" / "0.png")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "kb"), str(tmp_path / "data"), "--out",
                                 str(tmp_path / "run"), "--vlm", url])
    assert r.exit_code == 5 and "not an OpenAI model list" in r.output and "AttributeError" not in r.output


def test_openai_key_is_not_sent_to_a_host_the_user_did_not_name(url, monkeypatch):
    monkeypatch.delenv("FGVR_VLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    before = len(log(url))
    backend(url).close()
    assert not any(r["auth"] for r in log(url)[before:])
    with pytest.raises(BackendError, match="only over https"):
        backend(url, openai_key=True)
    opts = BackendOptions(openai_key=True)
    assert api_key_for("https://api.example.org/v1", opts, {"OPENAI_API_KEY": "k"}) == "k"
    assert api_key_for("https://api.example.org/v1", BackendOptions(), {"OPENAI_API_KEY": "k"}) is None
    assert api_key_for("http://10.0.0.5/v1", BackendOptions(), {"FGVR_VLM_API_KEY": "f", "OPENAI_API_KEY": "k"}) == "f"
    monkeypatch.setenv("FGVR_VLM_API_KEY", "vlm-key")
    before = len(log(url))
    backend(url).close()
    assert all(r["auth"] for r in log(url)[before:]) and log(url)[before:]


def test_the_cache_and_the_identity_name_the_url(url, tmp_path):
    port = url.split(":")[2].split("/")[0]
    a = backend(url, cache_dir=tmp_path)
    assert a.score_options([QUESTION], [image()], [3])[0].error is None
    other = backend(f"http://localhost:{port}/v1", cache_dir=tmp_path)  # the same answers, another identity
    before = len(log(url))
    assert other.score_options([QUESTION], [image()], [3])[0].error is None
    assert other.describe()["cache_hits"] == 0 and len(real_questions(url, before)) == 1
    assert a.key != other.key and url in a.key and "scripted" in a.key and "maxpx=" in a.key
    assert a.describe()["key"] == a.key
    a.close()
    other.close()


def test_a_forgotten_backend_leaves_no_open_socket(url):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        b = backend(url, concurrency=4)
        b.score_options([QUESTION] * 4, [image(i) for i in range(4)], [3] * 4)
        del b
        gc.collect()
        time.sleep(0.2)
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]


def test_resuming_against_another_served_model_is_refused(url, tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli
    from fgvr.knowledge_base import build_knowledge_base

    for split, n in (("support", 2), ("test", 2)):
        for c in range(2):
            (tmp_path / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                image(100 * c + 10 * n + i + (split == "test")).save(tmp_path / split / f"class{c}" / f"{i}.png")
    build_knowledge_base(tmp_path / "support", tmp_path / "kb", shots=2, progress=False)
    port = url.split(":")[2].split("/")[0]
    args = ["evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--out", str(tmp_path / "run"),
            "--slow-budget", "0.5", "--vlm"]
    r = CliRunner().invoke(cli, [*args, url])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["system2_spec"].startswith(f"openai|{url}|scripted")
    r = CliRunner().invoke(cli, [*args, f"http://localhost:{port}/v1"])
    assert r.exit_code == 6 and "System 2's model" in r.output and "localhost" in r.output
