"""ONNX Runtime path of the CPU encoders: the same features and predictions as torch, a spec that records
which runtime made a base's features, an export cache that survives damage and two exporters at once, and
one thread count for every runtime in the process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fgvr.cli import cli
from fgvr.knowledge_base import load_knowledge_base
from fgvr.models import ModelSpec, SpecError, parse_spec, registry
from fgvr.models import onnx_runtime
from fgvr.reranker import tta_descriptors
from fgvr.threads import cgroup_quota, configure, intra_op_threads


@pytest.fixture(scope="module")
def lite0_pair():
    """Lite0 under ONNX Runtime and under torch (the graph cached beside the weights, as in use)."""
    with registry.use(parse_spec("efficientnet-lite0", runtime="onnx")) as ort_enc, \
            registry.use(parse_spec("efficientnet-lite0", runtime="torch")) as torch_enc:
        yield ort_enc, torch_enc


def test_features_equal_across_runtimes(lite0_pair, sample_photos):
    ort_enc, torch_enc = lite0_pair
    assert ort_enc.graph is not None and torch_enc.graph is None
    a, b = ort_enc.encode_images(sample_photos), torch_enc.encode_images(sample_photos)
    assert a.shape == b.shape == (2, 1280)
    assert (a - b).abs().max().item() < 1e-4
    assert torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)


def test_reranker_descriptors_equal_across_runtimes(lite0_pair, sample_photos):
    ort_enc, torch_enc = lite0_pair
    pixels = torch_enc.preprocess(sample_photos)
    views = ("identity", "flip")
    a, b = tta_descriptors(ort_enc, pixels, views, 2), tta_descriptors(torch_enc, pixels, views, 2)
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-4


def test_runtime_is_chosen_by_device_and_recorded_in_the_key(monkeypatch):
    monkeypatch.delenv("FGVR_RUNTIME", raising=False)
    cpu = parse_spec("efficientnet-lite0")
    assert cpu.runtime == "onnx" and cpu.key.endswith("|rt=onnx")
    assert parse_spec("efficientnet-lite0", device="cuda").runtime == "torch"
    assert parse_spec("efficientnet-lite0", dtype="bf16").runtime == "torch"
    assert cpu.replace(device="cuda").runtime == "torch"  # a base built on CPU reopened on CUDA
    torch_spec = parse_spec("efficientnet-lite0", runtime="torch")
    assert torch_spec.key != cpu.key and "rt=" not in torch_spec.key
    monkeypatch.setenv("FGVR_RUNTIME", "torch")
    assert parse_spec("efficientnet-lite0").runtime == "torch"
    with pytest.raises(SpecError, match="use --runtime torch or auto"):
        parse_spec("efficientnet-lite0", device="cuda", runtime="onnx")
    with pytest.raises(SpecError, match="unknown runtime"):
        parse_spec("efficientnet-lite0", runtime="tensorrt")


def test_a_spec_without_runtime_is_a_torch_one():
    """Bases written before the field existed recorded torch features."""
    old = parse_spec("efficientnet-lite0", runtime="torch").to_json()
    del old["runtime"]
    assert ModelSpec(**old).runtime == "torch"


def _classify(kb: Path, images: Path, runtime: str, monkeypatch) -> list[dict]:
    monkeypatch.setenv("FGVR_RUNTIME", runtime)  # restored after the test, whatever the CLI sets
    files = [str(p) for p in sorted(images.rglob("*.png"))]
    r = CliRunner().invoke(cli, ["--runtime", runtime, "classify", str(kb), *files, "--threshold", "1.0"])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_a_base_built_with_one_runtime_predicts_the_same_with_the_other(shapes_kb, monkeypatch):
    kb = load_knowledge_base(shapes_kb, encoder=parse_spec("efficientnet-lite0", runtime="torch"))
    assert kb.encoder_spec["runtime"] == "onnx"  # built on CPU by default: the base says so
    test_dir = shapes_kb.parent / "test"
    onnx_rows = _classify(shapes_kb, test_dir, "onnx", monkeypatch)
    torch_rows = _classify(shapes_kb, test_dir, "torch", monkeypatch)
    assert len(onnx_rows) == len(torch_rows) == 6
    key = next(k for k in ("prediction", "label", "class") if k in onnx_rows[0])
    assert [r[key] for r in onnx_rows] == [r[key] for r in torch_rows]


# --- the export cache -------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu()


def _make(log: Path, delay: float = 0.0):
    def make():
        with log.open("a") as f:
            f.write("export\n")
        time.sleep(delay)
        return _Tiny().eval(), torch.zeros(1, 3, 8, 8)
    return make


def test_damaged_graph_is_exported_again(tmp_path):
    path, log = tmp_path / "tiny.onnx", tmp_path / "exports.log"
    onnx_runtime.cached_graph(path, _make(log))
    onnx_runtime.cached_graph(path, _make(log))  # intact: used as it is
    assert log.read_text().count("export") == 1
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert not onnx_runtime.is_intact(path)
    onnx_runtime.cached_graph(path, _make(log))
    assert log.read_text().count("export") == 2 and onnx_runtime.is_intact(path)
    x = torch.rand(3, 3, 8, 8)
    out = onnx_runtime.open_graph(path, threads=1).run(x)
    assert torch.allclose(out, _Tiny().eval()(x).detach(), atol=1e-5)  # batch 3 through a batch-1 export


def test_the_weights_count_is_remembered_per_digest_and_the_onnx_import_is_not_paid(tmp_path, monkeypatch):
    """open_graph counts the session's weights for the registry. Counting parses the graph with the onnx
    package (half a second to import), so the count is kept beside the graph under its digest: the second
    open does not parse, a re-exported graph (another digest) is counted afresh, a forged memo is ignored."""
    path, log = tmp_path / "tiny.onnx", tmp_path / "exports.log"
    onnx_runtime.cached_graph(path, _make(log))
    first = onnx_runtime.open_graph(path, threads=1).weight_bytes
    assert first == onnx_runtime.initializer_bytes(path) > 0
    memo = path.with_name(path.name + ".weights.json")
    assert json.loads(memo.read_text())["initializer_bytes"] == first

    calls = []
    real = onnx_runtime.initializer_bytes
    monkeypatch.setattr(onnx_runtime, "initializer_bytes", lambda p: calls.append(p) or real(p))
    assert onnx_runtime.open_graph(path, threads=1).weight_bytes == first and calls == []
    memo.write_text(json.dumps({"sha256": "0" * 64, "initializer_bytes": 1}))  # another graph's count
    assert onnx_runtime.open_graph(path, threads=1).weight_bytes == first and len(calls) == 1
    memo.write_text("{not json")
    assert onnx_runtime.open_graph(path, threads=1).weight_bytes == first and len(calls) == 2


def test_a_cpu_command_does_not_import_onnx_once_the_graph_is_cached(tmp_path):
    """The onnx package is needed to export and to count a graph's weights once, not to run it."""
    code = f"""
import sys
from pathlib import Path
import torch
from fgvr.models import onnx_runtime
path = Path({str(tmp_path / "g.onnx")!r})
onnx_runtime.cached_graph(path, lambda: (torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 8, 8)))
onnx_runtime.open_graph(path, threads=1)
"""
    subprocess.run([sys.executable, "-c", code], check=True)  # exports and counts: imports onnx
    probe = code + "\nprint('onnx' in sys.modules, onnx_runtime.graph_name('x', path))\n"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.split()[0] == "False"


