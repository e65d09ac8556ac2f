"""--ray on a real local Ray cluster (2 CPUs, no dashboard, small object store), started once for this file:
a Ray run gives the single process's answers (evaluate with a run-calibrated budget and the CPU System 2;
classify on a collection), a worker killed with SIGKILL mid-run costs no record, and a rerun after the
driver is killed with SIGKILL resumes from the shards already written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fgvr.cli import cli
from fgvr.collection import classify_collection, read_predictions, shard_files
from fakes import pattern_images

ray = pytest.importorskip("ray", reason="Ray is the fgvr[ray] extra (make setup installs it)")
pytestmark = pytest.mark.slow

# summary keys that are a function of the records (not of timings or memory)
N = 25  # test images of the `twins` fixture, the unreadable one included
STABLE = ("n_images", "n_labelled_known", "n_errors", "accuracy", "accuracy_readable", "accuracy_system1_alone",
          "per_class", "confusion", "unknown_classes", "unknown_class_images", "unknown_class_predictions",
          "slow_rate", "paths", "slowed_images", "system2_calls", "tokens_in_per_image", "budget_curve")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local cluster sized for 2 cores; its address lets a second process (a driver we kill) join it."""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}.items():
        os.environ.setdefault(key, value)
    temp = tempfile.mkdtemp(prefix="fgvr-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 * 2**20, _temp_dir=temp,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _images(root: Path, per_class: int, seed: int) -> None:
    """test_evaluate's three patterns plus a fourth class drawn like red_disc: the base's leave-one-out
    precision is low for the two twins, so the trigger sends some images slow and keeps others fast."""
    pattern_images(root, per_class, seed)
    pattern_images(root / ".twin", per_class, seed + 100)
    (root / ".twin" / "red_disc").rename(root / "red_disc_twin")
    shutil.rmtree(root / ".twin")


@pytest.fixture(scope="session")
def twins(tmp_path_factory):
    """A Lite0 base (4 classes x 3 shots), 24 test images + 1 unreadable, and a single-process collection
    run over them (the reference answers)."""
    from fgvr.knowledge_base import build_knowledge_base

    root = tmp_path_factory.mktemp("twins")
    _images(root / "support", 3, seed=0)
    _images(root / "test", 6, seed=1)  # N = 25 images
    (root / "test" / "blue_stripes" / "broken.png").write_bytes(b"not a png")
    build_knowledge_base(root / "support", root / "kb", shots=3, progress=False)
    r = CliRunner().invoke(cli, ["classify", str(root / "kb"), str(root / "test"), "--out", str(root / "ref"),
                                 "--threshold", "0.5"])
    assert r.exit_code == 0, r.output
    return root


def _answers(records):
    return {r["path"]: (r["prediction"], r["path_taken"], [c["id"] for c in r["candidates"]]) for r in records}


def _same_scores(a, b):
    for p, r in a.items():
        assert r["confidence"] == pytest.approx(b[p]["confidence"], abs=1e-5) if r["confidence"] is not None \
            else b[p]["confidence"] is None


def _children(pid: int) -> list[int]:
    """Every process descending from `pid` (this test's own cluster only, never another one)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_evaluate_on_ray_gives_the_single_process_files(ray_cluster, twins, tmp_path):
    """`fgvr evaluate ... --ray local` against the same command without it: the budget calibrated on the run
    (pass 1: encode stage alone), System 2 (the visual re-ranker) on the triggered rows only."""
    root = twins
    cmd = ["evaluate", str(root / "kb"), str(root / "test"), "--slow-budget", "0.3", "--reranker",
           "--batch-size", "4"]
    one = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "ray"), "--ray", "local", "--ray-workers", "1"])
    assert two.exit_code == 0, two.output

    a = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ray" / "results.jsonl").read_text().splitlines()]
    assert [r["path"] for r in a] == [r["path"] for r in b]  # same file: plan order, each image once
    keys = ("prediction", "path_taken", "fast_prediction", "slow_prediction", "slow_ran", "correct", "error")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    for x, y in zip(a, b):
        for cx, cy in zip(x["candidates"], y["candidates"]):
            assert cx["id"] == cy["id"]
            assert cx["final"] == pytest.approx(cy["final"], abs=1e-5)
            assert (cx["slow"] is None) == (cy["slow"] is None)
    taken = {r["path_taken"] for r in a}
    assert {"fast", "slow", "error"} <= taken  # System 2 ran on some rows and not on others

    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "ray" / "summary.json").read_text())
    for k in STABLE:
        assert sb[k] == pytest.approx(sa[k]) if isinstance(sa[k], float) else sb[k] == sa[k], k
    ca, cb = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "ray"))
    assert cb["calibrated_threshold"] == pytest.approx(ca["calibrated_threshold"])
    assert (tmp_path / "ray" / "report.md").is_file()
    assert len(list((tmp_path / "ray" / "embeddings").glob("chunk-*.safetensors"))) >= 1  # pass 1 kept


def test_worker_killed_mid_run_costs_time_not_records(ray_cluster, twins, tmp_path):
    """The only encode actor is killed with SIGKILL after the first shard is written; Ray restarts it and
    retries its batches; the output holds every image exactly once, with the single process's answers."""
    from fgvr.pipeline import open_system
    from fgvr.ray_run import RayEngine

    root, out = twins, tmp_path / "pred"
    kwargs = dict(kb_path=str(root / "kb"), threshold=0.5)
    killed: list[int] = []
    at_kill: list[int] = []

    def kill_encoder_when_first_shard_lands():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if shard_files(out):
                for pid in _children(os.getpid()):
                    if "EncodeStage" in _cmdline(pid):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        at_kill.append(len(read_predictions(out)))
                        break
            time.sleep(0.01)

    with open_system(**kwargs) as system:
        engine = RayEngine(kwargs, system, workers=1, batch_size=2)
        killer = threading.Thread(target=kill_encoder_when_first_shard_lands, daemon=True)
        killer.start()
        counts = classify_collection(system, root / "test", out, {"kb": "twins"}, shard_size=2, batch_size=2,
                                     engine=engine, progress=False)
        killer.join(timeout=1)
    assert killed, "no encode actor was found to kill"
    assert at_kill[0] < N, "the run finished before the worker was killed"
    assert counts["done_before"] == 0 and counts["written"] == N
    lines = [json.loads(x) for f in shard_files(out) for x in f.read_text().splitlines()]
    assert len(lines) == N and len({r["path"] for r in lines}) == N  # every image exactly once
    ref = {r["path"]: r for r in read_predictions(root / "ref")}
    got = {r["path"]: r for r in lines}
    assert _answers(got.values()) == _answers(ref.values())
    _same_scores(ref, got)


def test_rerun_after_driver_killed_resumes_from_shards(ray_cluster, twins, tmp_path):
    """A real `fgvr classify --ray` driver (joined to this cluster) is killed with SIGKILL mid-run; the
    rerun skips what its shards hold and ends with every image exactly once."""
    root, out = twins, tmp_path / "pred"
    cmd = ["classify", str(root / "kb"), str(root / "test"), "--out", str(out), "--threshold", "0.5",
           "--batch-size", "2", "--shard-size", "2", "--ray-workers", "1"]
    proc = subprocess.Popen([sys.executable, "-c", "from fgvr.cli import main; main()", *cmd, "--ray", ray_cluster],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shard_files(out):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = len(read_predictions(out))
    assert 2 <= before < N

    again = CliRunner().invoke(cli, [*cmd, "--ray", "local"])
    assert again.exit_code == 0, again.output
    assert "resuming" in again.stderr
    counts = json.loads(again.stdout.strip().splitlines()[-1])
    assert counts["done_before"] == before and counts["written"] == N - before
    lines = [json.loads(x) for f in shard_files(out) for x in f.read_text().splitlines()]
    assert len(lines) == N and len({r["path"] for r in lines}) == N
    ref = {r["path"]: r for r in read_predictions(root / "ref")}
    assert _answers(lines) == _answers(ref.values())


def test_the_drivers_runtime_reaches_every_actor(ray_cluster, twins, monkeypatch):
    """`fgvr --runtime torch ... --ray ADDRESS`: an actor's environment is the cluster's (this test's
    cluster was started before FGVR_RUNTIME was set), so the engine hands the driver's preference to every
    stage, and a stage resolves its encoder spec with it."""
    from fgvr.ray_run import EncodeStage, RayEngine

    class _Dataset:  # records what each stage would be constructed with
        def __init__(self) -> None:
            self.stages: list[tuple[str, dict]] = []

        def map_batches(self, fn, **kwargs):
            self.stages.append((fn.__name__, kwargs["fn_constructor_kwargs"]))
            return self

    monkeypatch.setenv("FGVR_RUNTIME", "torch")
    kwargs = {"kb_path": str(twins / "kb"), "reranker": True}
    engine = RayEngine(kwargs, system=None, workers=1)
    ds = _Dataset()
    engine._decide(engine._encode(ds, 0.5), 0.5)
    assert [(name, c["runtime"]) for name, c in ds.stages] == [
        ("EncodeStage", "torch"), ("FastStage", "torch"), ("SlowStage", "torch")]

    monkeypatch.delenv("FGVR_RUNTIME")  # an actor's process: no preference of its own
    for runtime, expected in ((None, "onnx"), ("torch", "torch")):
        stage = EncodeStage(kwargs, 0.5, system2=False, runtime=runtime)
        try:
            assert stage.system.encoder.spec.runtime == expected
        finally:
            stage._opened.__exit__(None, None, None)
