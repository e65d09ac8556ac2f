"""The registry's guarantees (issue 2 point 2), each with a test that fails when the guarantee breaks.

Budget and eviction tests use fake models with fake sizes (the real 7B does not fit on this machine),
through a `Registry` instance with injected loader/estimator/measure. The process-wide registry is what
production uses; the tests on it restore it as they found it.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

import fgvr.models.registry as registry_module
from fgvr.models import MemoryBudgetError, ModelSpec, Registry, parse_spec, registry
from fgvr.models.footprint import module_bytes
from fgvr.models.probe import CpuProbe, CudaProbe, ProbeUnavailable

GB = 10**9


class FakeModel:
    """Stands in for a loaded model of a given size; nothing allocated, so sizes of real models fit."""

    def __init__(self, spec: ModelSpec, nbytes: int) -> None:
        self.spec = spec
        self.nbytes = nbytes

    def torch_modules(self) -> list:
        return []


class FakeFamilies:
    """A loader + estimator pair that records every load; sizes by spec name."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.loads: list[str] = []
        self.lock = threading.Lock()

    def size(self, spec: ModelSpec) -> int:
        base = self.sizes[spec.name]
        return base // 2 if spec.quantization == "int8" else base

    def load(self, spec: ModelSpec) -> FakeModel:
        with self.lock:
            self.loads.append(spec.key)
        return FakeModel(spec, self.size(spec))

    def registry(self) -> Registry:
        return Registry(loader=self.load, estimator=self.size, measure=lambda obj: obj.nbytes)


def fake_spec(name: str, device: str = "cuda:0", **kw) -> ModelSpec:
    return ModelSpec.create("clip", f"/models/{name}", revision="r1", device=device, **kw)


# --- one load per key -------------------------------------------------------------------------------


def test_spellings_of_one_spec_share_one_load(tmp_path, monkeypatch):
    folder = tmp_path / "clip-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    monkeypatch.chdir(tmp_path)
    a = parse_spec("clip-tiny", device="cuda", dtype="bf16")
    b = parse_spec(str(folder), device="cuda:0", dtype="bfloat16")
    assert a.key == b.key
    fam = FakeFamilies({"clip-tiny": 1000})
    reg = fam.registry()
    with reg.use(a) as m1, reg.use(b) as m2:
        assert m1 is m2
    assert len(fam.loads) == 1
    assert reg.report().model(a.key).loads == 1


def test_eight_threads_asking_at_once_load_once():
    started = threading.Barrier(8)
    fam = FakeFamilies({"vlm": 5})
    asked = threading.Semaphore(0)

    def slow_load(spec):  # keeps the first load in flight until every thread has asked
        for _ in range(8):
            assert asked.acquire(timeout=10)
        time.sleep(0.05)  # let the last ones reach the key's lock
        return fam.load(spec)

    reg = Registry(loader=slow_load, estimator=fam.size, measure=lambda o: o.nbytes)
    spec = fake_spec("vlm", device="cpu")
    got, errors = [], []

    def ask():
        try:
            started.wait(timeout=10)
            asked.release()
            with reg.use(spec) as m:
                got.append(m)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert fam.loads == [spec.key]


def test_loading_one_key_does_not_block_another():
    """The ledger lock is not held during a load: a slow load of A leaves B free to load meanwhile."""
    fam = FakeFamilies({"slow": 5, "fast": 5})
    a_started, a_release = threading.Event(), threading.Event()

    def loader(spec):
        if spec.name == "slow":
            a_started.set()
            assert a_release.wait(timeout=10), "B never finished while A was loading"
        return fam.load(spec)

    reg = Registry(loader=loader, estimator=fam.size, measure=lambda o: o.nbytes)
    t = threading.Thread(target=lambda: reg.use(fake_spec("slow", "cpu")).__enter__())
    t.start()
    assert a_started.wait(timeout=10)
    with reg.use(fake_spec("fast", "cpu")):  # would deadlock here with a global lock held while loading
        pass
    a_release.set()
    t.join(timeout=10)
    assert sorted(k.split("|")[1] for k in fam.loads) == ["/models/fast", "/models/slow"]


