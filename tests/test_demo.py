"""`fgvr demo` end to end on a tiny Fashion-MNIST look-alike the test writes (real Lite0 and Lite2, few images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fgvr import demo
from fgvr import fashion_mnist as fm
from fgvr.cli import cli


def _glyph(cls: int, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 image whose class decides where a bright bar sits (plus noise): learnable from a few shots."""
    im = rng.integers(0, 40, (28, 28)).astype(np.uint8)
    row = 2 + 2 * cls
    im[row : row + 3, 4:24] = 230
    return im


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("tiny-fashion")
    for split, per_class in (("train", 3), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        fm.write_idx(d / f"{split}-images-idx3-ubyte.gz", np.stack([_glyph(int(c), rng) for c in labels]))
        fm.write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d


def test_demo_end_to_end(tiny_fashion, tmp_path):
    out = tmp_path / "demo"
    r = demo.run_demo(out, shots=2, test_images=10, seed=0, slow_budget=0.5, data_root=tiny_fashion,
                      progress=False)
    # the image folder: 2 per class from train, 10 (one per class) from test, never the same files
    support = sorted(p.name for p in (out / "images" / "support-k2-seed0").rglob("*.png"))
    test = sorted(p.name for p in (out / "images" / "test-n10-seed0").rglob("*.png"))
    assert len(support) == 20 and len(test) == 10
    assert all(n.startswith("train-") for n in support) and all(n.startswith("test-") for n in test)
    # the evaluation ran the dual system on every test image, with the re-ranker behind the trigger
    rows = [json.loads(line) for line in (out / r.run.split("/")[-1] / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    slow = [x for x in rows if x["path_taken"] == "slow"]
    assert slow and all(x["slow_ran"] and x["candidates"][0]["slow"] is not None for x in slow)
    assert 0 < r.slow_rate < 1
    # the printed accuracies are the records' own: the decision's answer where the image went slow, System
    # 1's elsewhere, against the label
    known = [x for x in rows if x["label_id"] is not None]
    assert len(known) == 10
    assert r.accuracy_dual == pytest.approx(sum(x["correct"] for x in known) / 10)
    assert r.accuracy_dual == pytest.approx(sum((x["slow_prediction"] if x["path_taken"] == "slow" else
                                                 x["fast_prediction"]) == x["label_id"] for x in known) / 10)
    assert r.accuracy_system1 == pytest.approx(sum(x["fast_prediction"] == x["label_id"] for x in known) / 10)
    assert r.accuracy_system1 >= 0.5  # the bar position is easy: a broken pipeline would sit near 0.1
    summary = json.loads((out / r.run.split("/")[-1] / "summary.json").read_text())
    assert summary["config"]["system2"] == "visual-reranker"
    assert (out / "demo.json").is_file()
    assert r.report.endswith("report.md") and (out / r.run.split("/")[-1] / "report.md").is_file()
    text = demo.format_result(r)
    assert "System 1 alone" in text and "dual system" in text and "report:" in text
    # a rerun reuses everything: same numbers, no new images evaluated
    again = demo.run_demo(out, shots=2, test_images=10, seed=0, slow_budget=0.5, data_root=tiny_fashion,
                          progress=False)
    assert again.accuracy_dual == r.accuracy_dual and again.images_per_second is None


def test_demo_without_the_dataset_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FGVR_FASHION_MNIST", str(tmp_path / "missing"))
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "o"), "--quick"])
    assert res.exit_code != 0
    assert "sudo apt-get install dataset-fashion-mnist" in res.output
