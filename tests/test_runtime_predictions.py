"""The same predictions from `--runtime torch` and `--runtime onnx` through every command that encodes:
`fgvr demo` (base built and evaluated with each runtime), `fgvr evaluate`, `fgvr serve` and `fgvr bench`,
on the same small inputs. Features (the bases' prototypes and exemplars) and the served similarity scores
agree within 1e-4, posteriors within 1e-3; answers, paths and the slow path's picks are equal. Each run's recorded encoder key says which runtime made it, so a test that
silently ran torch twice fails. (`fgvr classify` is in tests/test_onnx_runtime.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dataset_replicas as R
from fgvr.cli import cli

TOL = 1e-4  # features and cosine similarities
PROB_TOL = 1e-3  # posteriors: a softmax over similarities at the base's temperature magnifies 1e-5 a little
RUNTIMES = ("torch", "onnx")


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: _tail(r["path"]))


def _tail(path: str) -> tuple[str, ...]:
    """Class folder and file name: the demo writes each runtime's images under its own output folder."""
    return Path(path).parts[-2:]


def _assert_same_predictions(a: list[dict], b: list[dict]) -> None:
    """Record by record: the same answers and paths; candidate posteriors (System 1's, System 2's, the
    decision's), confidence and trigger score within PROB_TOL."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert _tail(x["path"]) == _tail(y["path"])
        for key in ("prediction", "fast_prediction", "slow_prediction", "path_taken", "error"):
            assert x.get(key) == y.get(key), (key, x["path"], x.get(key), y.get(key))
        cx, cy = x.get("candidates") or [], y.get("candidates") or []
        assert [c["id"] for c in cx] == [c["id"] for c in cy], x["path"]
        for p, q in zip(cx, cy):
            for key in ("fast", "slow", "final"):
                if p.get(key) is None:
                    assert q.get(key) is None, (x["path"], key, p, q)
                else:
                    assert abs(p[key] - q[key]) < PROB_TOL, (x["path"], key, p, q)
        if x.get("confidence") is not None:
            assert abs(x["confidence"] - y["confidence"]) < PROB_TOL
        if (x.get("trigger") or {}).get("score") is not None:
            assert abs(x["trigger"]["score"] - y["trigger"]["score"]) < PROB_TOL


def _runtime_of(run: Path) -> str:
    key = json.loads((run / "summary.json").read_text())["config"]["encoder"]
    return "onnx" if "rt=onnx" in key else "torch"


def test_evaluate_predicts_the_same_with_either_runtime(shapes_kb, tmp_path, monkeypatch):
    runs = {}
    for rt in RUNTIMES:
        monkeypatch.setenv("FGVR_RUNTIME", rt)  # restored after the test, whatever the CLI sets
        out = tmp_path / rt
        r = CliRunner().invoke(cli, ["--runtime", rt, "evaluate", str(shapes_kb), str(shapes_kb.parent / "test"),
                                     "--slow-budget", "0.5", "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert _runtime_of(out) == rt
        runs[rt] = _rows(out)
    _assert_same_predictions(runs["torch"], runs["onnx"])


def test_demo_builds_and_predicts_the_same_with_either_runtime(tmp_path, monkeypatch):
    from fgvr import demo
    from fgvr.knowledge_base import load_knowledge_base

    data = R.make_fashion_mnist(tmp_path / "data")
    results, kbs = {}, {}
    for rt in RUNTIMES:
        monkeypatch.setenv("FGVR_RUNTIME", rt)
        out = tmp_path / rt
        res = demo.run_demo(out, shots=2, test_images=10, seed=0, slow_budget=0.5, data_root=data, progress=False)
        run = out / res.run.split("/")[-1]
        assert _runtime_of(run) == rt
        results[rt] = (res, _rows(run))
        (kb_dir,) = [p.parent for p in out.rglob("manifest.json") if "kb" in p.parent.name]
        kbs[rt] = load_knowledge_base(kb_dir)
    # the bases themselves: prototypes and exemplars from either runtime within TOL
    a, b = kbs["torch"], kbs["onnx"]
    assert a.classes == b.classes
    assert (a.prototypes - b.prototypes).abs().max().item() < TOL
    assert (a.exemplars - b.exemplars).abs().max().item() < TOL
    _assert_same_predictions(results["torch"][1], results["onnx"][1])
    ra, rb = results["torch"][0], results["onnx"][0]
    assert ra.accuracy_dual == rb.accuracy_dual and ra.accuracy_system1 == rb.accuracy_system1
    assert ra.slow_rate == rb.slow_rate


def test_bench_predicts_the_same_with_either_runtime(tmp_path, monkeypatch):
    root = R.make_fashion_mnist(tmp_path / "data")
    tables, runs = {}, {}
    for rt in RUNTIMES:
        monkeypatch.setenv("FGVR_RUNTIME", rt)
        out = tmp_path / rt
        r = CliRunner().invoke(cli, ["--runtime", rt, "bench", "fashion-mnist", "--root", str(root), "--shots", "1",
                                     "--seeds", "0", "--reranker", "--no-reports", "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert _runtime_of(out / "k1-seed0" / "run") == rt
        tables[rt] = json.loads((out / "table.json").read_text())["cells"]
        runs[rt] = _rows(out / "k1-seed0" / "run")
    _assert_same_predictions(runs["torch"], runs["onnx"])
    (ca,), (cb,) = tables["torch"], tables["onnx"]
    assert (ca["system1"], ca["dual"], ca["n_test"]) == (cb["system1"], cb["dual"], cb["n_test"])


def test_serve_answers_the_same_with_either_runtime(shapes_kb, monkeypatch):
    pytest.importorskip("fastapi", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")
    from fastapi.testclient import TestClient

    from fgvr.pipeline import open_system
    from fgvr.serve import create_app

    images = sorted((shapes_kb.parent / "test").rglob("*.png"))
    answers = {}
    for rt in RUNTIMES:
        monkeypatch.setenv("FGVR_RUNTIME", rt)
        seen: list[str] = []

        def opener():
            cm = open_system(shapes_kb, threshold=0.5, reranker=True)
            system = cm.__enter__()
            seen.append(system.encoder.spec.runtime)
            return _Opened(cm, system)

        with TestClient(create_app(opener), base_url="http://127.0.0.1") as c:
            _wait_ready(c)
            got = []
            for img in images:
                r = c.post("/v1/classify", files={"image": (img.name, img.read_bytes(), "image/png")})
                assert r.status_code == 200, r.text
                got.append(r.json())
        assert seen == [rt]
        answers[rt] = got
    for x, y in zip(answers["torch"], answers["onnx"], strict=True):
        assert (x["prediction"], x["path_taken"], x["fast_prediction"]) == \
               (y["prediction"], y["path_taken"], y["fast_prediction"])
        assert [c["id"] for c in x["candidates"]] == [c["id"] for c in y["candidates"]]
        assert max(abs(p["score"] - q["score"]) for p, q in zip(x["candidates"], y["candidates"])) < TOL


class _Opened:
    """A context manager around an already-entered `open_system` (so the test can see the encoder's spec)."""

    def __init__(self, cm, system) -> None:
        self.cm, self.system = cm, system

    def __enter__(self):
        return self.system

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def _wait_ready(client, seconds: float = 120) -> None:
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        r = client.get("/healthz")
        if r.status_code == 200:
            return
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.05)
    raise AssertionError("the server did not become ready")


def test_encoder_features_within_tolerance_on_the_base_images(shapes_kb):
    """The base images themselves, batch of 6 (the serve/evaluate batch path), not only the sample photos."""
    from PIL import Image

    from fgvr.models import parse_spec, registry

    ims = [Image.open(p).convert("RGB") for p in sorted((shapes_kb.parent / "test").rglob("*.png"))]
    with registry.use(parse_spec("efficientnet-lite0", runtime="onnx")) as o, \
            registry.use(parse_spec("efficientnet-lite0", runtime="torch")) as t:
        a, b = o.encode_images(ims), t.encode_images(ims)
    assert a.shape == b.shape == (len(ims), 1280)
    assert (a - b).abs().max().item() < TOL and not torch.equal(a, torch.zeros_like(a))
