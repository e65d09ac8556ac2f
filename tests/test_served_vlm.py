"""System 2 on a served VLM: the OpenAI-compatible backend against a real server process on loopback
(tests/vlm_server.py: the tiny Qwen2.5-VL answering from its real logits in vLLM's response shape).

Served and in-process give the same option probabilities; each scoring mode the client falls back to;
503s retried; a hung server timed out; a server down at start is one clear error; `fgvr evaluate --vlm URL`
end to end, killed with SIGKILL mid-run and resumed without repeating an answered request."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgvr.backends import LETTERS, BackendError, BackendOptions, fit_pixels, get_backend, user_turn
from fgvr.backends.openai_vlm import OpenAIVlm, fill_missing, letter_masses
from fgvr.backends.transformers_vlm import TransformersVlm, letter_token_ids, render_chat, vlm_inputs
from fgvr.models import parse_spec, registry
from vlm_client import admin, serving, state, stats

CAP = dict(max_pixels=64 * 28 * 28, min_pixels=4 * 28 * 28)
QUESTIONS = ["Which one of these is shown in the image?\nA. coat\nB. shirt\nC. dress\nAnswer with the letter only.",
             "Which one?\nA. red\nB. blue\nAnswer with the letter only.",
             "Which one of these is shown?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer with the letter only."]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 200), (56, 90), (640, 480))]


DEFAULT_STATE = dict(token_ids=True, logprobs=True, max_logprobs=20, fail_503=0, hang_after=None, delay_s=0.0,
                     ignore_logprobs=False, stream_always=False, token_style="plain", letter_boost=0.0,
                     models_shape="dict", misbehave=None, misbehave_n=None, reply=None, constraints=True,
                     models_reply=None)


@pytest.fixture(scope="module")
def server(talkative_qwen_dir, tmp_path_factory):
    """The tiny Qwen2.5-VL that writes visible text (the plain one writes only newlines: no answer)."""
    with serving(tmp_path_factory.mktemp("server"), "--model", str(talkative_qwen_dir), "--max-batch", "4") as url:
        yield url


@pytest.fixture()
def url(server):
    with state(server, **DEFAULT_STATE):
        yield server


@pytest.fixture(scope="module")
def local(talkative_qwen_dir):
    return TransformersVlm(parse_spec(str(talkative_qwen_dir), **CAP), batch_size=2)


def served(url: str, **kw) -> OpenAIVlm:
    return get_backend(url, BackendOptions(**CAP, **kw))


def local_logp(spec, question: str, image: Image.Image) -> torch.Tensor:
    """The full next-token log-softmax after the prompt, unbatched (what a server's raw_logprobs are)."""
    with registry.use(spec) as vlm:
        inputs = vlm_inputs(vlm, [render_chat(vlm.processor, [user_turn(question)])], [image])
        with torch.inference_mode():
            return torch.log_softmax(vlm.model(**inputs).logits[0, -1].float(), -1)


def test_served_and_local_give_the_same_option_probabilities(url, local):
    images = _images()
    k = [3, 2, 5]
    b = served(url)
    assert b.mode == "logprob_token_ids" and b.model == local.spec.name
    assert b.letter_ids["A"] == 32  # the server's tokenizer: the real Qwen vocabulary
    here, there = local.score_options(QUESTIONS, images, k), b.score_options(QUESTIONS, images, k)
    for h, t, n in zip(here, there, k):
        assert t.error is None and len(t.probs) == n
        assert np.allclose(h.probs, t.probs, atol=1e-4), (h.probs, t.probs)
        assert t.tokens_in == h.tokens_in  # same prompt, same capped image: the same number of tokens
    # the image went at the cap, not at its original size
    assert fit_pixels(images[2], **CAP).size[0] * fit_pixels(images[2], **CAP).size[1] <= CAP["max_pixels"]
    # text: the same greedy continuation as the in-process model writes
    conv = [[user_turn("Describe the pictures.", n_images=2)]]
    g_served, g_local = b.generate(conv, [images[:2]], 6)[0], local.generate(conv, [images[:2]], 6)[0]
    assert g_served.error is None and g_served.text == g_local.text
    assert (g_served.tokens_in, g_served.tokens_out) == (g_local.tokens_in, g_local.tokens_out) and g_local.tokens_out > 0
    d = b.describe()
    assert d["backend"] == "openai" and d["mode"] == "logprob_token_ids" and d["url"] == url
    assert "api_key" not in json.dumps(d).lower()


def test_none_of_these_is_one_more_letter_on_both_backends(url, local):
    """Open set: the reasoner asks for k + 1 letters, the last "none of these"; the served and in-process
    backends score that letter alike, and the reasoner keeps its probability apart from the candidates'."""
    from fgvr.slow_path import SlowQuery, VlmReasoner

    images = _images()[:2]
    names = ["red disc", "blue stripes", "green checker"]
    queries = [SlowQuery(image=im, candidates=[0, 1, 2]) for im in images]
    got = {}
    for name, backend in (("local", local), ("served", served(url))):
        answers = VlmReasoner(backend, names, none_option=True).rank(queries)
        assert all(a.error is None and len(a.probs) == 3 and a.none_prob is not None for a in answers)
        assert all(abs(sum(a.probs) + a.none_prob - 1) < 1e-4 for a in answers)
        got[name] = [a.probs + [a.none_prob] for a in answers]
    assert np.allclose(got["local"], got["served"], atol=1e-4)
    assert "D. none of these" in VlmReasoner(local, names, none_option=True).question(queries[0])[0]


def test_top_logprobs_fallback_and_the_missing_letter_rule(url, local):
    # an older vLLM started with --max-logprobs 5, serving a model that answers letters (a random one would
    # list none of them, and a list without letters is not an answer)
    admin(url, token_ids=False, max_logprobs=5, letter_boost=1.5)
    b = served(url)
    assert b.mode == "top_logprobs" and b.top_n == 5
    images = _images()
    got = b.score_options(QUESTIONS, images, [3, 2, 5])
    boost = torch.zeros(151936)
    boost[32:37] = 1.5  # the ids of A..E
    with registry.use(local.spec) as vlm:
        decode = vlm.tokenizer.decode
    for q, im, g, k in zip(QUESTIONS, images, got, [3, 2, 5]):
        lp = torch.log_softmax(local_logp(local.spec, q, fit_pixels(im, **CAP)) + boost, -1)
        top = lp.topk(5)
        listed = {decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}
        assert g.error is None and np.allclose(g.probs, fill_missing(listed, letter_masses(listed, LETTERS[:k])), atol=1e-4)
    # the rule itself: a missing letter shares the leftover mass, never above the smallest listed entry
    p = fill_missing({"A": np.log(0.5), "x": np.log(0.3), "y": np.log(0.15)}, [np.log(0.5), None, None])
    assert np.allclose(p, np.array([0.5, 0.025, 0.025]) / 0.55)
    p = fill_missing({"A": np.log(0.5), "x": np.log(0.01)}, [np.log(0.5), None])
    assert np.allclose(p, np.array([0.5, 0.01]) / 0.51)


def test_no_logprobs_falls_back_to_a_constrained_choice(url, local):
    admin(url, logprobs=False)  # a server that answers 400 to logprobs
    b = served(url)
    assert b.mode == "choice" and b.choice_field == "structured_outputs"
    images = _images()
    want = local.score_options(QUESTIONS, images, [3, 2, 5])
    for g, w in zip(b.score_options(QUESTIONS, images, [3, 2, 5]), want):
        assert g.error is None and sorted(g.probs) == [0.0] * (len(g.probs) - 1) + [1.0]
        assert int(np.argmax(g.probs)) == int(np.argmax(w.probs))  # one-hot at the model's own choice


def test_503_twice_then_200_is_retried(url):
    b = served(url, retries=3, backoff_s=0.01)
    before = len(stats(url)["requests"])
    admin(url, fail_503=2)
    got = b.score_options(QUESTIONS[:1], _images()[:1], [3])[0]
    assert got.error is None and len(got.probs) == 3
    log = stats(url)["requests"][before:]
    assert [r["status"] for r in log] == [503, 503, 200] and len({r["digest"] for r in log}) == 1


def test_a_hung_server_times_out_and_the_row_fails_alone(url):
    b = served(url, timeout_s=0.5, retries=1, backoff_s=0.01)
    admin(url, hang_after=stats(url)["answered_images"])
    t0 = time.perf_counter()
    got = b.score_options(QUESTIONS[:1], _images()[:1], [3])[0]
    assert got.error is not None and "no answer within 0.5 s" in got.error and url in got.error
    assert time.perf_counter() - t0 < 10
    admin(url, hang_after=None)


def test_a_server_down_at_start_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(BackendError, match=f"http://127.0.0.1:{port}/v1 does not answer"):
        get_backend(f"http://127.0.0.1:{port}/v1", BackendOptions(timeout_s=2))


def test_model_name_is_checked(url):
    with pytest.raises(BackendError, match="not served"):
        served(url, model="qwen2.5-vl-72b")


def test_letters_tokenise_alone_as_after_the_prompt(local):
    """The served path asks for the letters' ids tokenised alone: the same ids as after the assistant prefix."""
    with registry.use(local.spec) as vlm:
        prompt = render_chat(vlm.processor, [user_turn(QUESTIONS[0])])
        assert letter_token_ids(vlm.tokenizer, prompt, 26) == [vlm.tokenizer(c)["input_ids"][0]
                                                                for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


# ------------------------------------------------------------------------------------------------------
# fgvr evaluate against the server, killed mid-run and resumed


def _fgvr(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fgvr.cli import main; main()", *args]


def _noisy_images(root: Path, per_class: int, seed: int) -> None:
    """Three classes of mostly-noise images with a faint tint: System 1 is unsure, so the trigger has a
    spread of scores to rank (clean patterns are all certain and a budget would send none slow)."""
    rng = np.random.default_rng(seed)
    for c, tint in enumerate([(40, 0, 0), (0, 40, 0), (0, 0, 40)]):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 216, (32, 32, 3)) + np.array(tint)
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")


@pytest.mark.slow
def test_evaluate_end_to_end_kill_9_and_resume_repeats_no_request(url, tmp_path):
    from fgvr.knowledge_base import build_knowledge_base

    _noisy_images(tmp_path / "support", 3, seed=0)
    _noisy_images(tmp_path / "test", 4, seed=1)
    build_knowledge_base(tmp_path / "support", tmp_path / "kb", shots=3, progress=False)
    run = tmp_path / "run"
    cmd = _fgvr("evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--out", str(run), "--vlm", url,
                "--slow-budget", "0.3", "--vlm-concurrency", "1", "--max-visual-tokens", "64")
    start = stats(url)
    admin(url, hang_after=start["answered_images"] + 2)  # answer two System 2 requests, then hang
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = run / "vlm-cache" / "answers.jsonl"
    try:
        for _ in range(3000):  # (bounded: 5 minutes on a loaded machine) until two answers are in the run's cache and the third request hangs
            log = [r for r in stats(url)["requests"][len(start["requests"]):] if r["has_image"]]
            if len(log) >= 3 and cache.is_file() and len(cache.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError("the run did not reach its third System 2 request")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = [r for r in stats(url)["requests"][len(start["requests"]):] if r["has_image"]]
    answered_before = {r["digest"] for r in first if r["status"] == 200}
    assert len(answered_before) == 2 and not (run / "results.jsonl").is_file()
    admin(url, hang_after=None)
    mid = len(stats(url)["requests"])
    done = subprocess.run(cmd, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    second = [r for r in stats(url)["requests"][mid:] if r["has_image"]]
    assert second and not ({r["digest"] for r in second} & answered_before)  # nothing answered is asked again

    summary = json.loads((run / "summary.json").read_text())
    s2 = summary["system2"]
    assert s2["backend"] == "openai" and s2["mode"] == "logprob_token_ids" and s2["url"] == url
    assert s2["cache_hits"] == 2 and s2["requests_sent"] == len(second)
    recs = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    slow = [r for r in recs if r["path_taken"] == "slow"]
    assert len(recs) == 12 and len(slow) == round(0.3 * 12) == 2 + len(second)
    assert all(r["slow_backend"] == "openai:logprob_token_ids" and r["slow_tokens_in"] > 0 for r in slow)
    assert all(abs(sum(c["slow"] for c in r["candidates"]) - 1) < 1e-6 for r in slow)


def test_evaluate_with_server_down_fails_before_any_work(tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "kb").mkdir()
    _noisy_images(tmp_path / "data", 1, seed=3)
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "kb"), str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                 "--vlm", f"http://127.0.0.1:{port}/v1", "--vlm-timeout", "2"])
    assert r.exit_code != 0 and f"http://127.0.0.1:{port}/v1" in r.output
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_serve_plan_prints_engine_flags_from_the_architecture():
    """`fgvr memory plan --serve`: the longest request (3 capped images for a description), the pixel cap
    the client resizes to, and a memory fraction that leaves fgvr's encoder its share of the GPU."""
    from click.testing import CliRunner

    from fgvr.cli import cli
    from fgvr.models.plan import CUDA_CONTEXT_BYTES, model_size
    from fgvr.models.serve_plan import make_serve_plan

    gib = 2**30
    v = make_serve_plan("vllm", "qwen2.5-vl-7b", 24 * gib, max_pixels=1280 * 28 * 28)
    s = make_serve_plan("sglang", "qwen2.5-vl-7b", 24 * gib, max_pixels=1280 * 28 * 28)
    assert v.max_model_len == 4608 and v.max_model_len >= 3 * 1280 + 400 + 160  # 3 images at the cap + text
    assert v.weight_bytes == model_size("qwen2.5-vl-7b", "vlm", "bf16").weight_bytes
    assert v.kv_bytes_per_token == 57_344  # Qwen2.5-VL-7B in bf16 (DESIGN.md §2)
    encoder = model_size("clip-vit-b32", "encoder", "fp16").weight_bytes
    assert v.fraction <= 1 - (encoder + CUDA_CONTEXT_BYTES) / (24 * gib)  # fgvr's own process keeps its share
    used = v.fraction * 24 * gib
    assert v.weight_bytes + v.activation_bytes + v.kv_tokens * v.kv_bytes_per_token + CUDA_CONTEXT_BYTES <= used
    assert v.fits and v.max_seqs == v.kv_tokens // v.max_model_len >= 1
    assert s.fraction < v.fraction and s.kv_tokens == v.kv_tokens  # SGLang's fraction excludes activations
    cmd = v.command()
    for flag in ("--max-model-len 4608", "'{\"image\": 3}'", '"max_pixels": 1003520', "--gpu-memory-utilization 0.9",
                 "--max-logprobs 20", "Qwen/Qwen2.5-VL-7B-Instruct"):
        assert flag in cmd, flag
    assert s.command().startswith("SGLANG_IMAGE_MAX_PIXELS=1003520 ") and "--mem-fraction-static" in s.command()
    small = make_serve_plan("vllm", "qwen2.5-vl-7b", 16 * gib)
    assert not small.fits  # 16.6 GB of bf16 weights do not fit a 16 GiB card with anything else
    half = make_serve_plan("vllm", "qwen2.5-vl-7b", 24 * gib, max_pixels=640 * 28 * 28)
    assert half.max_model_len < v.max_model_len and half.max_seqs > v.max_seqs
    r = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "qwen2.5-vl-7b", "--serve", "both", "--gpu", "24GiB"])
    assert r.exit_code == 0 and "vllm serve" in r.output and "sglang.launch_server" in r.output
    r = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "http://127.0.0.1:8000/v1"])
    assert r.exit_code == 0 and "memory is the server's" in r.output and "qwen2.5-vl" not in r.stdout


