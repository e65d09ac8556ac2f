"""`fgvr bench` end to end on the generated replicas (real EfficientNet-Lite0; tiny CLIP + tiny Qwen2.5-VL for
the VLM path): the cells, the table, resuming, binding to the inputs; and the statistics it prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dataset_replicas as R
from fgvr.bench import (BenchError, BenchTable, CellResult, bootstrap_interval, cell_result, format_table,
                        run_bench, summarise_cells, t_interval)
from fgvr.cli import cli

ALL = [*(n for n in R.REPLICAS if not n.startswith("imagenet-1k/")), "fashion-mnist"]


def _root(name: str, tmp: Path) -> Path:
    return R.make_fashion_mnist(tmp) if name == "fashion-mnist" else R.REPLICAS[name][0](tmp)


@pytest.mark.parametrize("name", ALL)
def test_bench_runs_end_to_end_on_each_replica(name, tmp_path):
    root, out = _root(name, tmp_path / "data"), tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", name.split("/")[0], "--root", str(root), "--shots", "1", "--seeds", "0",
                                   "--no-reports", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads((out / "table.json").read_text())
    (cell,) = table["cells"]
    n_classes = 10 if name == "fashion-mnist" else 3
    assert cell["n_test"] == n_classes * R.TEST_PER_CLASS and cell["errors"] == 0
    # one colour (or bar position) per class: chance is 1/3 (1/10). 20 Fashion-MNIST test images whose bars
    # overlap their neighbours' make 0.5 a coin flip (9 or 10 right); 3x chance says it learned the classes.
    assert cell["system1"] >= (0.3 if name == "fashion-mnist" else 0.5)
    assert cell["system1"] == cell["dual"]  # no System 2: escalated images keep System 1's answer
    assert "| System 1 alone (efficientnet-lite0 prototypes) |" in res.output
    assert f"{100 * cell['system1']:.1f}" in res.output and "1-shot" in res.output
    # the manifests are the official splits, and the knowledge base drew its shot from train only
    train = (out / "data" / "train.csv").read_text().splitlines()[1:]
    test = (out / "data" / "test.csv").read_text().splitlines()[1:]
    assert len(train) == n_classes * R.TRAIN_PER_CLASS and len(test) == n_classes * R.TEST_PER_CLASS
    manifest = json.loads((out / "k1-seed0" / "kb" / "manifest.json").read_text())
    support = {s["path"] for s in manifest["support"]}
    assert len(support) == n_classes
    train_paths = {line.rsplit(",", 1)[0].strip('"') for line in train}
    assert {str(Path(manifest["data"]["root"]) / p) if not Path(p).is_absolute() else p for p in support} <= train_paths


def test_bench_resumes_binds_and_grows(tmp_path):
    root, out = R.make_cub(tmp_path / "data"), tmp_path / "bench"
    kw = dict(root=root, shots=[1, 2], seeds=[0, 1], reports=False, progress=False)
    first = run_bench("cub", out, **kw)
    assert [(c.k, c.seed) for c in first.cells] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert {c.n_test for c in first.cells} == {6}
    # the table: per k, the mean of the two seeds and its t-interval
    for k in (1, 2):
        vals = [c.system1 for c in first.cells if c.k == k]
        assert math.isclose(first.summary[str(k)]["system1"]["mean"], sum(vals) / 2)
        assert first.summary[str(k)]["system1"]["n"] == 2
    assert first.command.startswith("fgvr bench cub-200-2011 --root ") and "--shots 1,2 --seeds 0,1" in first.command
    assert (out / "table.md").read_text().strip() == first.markdown.strip()
    # the query embeddings were computed once: later cells started from the first cell's cache
    chunks = [sorted(p.name for p in (out / c / "run" / "embeddings").glob("*.safetensors"))
              for c in ("k1-seed0", "k1-seed1", "k2-seed0", "k2-seed1")]
    assert chunks[0] and all(c == chunks[0] for c in chunks)
    first_inode = (out / "k1-seed0" / "run" / "embeddings" / chunks[0][0]).stat().st_ino
    assert (out / "k2-seed1" / "run" / "embeddings" / chunks[0][0]).stat().st_ino == first_inode

    # a rerun reuses every cell and prints the same table
    again = run_bench("cub", out, **kw)
    assert again.markdown == first.markdown
    inv = json.loads((out / "bench.json").read_text())["invocations"]
    assert len(inv) == 2 and inv[1]["cells_run"] == [] and len(inv[1]["cells_reused"]) == 4

    # a cell interrupted after its knowledge base: the base is kept, the evaluation redone
    (out / "k2-seed1" / "cell.json").unlink()
    (out / "k2-seed1" / "run" / "results.jsonl").write_text("")
    kb_mtime = (out / "k2-seed1" / "kb" / "manifest.json").stat().st_mtime_ns
    grown = run_bench("cub", out, **{**kw, "shots": [2, 3], "seeds": [1]})  # and a new k
    inv = json.loads((out / "bench.json").read_text())["invocations"][-1]
    assert inv["cells_run"] == ["k2-seed1", "k3-seed1"] and inv["cells_reused"] == []
    assert (out / "k2-seed1" / "kb" / "manifest.json").stat().st_mtime_ns == kb_mtime
    assert [c.system1 for c in grown.cells if c.k == 2] == [c.system1 for c in first.cells if (c.k, c.seed) == (2, 1)]
    assert "| method | 2-shot | 3-shot |" in grown.markdown

    # other settings in the same folder are refused before anything is written
    with pytest.raises(BenchError, match="slow_budget: 0.3 then, 0.5 now"):
        run_bench("cub", out, **{**kw, "slow_budget": 0.5})
    with pytest.raises(BenchError, match="limit: None then, 3 now"):
        run_bench("cub", out, **{**kw, "limit": 3})
    assert len((out / "data" / "test.csv").read_text().splitlines()) == 7  # untouched by the refused runs
    # the data are part of the binding: a changed label file is another experiment
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join(rows[:-1] + [rows[-1].rsplit(" ", 1)[0] + " 1"]) + "\n")
    with pytest.raises(BenchError, match="test_sha256"):
        run_bench("cub", out, **kw)


def test_bench_limit_takes_the_same_spread_for_every_cell(tmp_path):
    root, out = R.make_pets(tmp_path / "data"), tmp_path / "bench"
    t = run_bench("pets", out, root=root, shots=[1], seeds=[0, 1], limit=4, progress=False)
    assert [c.n_test for c in t.cells] == [4, 4]
    test = (out / "data" / "test.csv").read_text().splitlines()[1:]
    assert len(test) == 4 and len({line.rsplit(",", 1)[1] for line in test}) >= 2  # spread over classes
    assert "4 of the 6 test images (`--limit 4`" in t.markdown and "--limit 4" in t.command
    assert (out / "k1-seed1" / "run" / "report.md").is_file()  # each cell's report, as `fgvr evaluate` writes


def test_bench_with_a_vlm_system2_and_a_clip_encoder(tmp_path, tiny_clip_dir, talkative_qwen_dir):
    """The GPU configuration on tiny random checkpoints: CLIP prototypes + text, Qwen2.5-VL descriptions in the
    base and option scoring as System 2."""
    root, out = R.make_flowers(tmp_path / "data"), tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "flowers", "--root", str(root), "--shots", "1", "--seeds", "0",
                                   "--encoder", str(tiny_clip_dir), "--vlm", str(talkative_qwen_dir),
                                   "--max-visual-tokens", "16", "--slow-budget", "0.5", "--no-reports",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    cell = json.loads((out / "k1-seed0" / "cell.json").read_text())
    assert cell["binding"]["system2"] == "vlm" and cell["binding"]["kb_descriptions"] is True
    assert 0 < cell["result"]["system2_calls_per_image"] <= 1 and cell["result"]["slow_rate"] == pytest.approx(0.5)
    kb = json.loads((out / "k1-seed0" / "kb" / "manifest.json").read_text())
    assert kb["vlm"] is not None and kb["encoder"]["has_text"]
    summary = json.loads((out / "k1-seed0" / "run" / "summary.json").read_text())
    assert summary["slowed_images"]["n"] == 3 and summary["system2_calls"] >= 3
    assert f"dual system (System 2 = {talkative_qwen_dir.name}, budget 50%)" in res.output
    assert "dual − System 1 (paired, points)" in res.output
    build_cmd, eval_cmd = cell["result"]["commands"]
    assert f"--vlm {talkative_qwen_dir}" in build_cmd and f"--encoder {tiny_clip_dir}" in build_cmd
    assert f"--vlm {talkative_qwen_dir} --max-visual-tokens 16 --slow-budget 0.5" in eval_cmd


# ----------------------------------------------------------------------------------------------------------
# statistics and the printed table


def test_t_interval_matches_the_textbook_formula():
    mean, half = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) = 4.3027
    assert t_interval([0.4]) == (0.4, None)


def test_bootstrap_interval_is_seeded_paired_and_covers_the_mean():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.7
    lo, hi = bootstrap_interval(a)
    assert lo < a.mean() < hi and 0.04 < hi - lo < 0.12  # ~ 2 x 1.96 x sqrt(.21/400) = 0.09
    assert bootstrap_interval(a) == (lo, hi)
    assert bootstrap_interval(np.ones(50, bool)) == (1.0, 1.0)
    assert bootstrap_interval(a, a) == (0.0, 0.0)  # paired: the same images, no difference
    b = a.copy()
    b[np.flatnonzero(~a)[:20]] = True  # 20 more right answers, nothing else changes
    dlo, dhi = bootstrap_interval(b, a)
    assert 0 < dlo < 20 / 400 < dhi


def test_cell_result_counts_an_unreadable_image_as_wrong_for_both():
    rec = [{"path": "a", "label_id": 0, "fast_prediction": 0, "correct": True, "path_taken": "fast",
            "trigger": {"go_slow": False}},
           {"path": "b", "label_id": 1, "fast_prediction": 0, "correct": True, "path_taken": "slow",
            "slow_ran": True, "trigger": {"go_slow": True}},
           {"path": "c", "label_id": 1, "fast_prediction": None, "correct": False, "path_taken": "error"},
           {"path": "d", "label_id": None, "fast_prediction": 1, "correct": None, "path_taken": "fast"}]
    c = cell_result(rec, k=1, seed=0)
    assert c.n_test == 3 and c.errors == 1
    assert c.system1 == pytest.approx(1 / 3) and c.dual == pytest.approx(2 / 3) and c.delta == pytest.approx(1 / 3)
    assert c.slow_rate == pytest.approx(1 / 3) and c.system2_calls_per_image == pytest.approx(1 / 3)


def test_format_table_in_the_papers_form():
    def cell(k, seed, s1, dual):
        return CellResult(k=k, seed=seed, n_test=100, system1=s1, dual=dual, system1_ci=(s1 - .05, s1 + .05),
                          dual_ci=(dual - .05, dual + .05), delta=dual - s1, delta_ci=(0.0, 0.02), slow_rate=0.3,
                          system2_calls_per_image=0.3, errors=0, commands=["fgvr build-kb x", "fgvr evaluate y"])

    cells = [cell(1, 0, .50, .52), cell(1, 1, .60, .61), cell(5, 0, .70, .73), cell(5, 1, .72, .74)]
    settings = {"system2": "reranker", "encoder_name": "efficientnet-lite0", "slow_budget": 0.3, "limit": None,
                "classes": 10, "train_images": 1000, "test_images_official": 100, "vlm_name": None}
    t = BenchTable(dataset="x", title="Toy", settings=settings, shots=[1, 5], seeds=[0, 1], cells=cells,
                   summary=summarise_cells(cells, [1, 5]), command="fgvr bench x --out o")
    md = format_table(t)
    half = 12.706205 * np.std([50, 60], ddof=1) / math.sqrt(2)  # t(0.975, 1)
    assert f"| System 1 alone (efficientnet-lite0 prototypes) | 55.0 ± {half:.1f} | 71.0 ± " in md
    assert "| dual system (System 2 = visual re-ranker, budget 30%) | 56.5 ± " in md
    assert "| dual − System 1 (paired, points) | +1.5 ± " in md
    assert "| 1 | 0 | 50.0 [45.0, 55.0] | 52.0 [47.0, 57.0] | +2.0 [+0.0, +2.0] | 30.0% | 100 | 0 |" in md
    assert "fgvr bench x --out o" in md and "fgvr build-kb x" in md and "fgvr evaluate y" in md
    # without a System 2 there is no dual row and no dual column
    t.settings = {**settings, "system2": "none"}
    md = format_table(t)
    assert "dual" not in md.split("Produced by")[0].replace("No System 2 was given", "")
    assert "| 1 | 0 | 50.0 [45.0, 55.0] | 30.0% | 100 | 0 |" in md


def test_bench_with_a_served_vlm_that_does_not_answer_fails_before_any_work(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root, out = R.make_pets(tmp_path / "data"), tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "pets", "--root", str(root), "--shots", "1", "--seeds", "0",
                                   "--vlm", f"http://127.0.0.1:{port}/v1", "--vlm-retries", "0", "--vlm-timeout", "2",
                                   "--out", str(out)])
    assert res.exit_code == 5 and f"127.0.0.1:{port}" in res.output and "Traceback" not in res.output  # ModelError
    assert not list(out.glob("k*-seed*"))  # no knowledge base was built for nothing


@pytest.mark.parametrize("option", [["--weight", "nan"], ["--slow-budget", "nan"], ["--device", "cuda:7"]])
def test_bench_refuses_silly_options_before_any_work(tmp_path, option):
    """nan passes every comparison of a plain float range, and a GPU that is not there fails late: both are
    refused at parse time (exit 2), before a cell is built."""
    res = CliRunner().invoke(cli, ["bench", "flowers", "--root", str(tmp_path), "--shots", "1", "--seeds", "0",
                                   "--out", str(tmp_path / "bench"), *option])
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "bench").exists()


def test_bench_suite_one_row_per_dataset_with_its_split_and_the_mean(tmp_path):
    """--datasets over one root: a row per dataset (split named), the mean row; a coop split from its file."""
    root = tmp_path / "data"
    R.make_cub(root)
    R.make_eurosat(root)
    out = tmp_path / "suite"
    res = CliRunner().invoke(cli, ["bench", "--datasets", "cub-200-2011,eurosat:coop", "--root", str(root),
                                   "--shots", "1", "--seeds", "0,1", "--no-reports", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads((out / "table.json").read_text())
    assert [d["split"] for d in table["datasets"]] == ["official", "coop: split_zhou_EuroSAT.json"]
    per = [d["summary"]["1"]["system1"]["mean"] for d in table["datasets"]]
    assert table["mean"]["1"]["system1"]["mean"] == pytest.approx(sum(per) / 2)
    assert "| CUB-200-2011 | official | 6 |" in res.output and "| EuroSAT | coop: split_zhou_EuroSAT.json | 6 |" in res.output
    assert "| **mean of 2** |" in res.output and "--datasets cub-200-2011,eurosat:coop" in res.output
    bench = json.loads((out / "eurosat" / "bench.json").read_text())
    assert bench["settings"]["split"] == "coop: split_zhou_EuroSAT.json"


def test_kb_descriptions_follow_the_text_tower_declaration():
    """Every family with a text tower gets VLM class descriptions in bench (siglip2 was left out when the
    list was hand-written); an image-only family and a bench without a VLM get none."""
    from fgvr.bench import kb_descriptions
    from fgvr.models import families

    towers = {f.name for f in families.all_families() if f.text_tower}
    assert {"clip", "siglip", "siglip2"} <= towers
    for fam in families.all_families():
        assert kb_descriptions(fam.name, True) is fam.text_tower
        assert kb_descriptions(fam.name, False) is False
    assert "efficientnet" not in towers