_CHILD = """
import sys, time
from pathlib import Path
import torch
from fgvr.models import onnx_runtime

path, log = Path(sys.argv[1]), Path(sys.argv[2])

def make():
    with log.open("a") as f:
        f.write("export\\n")
    time.sleep(1.0)  # long enough for the other process to reach the lock
    return torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 8, 8)

onnx_runtime.cached_graph(path, make)
"""


def test_two_processes_export_once(tmp_path):
    """Two fresh interpreters (not forks: a forked torch may hang in its thread pool) export at once."""
    path, log = tmp_path / "tiny.onnx", tmp_path / "exports.log"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(log)]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert log.read_text().count("export") == 1
    assert onnx_runtime.is_intact(path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cache_goes_to_fgvr_cache_dir_or_beside_writable_weights(tmp_path, monkeypatch):
    weights = tmp_path / "pkg" / "w.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    monkeypatch.delenv("FGVR_CACHE_DIR", raising=False)
    assert onnx_runtime.cache_root(weights) == weights.parent / "fgvr-onnx"
    monkeypatch.setenv("FGVR_CACHE_DIR", str(tmp_path / "c"))
    assert onnx_runtime.cache_root(weights) == tmp_path / "c" / "onnx"


# --- threads --------------------------------------------------------------------------------------


def test_one_thread_count_for_torch_and_onnx_runtime(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("FGVR_THREADS", "1")
    try:
        assert configure() == 1 and torch.get_num_threads() == 1
        onnx_runtime.cached_graph(tmp_path / "t.onnx", _make(tmp_path / "log"))
        graph = onnx_runtime.open_graph(tmp_path / "t.onnx")
        assert graph.threads == 1
        assert graph.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("FGVR_THREADS", "lots")
    assert intra_op_threads() >= 1


def test_a_passive_wait_policy_stops_onnx_runtime_spinning(tmp_path, monkeypatch):
    """`fgvr serve` sets OMP_WAIT_POLICY=PASSIVE (idle workers sleep): ONNX Runtime's pool follows it;
    elsewhere its own default (spinning, for throughput) stays."""
    onnx_runtime.cached_graph(tmp_path / "t.onnx", _make(tmp_path / "log"))
    key = "session.intra_op.allow_spinning"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    options = onnx_runtime.open_graph(tmp_path / "t.onnx", threads=2).session.get_session_options()
    assert options.get_session_config_entry(key) == "0"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    options = onnx_runtime.open_graph(tmp_path / "t.onnx", threads=2).session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry(key)


def test_cgroup_quota(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert cgroup_quota(f) is None
    f.write_text("150000 100000\n")
    assert cgroup_quota(f) == 2
    assert cgroup_quota(tmp_path / "missing") is None


def test_the_registry_counts_the_onnx_runtime_sessions_weights():
    """An ORT-run encoder holds its graph's weights beside the torch modules: the ledger counts both
    (initializer bytes exactly: tolerance 0), the estimate is an upper bound within 5%, and the budget
    check uses the sum (a budget with room for two torch-only copies refuses a second copy here)."""
    import onnx
    from onnx import numpy_helper

    from fgvr.models.footprint import module_bytes
    from fgvr.models.registry import MemoryBudgetError, Registry

    reg = Registry()
    spec = parse_spec("efficientnet-lite0", runtime="onnx")
    with reg.use(spec) as enc:
        graph = onnx.load(str(enc.graph.path))
        init = sum(numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)
        torch_bytes = module_bytes(*enc.torch_modules())
        record = reg.report().model(spec.key)
        assert init > 0 and enc.runtime_bytes() == init
        assert record.measured_bytes == torch_bytes + init
        assert record.measured_bytes <= record.estimated_bytes <= 1.05 * record.measured_bytes
        reg.set_budget("cpu", 2 * torch_bytes + init // 2)
        with pytest.raises(MemoryBudgetError) as err:
            reg.acquire(parse_spec("efficientnet-lite0", runtime="torch"))
        assert [h["bytes"] for h in err.value.holders] == [torch_bytes + init]
    del enc, err  # the test's own references (the traceback holds frames too)
    assert reg.unload(spec) == "unloaded"


# --- CLIP and SigLIP image towers under ONNX Runtime --------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_clip_style_image_features_equal_across_runtimes(fixture, request, sample_photos):
    """The tiny random checkpoints' image towers exported with the legacy exporter give torch's features
    (within 1e-4); the text tower stays torch; the ledger counts the session's weights."""
    folder = request.getfixturevalue(fixture)
    with registry.use(parse_spec(str(folder), runtime="onnx")) as ort_enc, \
            registry.use(parse_spec(str(folder), runtime="torch")) as torch_enc:
        assert parse_spec(str(folder)).runtime == "onnx"  # auto on the CPU: the family declares onnx_export
        assert ort_enc.graph is not None and torch_enc.graph is None
        a, b = ort_enc.encode_images(sample_photos), torch_enc.encode_images(sample_photos)
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-4
        flipped = ort_enc.preprocess(sample_photos).flip(-1)  # a re-ranker view: any (N,3,H,W) batch
        assert (ort_enc.encode_pixels(flipped) - torch_enc.encode_pixels(flipped)).abs().max().item() < 1e-4
        assert ort_enc.runtime_bytes() > 0 and torch_enc.runtime_bytes() == 0
        assert torch.equal(ort_enc.encode_texts(["a red disc"]), torch_enc.encode_texts(["a red disc"]))


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_clip_style_bases_built_with_either_runtime_predict_the_same(fixture, request, tmp_path, monkeypatch):
    from fakes import write_shapes

    folder = request.getfixturevalue(fixture)
    write_shapes(tmp_path / "support", 3, seed=0)
    write_shapes(tmp_path / "test", 2, seed=1)
    rows = {}
    for runtime in ("onnx", "torch"):
        monkeypatch.setenv("FGVR_RUNTIME", runtime)
        r = CliRunner().invoke(cli, ["--runtime", runtime, "build-kb", str(tmp_path / "support"), "--shots", "3",
                                     "--encoder", str(folder), "--out", str(tmp_path / f"kb-{runtime}")])
        assert r.exit_code == 0, r.output
        assert load_knowledge_base(tmp_path / f"kb-{runtime}").encoder_spec["runtime"] == runtime
        rows[runtime] = _classify(tmp_path / f"kb-{runtime}", tmp_path / "test", runtime, monkeypatch)
    assert len(rows["onnx"]) == len(rows["torch"]) == 6
    for a, b in zip(rows["onnx"], rows["torch"]):
        assert (a["path"], a["prediction"]) == (b["path"], b["prediction"])
        assert [c["id"] for c in a["candidates"]] == [c["id"] for c in b["candidates"]]
        for ca, cb in zip(a["candidates"], b["candidates"]):
            assert ca["final"] == pytest.approx(cb["final"], abs=1e-4)
