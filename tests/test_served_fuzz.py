"""Property-based: every JSON a served VLM can answer (a models list, a chat completion with or without
log-probabilities, an error, server-sent chunks, anything else) is read right or refused as one line of an
fgvr error, never a traceback; a refused answer is never cached.

The readers are pure functions of the reply, so most examples run without a server; a smaller set goes over
HTTP to the hostile test server (tests/vlm_server.py --scripted) to check the cache and the per-image
failure end to end. Bounded: a few hundred examples, well under a minute."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fgvr.backends import LETTERS, BackendError, BackendOptions, get_backend
from fgvr.backends.openai_vlm import CACHE_FILE, BadAnswer, model_roots, read_body, read_scores, usage

SERVER = Path(__file__).parent / "vlm_server.py"
MODES = ["logprob_token_ids", "top_logprobs", "choice", "letter"]
IDS = {c: 32 + i for i, c in enumerate(LETTERS)}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)
tokens = st.one_of(st.sampled_from(["A", " A", "a", "ĠB", "▁c", "B", "C", "D", "Hello", "token_id:32", "\n", ""]),
                   st.text(max_size=3), anything)
logprobs = st.one_of(st.floats(-30, 0), st.floats(allow_nan=True, allow_infinity=True), anything)
entry = st.fixed_dictionaries({"token": tokens, "logprob": logprobs})
content = st.lists(st.one_of(st.fixed_dictionaries({"token": tokens, "logprob": logprobs,
                                                    "top_logprobs": st.one_of(st.lists(entry, max_size=6), anything)}),
                             anything), max_size=2)
choice = st.fixed_dictionaries(
    {}, optional={"message": st.one_of(st.fixed_dictionaries({"content": st.one_of(tokens, anything)}), anything),
                  "logprobs": st.one_of(st.fixed_dictionaries({"content": content}), anything),
                  "delta": st.one_of(st.fixed_dictionaries({"content": tokens}), anything)})
completion = st.fixed_dictionaries(
    {}, optional={"choices": st.one_of(st.lists(st.one_of(choice, anything), max_size=2), anything),
                  "model": st.one_of(st.just("scripted"), anything), "error": anything,
                  "object": st.one_of(st.just("chat.completion"), st.just("error"), anything),
                  "usage": st.one_of(st.fixed_dictionaries({"prompt_tokens": anything, "completion_tokens": anything}),
                                     anything)})
replies = st.one_of(completion, anything)
models = st.one_of(st.fixed_dictionaries({"data": st.one_of(
    st.lists(st.one_of(st.fixed_dictionaries({"id": st.one_of(st.text(max_size=6), anything)}), anything), max_size=3),
    anything)}), anything)


def one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e) and "Traceback" not in str(e), str(e)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply=replies, mode=st.sampled_from(MODES), k=st.integers(1, 26), ids=st.booleans())
def test_any_reply_is_read_as_a_distribution_or_refused(reply, mode, k, ids):
    try:
        probs = read_scores(reply, mode, k, IDS if ids else None)
    except BadAnswer as e:
        one_line(e)
        return
    assert len(probs) == k and all(math.isfinite(p) and 0 <= p <= 1 for p in probs)
    assert abs(sum(probs) - 1) < 1e-9
    n_in, n_out = usage(reply)
    assert n_in >= 0 and n_out >= 0


@settings(max_examples=200, deadline=None)
@given(listed=models)
def test_any_models_list_is_read_or_refused_in_one_line(listed):
    try:
        roots = model_roots(listed, "http://127.0.0.1:1/v1")
    except BackendError as e:
        one_line(e)
        return
    assert all(isinstance(i, str) and (r is None or isinstance(r, str)) for i, r in roots.items())


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.one_of(completion, anything), max_size=4), junk=st.sampled_from(["", "data: {oops\n\n",
                                                                                          ": ping\n\n", "data: 7\n\n"]),
       ctype=st.sampled_from(["text/event-stream", "application/json", ""]))
def test_any_stream_of_events_is_merged_or_refused(events, junk, ctype):
    raw = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + junk + "data: [DONE]\n\n"
    try:
        got = read_body(raw.encode(), ctype).data
        read_scores(got, "top_logprobs", 3)
    except BadAnswer as e:
        one_line(e)


# --- over HTTP: a refused answer is never cached, and fails its image alone ---------------------------


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ready = tmp_path_factory.mktemp("fuzz") / "port"
    proc = subprocess.Popen([sys.executable, str(SERVER), "--scripted", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if ready.is_file():
            break
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{ready.read_text()}/v1"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _admin(url: str, **state) -> None:
    req = urllib.request.Request(url.rsplit("/v1", 1)[0] + "/admin", data=json.dumps(state).encode(), method="POST")
    urllib.request.urlopen(req, timeout=10).read()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=replies, token_ids=st.booleans())
def test_a_refused_reply_is_never_cached(url, tmp_path_factory, reply, token_ids):
    cache = tmp_path_factory.mktemp("cache")
    _admin(url, token_ids=token_ids, misbehave=None)
    b = get_backend(url, BackendOptions(retries=0, cache_dir=cache, concurrency=2))
    try:
        _admin(url, misbehave="raw", reply=reply, misbehave_n=1)  # the first question gets it, the second not
        image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
        other = Image.fromarray(np.full((32, 32, 3), 9, np.uint8))
        first, second = [b.score_options(["Which?\nA. x\nB. y"], [im], [2])[0] for im in (image, other)]
        assert second.error is None  # the next image is answered whatever the first one got
        kept = (cache / CACHE_FILE).read_text().splitlines()
        if first.error is not None:
            one_line(Exception(first.error))
            assert len(kept) == 1  # only the good answer
        else:
            assert len(first.probs) == 2 and abs(sum(first.probs) - 1) < 1e-9 and len(kept) == 2
    finally:
        b.close()
        _admin(url, misbehave=None, reply=None, misbehave_n=None, token_ids=True)