def test_build_kb_descriptions_come_from_the_served_vlm(url, tmp_path, tiny_clip_dir):
    """`fgvr build-kb --vlm URL`: one description request per class, each with up to 3 support images, through
    the same generation call as everything else; the manifest names the backend."""
    from click.testing import CliRunner

    from fgvr.cli import cli

    _noisy_images(tmp_path / "d", 4, seed=2)
    before = len(stats(url)["requests"])
    r = CliRunner().invoke(cli, ["build-kb", str(tmp_path / "d"), "--shots", "4", "--encoder", str(tiny_clip_dir),
                                 "--vlm", url, "--max-visual-tokens", "16", "--out", str(tmp_path / "kb")])
    assert r.exit_code == 0, r.output
    asked = [x for x in stats(url)["requests"][before:] if x["has_image"]]
    assert len(asked) == 3 and all(x["status"] == 200 for x in asked)
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    assert manifest["vlm"]["backend"] == "openai" and manifest["vlm"]["key"].startswith(f"openai|{url}|")
    assert set(json.loads((tmp_path / "kb" / "descriptions.json").read_text())) == {"class0", "class1", "class2"}


def test_a_failed_row_takes_escalated_failed_and_the_rest_go_on(tmp_path):
    """A backend row that keeps failing (its error, not an exception) gives that image the escalated-failed
    path with its fast answer and the error; the other images of the same System 2 call are answered."""
    from fakes import ColourEncoder, colour_kb

    from fgvr.backends import OptionScores
    from fgvr.pipeline import PATH_SLOW, PATH_SLOW_FAILED, DualSystem
    from fgvr.slow_path import VlmReasoner
    from fgvr.trigger import Trigger

    class Flaky:
        name = "flaky"

        def score_options(self, questions, images, n_options):
            return [OptionScores(error="http://x/v1: HTTP 503 (after 4 retries)") if i == 1 else
                    OptionScores([1.0 / k] * k, 10, 1) for i, k in enumerate(n_options)]

        def generate(self, conversations, images, max_new_tokens):
            raise AssertionError("no text asked for")

        def describe(self):
            return {"backend": "flaky", "mode": "test"}

    for i, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{i}.png")
    enc = ColourEncoder()
    kb = colour_kb(enc)
    res = DualSystem(kb, enc, VlmReasoner(Flaky(), kb.classes), Trigger(threshold=-1.0), k=3).classify_paths(
        [tmp_path / f"{i}.png" for i in range(3)])
    assert [r.path_taken for r in res] == [PATH_SLOW, PATH_SLOW_FAILED, PATH_SLOW]
    assert "503" in res[1].error and res[1].prediction == res[1].fast_prediction and not res[1].slow_ran
    assert res[0].slow_backend == "flaky:test" and res[1].slow_backend is None