def test_a_load_in_flight_holds_its_bytes_on_the_ledger():
    """Two different models loading at once cannot both pass the budget check: the first one's estimate
    is reserved before its load starts."""
    fam = FakeFamilies({"first": 6 * GB, "second": 6 * GB})
    in_flight, finish = threading.Event(), threading.Event()

    def loader(spec):
        if spec.name == "first":
            in_flight.set()
            assert finish.wait(timeout=10)
        return fam.load(spec)

    reg = Registry(loader=loader, estimator=fam.size, measure=lambda o: o.nbytes)
    reg.set_budget("cuda:0", 10 * GB)
    t = threading.Thread(target=lambda: reg.acquire(fake_spec("first")))
    t.start()
    assert in_flight.wait(timeout=10)
    assert reg.report().device("cuda:0").current == 6 * GB  # reserved while loading
    with pytest.raises(MemoryBudgetError):
        reg.acquire(fake_spec("second"))
    finish.set()
    t.join(timeout=10)
    assert [k.split("|")[1] for k in fam.loads] == ["/models/first"]


def test_registry_module_under_two_names_is_one_registry(monkeypatch):
    """The trap of the incident: the same file imported as two modules must not make two singletons."""
    path = Path(registry_module.__file__)
    mod_spec = importlib.util.spec_from_file_location("fgvr_registry_second_name", path)
    alias = importlib.util.module_from_spec(mod_spec)
    monkeypatch.setitem(sys.modules, "fgvr_registry_second_name", alias)  # as a real import would
    mod_spec.loader.exec_module(alias)
    assert alias is not registry_module
    assert alias.process_registry() is registry.process_registry()

    proc = registry.process_registry()
    fam = FakeFamilies({"two-names": 64})
    monkeypatch.setattr(proc, "_loader", fam.load)
    monkeypatch.setattr(proc, "_estimator", fam.size)
    monkeypatch.setattr(proc, "_measure", lambda o: o.nbytes)
    spec = fake_spec("two-names", "cpu")
    try:
        with registry.use(spec) as a, alias.use(spec) as b:
            assert a is b
        assert fam.loads == [spec.key]
    finally:
        proc.unload(spec)
        proc._entries.pop(spec.key, None)


def test_importing_every_fgvr_module_loads_no_model():
    """Import fgvr and all its modules in a fresh process: no nn.Module built, no torch.load, empty ledger."""
    code = r"""
import importlib, pkgutil, sys
import torch
created, loaded = [], []
orig_init, orig_load = torch.nn.Module.__init__, torch.load
def init(self, *a, **k):
    created.append(type(self).__name__)
    orig_init(self, *a, **k)
torch.nn.Module.__init__ = init
torch.load = lambda *a, **k: loaded.append(a) or orig_load(*a, **k)
import fgvr
names = []
for info in pkgutil.walk_packages(fgvr.__path__, "fgvr."):
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("fgvr"):
            raise
        continue  # an optional dependency (e.g. bitsandbytes) missing here
    names.append(info.name)
slot = sys.modules.get("_fgvr_model_registry_slot")
entries = len(slot.registry._entries) if slot is not None and slot.registry is not None else 0
assert "fgvr.models.registry" in names and "fgvr.models.plan" in names, names
print(len(names), created, loaded, entries)
assert not created, created
assert not loaded
assert entries == 0
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


# --- budget, eviction, leases -------------------------------------------------------------------------


def test_budget_evicts_least_recently_used_idle_model_first():
    fam = FakeFamilies({"a": 4 * GB, "b": 4 * GB, "c": 4 * GB})
    reg = fam.registry()
    reg.set_budget("cuda", "10GB")
    with reg.use(fake_spec("a")):
        pass
    with reg.use(fake_spec("b")):
        pass
    with reg.use(fake_spec("a")):  # a is now the most recently used
        pass
    with reg.use(fake_spec("c")):
        rep = reg.report()
    states = {m.name: (m.state, m.device) for m in rep.models}
    assert states["b"] == ("offloaded", "cpu")  # least recently used went to the CPU
    assert states["a"] == ("loaded", "cuda:0") and states["c"] == ("loaded", "cuda:0")
    assert rep.device("cuda:0").current == 8 * GB
    assert rep.device("cuda:0").peak <= 10 * GB
    # b comes back from the CPU without a second load, evicting a (now the LRU)
    with reg.use(fake_spec("b")):
        pass
    rep = reg.report()
    assert rep.model(fake_spec("b").key).loads == 1 and rep.model(fake_spec("b").key).state == "loaded"
    assert rep.model(fake_spec("a").key).state == "offloaded"
    assert len(fam.loads) == 3


def test_eviction_unloads_when_offload_is_impossible():
    fam = FakeFamilies({"a": 6 * GB, "b": 6 * GB})
    reg = fam.registry()
    reg.set_budget("cuda:0", 10 * GB)
    reg.set_budget("cpu", 1 * GB)  # no room on the CPU either: a must be unloaded
    with reg.use(fake_spec("a")):
        pass
    with reg.use(fake_spec("b")):
        pass
    assert reg.report().model(fake_spec("a").key).state == "unloaded"
    assert reg.report().device("cuda:0").current == 6 * GB


def test_quantised_models_are_unloaded_not_offloaded():
    fam = FakeFamilies({"q": 16 * GB, "b": 6 * GB})  # q is int8: 8 GB
    reg = fam.registry()
    reg.set_budget("cuda:0", 10 * GB)
    q = ModelSpec.create("qwen2_5_vl", "/models/q", revision="r", device="cuda", quantization="int8")
    with reg.use(q):
        pass
    with reg.use(fake_spec("b")):
        pass
    assert reg.report().model(q.key).state == "unloaded"


def test_over_budget_error_names_numbers_and_holders_and_loads_nothing():
    fam = FakeFamilies({"vlm": 17.5e9, "clip": 1 * GB, "idle": 1 * GB})
    reg = fam.registry()
    reg.set_budget("cuda:0", "18GB")
    vlm = ModelSpec.create("qwen2_5_vl", "/models/vlm", revision="r", device="cuda", dtype="bf16")
    with reg.use(fake_spec("idle")):
        pass
    with reg.use(fake_spec("clip")):
        # 18 GB - 1 (clip, leased) - 1 (idle) = 16 free; evicting the idle one gives 17 < 17.5
        with pytest.raises(MemoryBudgetError) as err:
            with reg.use(vlm):
                pytest.fail("must not get here")
    e = err.value
    assert e.requested == 17.5e9 and e.available == 16 * GB and e.budget == 18 * GB
    msg = str(e)
    assert "17.50 GB" in msg and "16.00 GB" in msg and "18.00 GB" in msg
    assert "clip" in msg and "in use" in msg and "idle" in msg
    assert "int8" in msg and "pixel cap" in msg and "encoder off the GPU" in msg
    # nothing loaded, nothing evicted on the way to the refusal
    assert not any("vlm" in k for k in fam.loads)
    assert reg.report().model(fake_spec("idle").key).state == "loaded"


def test_nested_leases_pin_the_model():
    fam = FakeFamilies({"a": 6 * GB, "b": 6 * GB})
    reg = fam.registry()
    reg.set_budget("cuda:0", 10 * GB)
    a = fake_spec("a")
    with reg.use(a):
        with reg.use(a):
            assert reg.report().model(a.key).leases == 2
            with pytest.raises(MemoryBudgetError):
                reg.acquire(fake_spec("b"))
        assert reg.report().model(a.key).leases == 1
        with pytest.raises(MemoryBudgetError):  # still pinned by the outer lease
            reg.acquire(fake_spec("b"))
        assert reg.report().model(a.key).state == "loaded"
    with reg.use(fake_spec("b")):  # now a is idle and goes
        assert reg.report().model(a.key).state == "offloaded"
    with pytest.raises(RuntimeError):
        reg.release(a)  # no lease left to release


def test_failed_load_leaves_nothing_on_the_ledger():
    def broken(spec):
        raise OSError("weights missing")

    reg = Registry(loader=broken, estimator=lambda s: 5 * GB, measure=lambda o: o.nbytes)
    reg.set_budget("cuda:0", 10 * GB)
    with pytest.raises(OSError):
        with reg.use(fake_spec("x")):
            pass
    rep = reg.report()
    assert rep.device("cuda:0").current == 0
    assert rep.model(fake_spec("x").key).state == "unloaded"


# --- unloading is verified ------------------------------------------------------------------------------


class Holder:
    def __init__(self, spec):
        self.spec = spec
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))

    def torch_modules(self):
        return [self.net]


def test_stray_reference_is_reported_as_leaked_and_stays_counted():
    loads = []
    reg = Registry(loader=lambda s: loads.append(s) or Holder(s), estimator=lambda s: 64 * 65 * 4 + 8 * 65 * 4)
    spec = fake_spec("leaky", "cpu")
    with reg.use(spec) as m:
        stray = m.net  # e.g. a module kept in a cache or a traceback
    del m
    assert reg.unload(spec) == "leaked"
    rep = reg.report()
    nbytes = module_bytes(stray)
    assert rep.model(spec.key).state == "leaked" and rep.model(spec.key).leaked_bytes == nbytes
    assert rep.device("cpu").leaked == nbytes and rep.device("cpu").current == nbytes
    del stray
    rep = reg.report()  # re-verified after gc: gone now
    assert rep.model(spec.key).state == "unloaded"
    assert rep.device("cpu").leaked == 0 and rep.device("cpu").current == 0


def test_clean_unload_frees_the_model():
    reg = Registry(loader=Holder, estimator=lambda s: 1)
    spec = fake_spec("clean", "cpu")
    with reg.use(spec) as m:
        ref = weakref.ref(m.net)
    del m
    assert reg.unload(spec) == "unloaded"
    assert ref() is None


def test_leaked_model_asked_again_is_reused_not_loaded_twice():
    loads = []
    reg = Registry(loader=lambda s: loads.append(s) or Holder(s), estimator=lambda s: 1)
    spec = fake_spec("revive", "cpu")
    with reg.use(spec) as first:
        pass
    assert reg.unload(spec) == "leaked"  # `first` still references it
    with reg.use(spec) as again:
        assert again is first
    assert len(loads) == 1


def test_cannot_unload_a_leased_model():
    reg = Registry(loader=Holder, estimator=lambda s: 1)
    spec = fake_spec("busy", "cpu")
    with reg.use(spec):
        with pytest.raises(RuntimeError, match="in use"):
            reg.unload(spec)


# --- probes -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_probe_refuses_without_cuda():
    assert torch.cuda.memory_allocated() == 0  # the silent zero the probe exists to avoid
    with pytest.raises(ProbeUnavailable, match="torch.cuda is not available"):
        CudaProbe("cuda:0")
    rep_dev = Registry(loader=Holder, estimator=lambda s: 1)
    rep_dev.set_budget("cuda:0", GB)
    d = rep_dev.report().device("cuda:0")
    assert d.probe_used is None and "not available" in d.probe_note


def test_cpu_probe_sees_memory_being_used():
    """A fresh anonymous mapping, touched page by page, must show up in the resident set.

    (A bytearray may be carved out of heap pages an earlier test freed but the allocator kept resident,
    and then the resident set does not move: that is the allocator, not the probe.)
    """
    p = CpuProbe()
    before = p.used_bytes()
    block = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(block), mmap.PAGESIZE):
        block[i] = 1
    assert p.used_bytes() - before >= 32 * 2**20
    assert p.read().peak > 0 and p.read().device == "cpu"
    block.close()


# --- the incident, replayed -----------------------------------------------------------------------------


def test_incident_replay_vlm_loaded_once_never_two_copies(tmp_path, monkeypatch):
    """Top-level system, knowledge-base builder, experience builder and System 2 all ask for the VLM, each
    spelling it its own way; with the real models' sizes and an 18 GB budget there is one copy, ever."""
    from fgvr.models.configs import QWEN2_5_VL
    from fgvr.models.plan import estimate_spec_bytes

    vlm_dir = tmp_path / "models" / "qwen2.5-vl-7b"
    vlm_dir.mkdir(parents=True)
    (vlm_dir / "config.json").write_text(json.dumps(QWEN2_5_VL["qwen2.5-vl-7b"]))
    clip_dir = tmp_path / "models" / "clip-vit-b32"
    clip_dir.mkdir()
    from fgvr.models.configs import CLIP

    (clip_dir / "config.json").write_text(json.dumps(CLIP["clip-vit-b32"]))
    monkeypatch.chdir(tmp_path)

    loads: list[str] = []

    def loader(spec):
        loads.append(spec.key)
        return FakeModel(spec, estimate_spec_bytes(spec))  # sizes of the real architectures (meta device)

    reg = Registry(loader=loader, estimator=estimate_spec_bytes, measure=lambda o: o.nbytes)
    reg.set_budget("cuda:0", "18GB")

    def top_level():
        return parse_spec("models/qwen2.5-vl-7b", device="cuda", dtype="bf16")

    def knowledge_base_builder():
        return parse_spec(str(vlm_dir), device="cuda:0", dtype="bfloat16")

    def experience_builder():
        return parse_spec("./models/../models/qwen2.5-vl-7b", device="CUDA:0", dtype="bf16")

    def system2():
        return parse_spec(str(vlm_dir) + "/", device="cuda", dtype="bfloat16")

    clip = parse_spec("models/clip-vit-b32", device="cuda", dtype="bf16")
    with reg.use(top_level()) as vlm, reg.use(clip):
        with reg.use(knowledge_base_builder()) as v2:
            assert v2 is vlm
            with reg.use(experience_builder()) as v3, reg.use(system2()) as v4:
                assert v3 is vlm and v4 is vlm
                rep = reg.report()
                assert rep.model(top_level().key).leases == 4
    vlm_keys = [k for k in loads if k.startswith("qwen2_5_vl")]
    assert len(vlm_keys) == 1
    vlm_bytes = estimate_spec_bytes(top_level())
    assert abs(vlm_bytes - 16.58e9) / 16.58e9 < 0.01

    # A second copy (another dtype = another key) while the first is leased: refused, nothing loaded.
    with reg.use(top_level()):
        with pytest.raises(MemoryBudgetError):
            reg.acquire(top_level().replace(dtype="fp16"))
    # Idle, the first copy leaves the GPU before the second arrives.
    with reg.use(top_level().replace(dtype="fp16")):
        assert reg.report().model(top_level().key).state == "offloaded"
    rep = reg.report()
    assert rep.device("cuda:0").peak <= 18 * GB
    assert rep.device("cuda:0").peak < 2 * vlm_bytes


def test_incident_replay_on_the_real_loader_with_the_tiny_vlm(tiny_qwen_dir, monkeypatch):
    """The same four callers through the process-wide registry and the real Qwen2.5-VL loader."""
    monkeypatch.chdir(tiny_qwen_dir.parent)
    spellings = [
        parse_spec(tiny_qwen_dir.name),  # top-level system: relative path, default dtype
        parse_spec(str(tiny_qwen_dir), dtype="fp32", device="cpu"),  # knowledge-base builder
        parse_spec(f"./{tiny_qwen_dir.name}/", dtype="float32"),  # experience builder
        parse_spec(str(tiny_qwen_dir / ".." / tiny_qwen_dir.name), dtype="FP32", device="CPU"),  # System 2
    ]
    key = spellings[0].key
    assert all(s.key == key for s in spellings)
    with registry.use(spellings[0]) as top:
        loads = registry.report().model(key).loads
        with registry.use(spellings[1]) as kb, registry.use(spellings[2]) as exp, registry.use(spellings[3]) as s2:
            assert top is kb is exp is s2
            assert registry.report().model(key).leases >= 4
    assert registry.report().model(key).loads == loads
