"""The process-wide model registry: the only way any part of fgvr gets a model.

    from fgvr.models import registry, parse_spec
    with registry.use(parse_spec("efficientnet-lite0")) as enc:   # loads once per process, pinned inside
        feats = enc.encode_images(images)

Why it looks like this (a VLM loaded twice under two module names runs a GPU out of memory):
* One ledger per process, kept in a fixed slot in `sys.modules`, not in a module global: the same file
  imported under two module names would otherwise hold two "singletons" and load everything twice.
* One load per normalised spec key (`ModelSpec.key`): 'cuda' and 'cuda:0', relative and absolute paths are
  one model. A lock per key makes eight threads asking at once wait for one load; the ledger lock is never
  held while a model loads, so other keys are not blocked behind it.
* The size is known before loading (the family's `estimate_bytes`: meta device or safetensors header) and
  checked against the device's budget *before* the load: idle models are offloaded to CPU or unloaded,
  least recently used first, and if that cannot make room, `MemoryBudgetError` says who holds what and what
  to try, and nothing has been loaded or evicted.
* A lease pins: a model inside a `with registry.use(...)` is never evicted.
* Unloading is verified with weak references after `gc.collect()`: a model a stray reference keeps alive is
  reported as leaked and its bytes stay on the ledger (they are still in memory). Asked for again, the leaked
  object is reused rather than loaded a second time.
"""

from __future__ import annotations

import gc
import itertools
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from fgvr.errors import ModelError
from fgvr.models.footprint import format_bytes, module_bytes, parse_bytes
from fgvr.models.spec import ModelSpec, normalise_device

Loader = Callable[[ModelSpec], Any]
Estimator = Callable[[ModelSpec], int]

_SLOT = "_fgvr_model_registry_slot"  # the one per-process place the registry lives (see module docstring)


class MemoryBudgetError(ModelError, RuntimeError):
    """A load that does not fit the device's budget even after evicting every idle model."""

    def __init__(self, message: str, *, key: str, device: str, requested: int, available: int,
                 budget: int, holders: list[dict]) -> None:
        super().__init__(message)
        self.key = key
        self.device = device
        self.requested = requested
        self.available = available
        self.budget = budget
        self.holders = holders


def _default_loader(spec: ModelSpec) -> Any:
    from fgvr.models import families  # lazy: importing the registry must not import model code

    return families.load(spec)


def _default_estimator(spec: ModelSpec) -> int:
    from fgvr.models import families

    return families.estimate_bytes(spec)


def torch_modules(obj: Any) -> list:
    """What the registry measures, moves and leak-checks: `obj.torch_modules()`, or obj if it is a module."""
    if hasattr(obj, "torch_modules"):
        return list(obj.torch_modules())
    import torch

    if isinstance(obj, torch.nn.Module):
        return [obj]
    raise TypeError(f"a loaded model must be an nn.Module or have torch_modules(); got {type(obj).__name__}")


def measured_bytes(obj: Any) -> int:
    """What a loaded object holds: the unique bytes of its torch modules plus the weights another runtime
    holds for it (`obj.runtime_bytes()`: an ONNX Runtime session's initializers), which torch cannot see."""
    extra = getattr(obj, "runtime_bytes", None)
    return module_bytes(*torch_modules(obj)) + (int(extra()) if callable(extra) else 0)


@dataclass
class ModelRecord:
    key: str
    name: str
    family: str
    state: str  # loading | loaded | offloaded | unloaded | leaked
    device: str  # where its weights are now (offloaded: cpu)
    estimated_bytes: int | None
    measured_bytes: int | None
    loads: int
    leases: int
    leaked_bytes: int = 0  # copies let go of but still alive (a stray reference); still in memory


@dataclass
class DeviceRecord:
    device: str
    budget: int | None
    current: int  # bytes on the ledger now (loaded, offloaded here, being loaded, leaked)
    peak: int
    leaked: int
    probe_used: int | None = None  # what the device's probe measures now, where it can
    probe_note: str = ""


@dataclass
class MemoryReport:
    models: list[ModelRecord] = field(default_factory=list)
    devices: list[DeviceRecord] = field(default_factory=list)

    def model(self, key: str) -> ModelRecord:
        for m in self.models:
            if m.key == key:
                return m
        raise KeyError(key)

    def device(self, name: str) -> DeviceRecord:
        name = normalise_device(name)
        for d in self.devices:
            if d.device == name:
                return d
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"models": [asdict(m) for m in self.models], "devices": [asdict(d) for d in self.devices]}

    def format(self) -> str:
        lines = ["models:"]
        if not self.models:
            lines.append("  (none loaded in this process)")
        for m in self.models:
            lines.append(
                f"  {m.name:<28} {m.state:<9} {m.device:<7} est {format_bytes(m.estimated_bytes):>10}  "
                f"measured {format_bytes(m.measured_bytes):>10}  loads {m.loads}  leases {m.leases}"
                + (f"  LEAKED {format_bytes(m.leaked_bytes)}" if m.leaked_bytes else "")
            )
            lines.append(f"      key {m.key}")
        lines.append("devices:")
        for d in self.devices:
            budget = format_bytes(d.budget) if d.budget is not None else "unlimited"
            probe = format_bytes(d.probe_used) if d.probe_used is not None else f"n/a ({d.probe_note})"
            lines.append(
                f"  {d.device:<7} budget {budget:>10}  current {format_bytes(d.current):>10}  "
                f"peak {format_bytes(d.peak):>10}  leaked {format_bytes(d.leaked):>10}  probe {probe}"
            )
        return "\n".join(lines)


@dataclass
class _Leak:
    """A copy the registry let go of that something else still keeps alive."""

    device: str
    nbytes: int
    refs: list  # weak references to the object and its modules
    obj_ref: Any  # weak reference to the loaded object (None if it is not weak-referenceable)

    def alive(self) -> bool:
        return any(r() is not None for r in self.refs)


class _Entry:
    """Ledger line for one spec key."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.key = spec.key
        self.lock = threading.Lock()  # held while this key loads or comes back from CPU
        self.obj: Any = None
        self.state = "unloaded"  # loading | loaded | offloaded | unloaded | leaked
        self.device = spec.device
        self.estimated: int | None = None
        self.measured: int | None = None
        self.reserved = 0  # bytes held on the ledger while loading
        self.loads = 0
        self.leases = 0
        self.last_used = 0
        self.leaks: list[_Leak] = []

    @property
    def bytes(self) -> int:
        """Bytes of the copy the registry holds (not counting leaks)."""
        if self.state == "loading":
            return self.reserved
        if self.state in ("loaded", "offloaded"):
            return self.measured if self.measured is not None else (self.estimated or 0)
        return 0

    def bytes_on(self, device: str) -> int:
        own = self.bytes if self.device == device else 0
        return own + sum(leak.nbytes for leak in self.leaks if leak.device == device)


class Registry:
    """A ledger of loaded models with budgets per device. Production uses the process-wide one
    (`process_registry()` / this module's functions); tests build their own with fake loaders."""

    def __init__(self, loader: Loader | None = None, estimator: Estimator | None = None,
                 measure: Callable[[Any], int] | None = None) -> None:
        """`loader(spec)` and `estimator(spec)` default to the model families; `measure(obj)` to the unique
        bytes of `obj.torch_modules()` plus `obj.runtime_bytes()` (`measured_bytes`). Tests inject fakes
        (e.g. the sizes of models this machine lacks)."""
        self._loader = loader or _default_loader
        self._estimator = estimator or _default_estimator
        self._measure = measure or measured_bytes
        self._lock = threading.RLock()  # guards the ledger; never held while a model loads
        self._entries: dict[str, _Entry] = {}
        self._budgets: dict[str, int | None] = {}
        self._peak: dict[str, int] = {}
        self._clock = itertools.count(1)

    # --- budget ---------------------------------------------------------------------------------------
    def set_budget(self, device: str, nbytes: int | str | None) -> None:
        """Cap what the registry may hold on `device` ('cuda', 'cuda:0', 'cpu'); None removes the cap."""
        with self._lock:
            self._budgets[normalise_device(device)] = None if nbytes is None else parse_bytes(nbytes)

    def budget(self, device: str) -> int | None:
        """The budget of `device`: as set, else the capacity of a CUDA device, else unlimited (None)."""
        device = normalise_device(device)
        with self._lock:
            if device in self._budgets:
                return self._budgets[device]
        if device.startswith("cuda"):
            from fgvr.models.probe import ProbeUnavailable, probe_for

            try:
                total = probe_for(device).total_bytes()
            except ProbeUnavailable:
                return None
            with self._lock:
                self._budgets.setdefault(device, total)
                return self._budgets[device]
        return None

    def held_bytes(self, device: str) -> int:
        device = normalise_device(device)
        with self._lock:
            return sum(e.bytes_on(device) for e in self._entries.values())

    # --- leases ---------------------------------------------------------------------------------------
    @contextmanager
    def use(self, spec: ModelSpec) -> Iterator[Any]:
        """Lease the model for `spec`: loaded at most once per process, never evicted while leased."""
        obj = self.acquire(spec)
        try:
            yield obj
        finally:
            obj = None
            self.release(spec)

    def acquire(self, spec: ModelSpec) -> Any:
        """Take a lease (pair with `release`); `use` is the safe form."""
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"registry.use needs a ModelSpec (see fgvr.models.parse_spec), got {spec!r}")
        entry = self._entry(spec)
        with entry.lock:  # one load per key; other keys go on in parallel
            with self._lock:
                if entry.state == "loaded":
                    return self._lease(entry)
                if entry.state in ("leaked", "unloaded") and self._revive(entry):
                    return self._lease(entry)
                need = entry.measured if entry.measured is not None else entry.estimated
            if need is None:  # first load: size it before anything is loaded (outside the ledger lock)
                need = int(self._estimator(spec))
                entry.estimated = need
            with self._lock:
                self._make_room(spec.device, need, entry)  # raises with nothing loaded or evicted
                previous = entry.state
                entry.state, entry.reserved, entry.device = "loading", need, spec.device
                self._note_peak(spec.device)
            try:
                if previous == "offloaded":
                    obj = entry.obj
                    self._move(obj, spec.device)
                else:
                    obj = self._loader(spec)
                measured = int(self._measure(obj))
            except BaseException:
                with self._lock:
                    if previous == "offloaded":
                        try:
                            self._move(entry.obj, "cpu")
                            entry.state, entry.device = "offloaded", "cpu"
                        except Exception:  # half moved: drop it rather than guess where it lives
                            self._unload_locked(entry)
                    else:
                        entry.state, entry.obj = ("leaked" if entry.leaks else "unloaded"), None
                    entry.reserved = 0
                raise
            with self._lock:
                entry.obj, entry.measured, entry.state, entry.reserved = obj, measured, "loaded", 0
                if previous != "offloaded":
                    entry.loads += 1
                self._note_peak(spec.device)
                budget = self.budget(spec.device)
                if measured > need and budget is not None and self.held_bytes(spec.device) > budget:
                    warnings.warn(f"{spec.name} measured {format_bytes(measured)} against an estimate of "
                                  f"{format_bytes(need)}: {spec.device} is now over its budget", stacklevel=3)
                return self._lease(entry)

    def release(self, spec: ModelSpec) -> None:
        with self._lock:
            entry = self._entries.get(spec.key)
            if entry is None or entry.leases <= 0:
                raise RuntimeError(f"release without a lease: {spec.key}")
            entry.leases -= 1

    # --- unloading ------------------------------------------------------------------------------------
    def unload(self, spec: ModelSpec | str) -> str:
        """Drop the registry's reference and verify the model is gone; returns 'unloaded' or 'leaked'."""
        key = spec if isinstance(spec, str) else spec.key
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return "unloaded"
            if entry.leases:
                raise RuntimeError(f"{entry.spec.name} is in use ({entry.leases} lease(s)); finish them first")
            if entry.state in ("loaded", "offloaded"):
                self._unload_locked(entry)
            self._recheck_leaks(entry)
            return entry.state

    def unload_all(self) -> None:
        """Unload every model without a lease (e.g. at the end of a job or a test)."""
        with self._lock:
            for entry in list(self._entries.values()):
                if not entry.leases:
                    self.unload(entry.key)

    # --- report ---------------------------------------------------------------------------------------
    def report(self) -> MemoryReport:
        """Per model: key, state, device, estimated and measured bytes, loads, leases. Per device: budget,
        current, peak, leaked bytes, and what the device's probe measures (or why it cannot)."""
        from fgvr.models.probe import ProbeUnavailable, probe_for

        with self._lock:
            for e in self._entries.values():
                self._recheck_leaks(e)
            models = [
                ModelRecord(e.key, e.spec.name, e.spec.family, e.state, e.device, e.estimated, e.measured,
                            e.loads, e.leases, sum(leak.nbytes for leak in e.leaks))
                for e in self._entries.values()
            ]
            devices = sorted({e.device for e in self._entries.values()} | set(self._budgets) | set(self._peak))
            rows = []
            for d in devices:
                leaked = sum(lk.nbytes for e in self._entries.values() for lk in e.leaks if lk.device == d)
                rows.append(DeviceRecord(d, self._budgets.get(d), self.held_bytes(d), self._peak.get(d, 0), leaked))
        for r in rows:
            try:
                r.probe_used = probe_for(r.device).used_bytes()
            except ProbeUnavailable as exc:
                r.probe_note = str(exc)
        return MemoryReport(models, rows)

    # --- internals (call with self._lock held unless said otherwise) ----------------------------------
    def _entry(self, spec: ModelSpec) -> _Entry:
        with self._lock:
            entry = self._entries.get(spec.key)
            if entry is None:
                entry = self._entries[spec.key] = _Entry(spec)
            return entry

    def _lease(self, entry: _Entry) -> Any:
        entry.leases += 1
        entry.last_used = next(self._clock)
        return entry.obj

    def _note_peak(self, device: str) -> None:
        self._peak[device] = max(self._peak.get(device, 0), self.held_bytes(device))

    def _make_room(self, device: str, need: int, entry: _Entry) -> None:
        budget = self.budget(device)
        if budget is None:
            return
        held = self.held_bytes(device)
        available = budget - held
        if need <= available:
            return
        idle = sorted(
            (e for e in self._entries.values()
             if e is not entry and e.device == device and e.leases == 0 and e.state in ("loaded", "offloaded")),
            key=lambda e: e.last_used,
        )
        victims, free = [], available
        for e in idle:
            if free >= need:
                break
            victims.append(e)
            free += e.bytes
        if free < need:
            raise self._budget_error(entry.spec, device, need, available, budget)
        for v in victims:  # least recently used first
            if device != "cpu" and self._can_offload(v):
                self._move(v.obj, "cpu")
                v.state, v.device = "offloaded", "cpu"
                self._note_peak("cpu")
            else:
                self._unload_locked(v)

    def _can_offload(self, e: _Entry) -> bool:
        if e.spec.quantization or not getattr(e.obj, "supports_offload", True):
            return False  # bitsandbytes weights cannot be moved to CPU and back
        cpu_budget = self.budget("cpu")
        return cpu_budget is None or self.held_bytes("cpu") + e.bytes <= cpu_budget

    @staticmethod
    def _move(obj: Any, device: str) -> None:
        for m in torch_modules(obj):
            m.to(device)

    def _unload_locked(self, entry: _Entry) -> None:
        """Drop the registry's reference, then verify with weak references that the copy is gone."""
        obj, nbytes, device = entry.obj, entry.bytes, entry.device
        entry.obj = None
        refs = [weakref.ref(m) for m in torch_modules(obj)]
        try:
            obj_ref = weakref.ref(obj)
            refs.append(obj_ref)
        except TypeError:
            obj_ref = None  # not weak-referenceable: its modules still are
        del obj
        entry.leaks.append(_Leak(device, nbytes, refs, obj_ref))
        entry.state, entry.device = "unloaded", entry.spec.device
        self._recheck_leaks(entry)
        if device.startswith("cuda") and "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _recheck_leaks(self, entry: _Entry) -> None:
        """Forget copies that are really gone; a copy still alive stays 'leaked' and its bytes counted."""
        if not entry.leaks:
            return
        gc.collect()
        entry.leaks = [leak for leak in entry.leaks if leak.alive()]
        if entry.state in ("unloaded", "leaked"):
            entry.state = "leaked" if entry.leaks else "unloaded"

    def _revive(self, entry: _Entry) -> bool:
        """A leaked copy is still in memory on the right device: hand it out rather than load a second one."""
        for leak in entry.leaks:
            obj = leak.obj_ref() if leak.obj_ref is not None else None
            if obj is not None and leak.device == entry.spec.device:
                entry.leaks.remove(leak)
                entry.obj, entry.state, entry.device = obj, "loaded", leak.device
                return True
        return False

    def _budget_error(self, spec: ModelSpec, device: str, need: int, available: int,
                      budget: int) -> MemoryBudgetError:
        holders = [
            {"name": e.spec.name, "key": e.key, "state": e.state, "bytes": e.bytes_on(device), "leases": e.leases}
            for e in self._entries.values() if e.bytes_on(device)
        ]
        held = "; ".join(
            f"{h['name']} {format_bytes(h['bytes'])} ({h['state']}, "
            f"{'in use: ' + str(h['leases']) + ' lease(s)' if h['leases'] else 'idle'})"
            for h in holders
        ) or "nothing"
        from fgvr.models import families

        tries = families.fit_hints(spec, device)
        tries.append("finish the leases of models in use, or raise the budget (registry.set_budget)")
        msg = (
            f"cannot load {spec.name} on {device}: it needs {format_bytes(need)}, "
            f"{format_bytes(max(available, 0))} of the {format_bytes(budget)} budget is free and evicting every "
            f"idle model would not make room. Held on {device}: {held}. Nothing was loaded. Try: "
            + "; ".join(tries) + ". `fgvr memory plan` shows what fits."
        )
        return MemoryBudgetError(msg, key=spec.key, device=device, requested=need, available=available,
                                 budget=budget, holders=holders)


def process_registry() -> Registry:
    """The one registry of this process, kept in a fixed `sys.modules` slot so that this file imported
    under any module name (or reloaded) finds the same ledger. Creating it loads nothing."""
    slot = sys.modules.get(_SLOT)
    if slot is None:
        fresh = types.ModuleType(_SLOT, "fgvr's process-wide model registry (see fgvr.models.registry)")
        fresh.lock = threading.Lock()
        fresh.registry = None
        slot = sys.modules.setdefault(_SLOT, fresh)  # atomic: whoever comes first owns the slot
    if slot.registry is None:
        with slot.lock:
            if slot.registry is None:
                slot.registry = Registry()
    return slot.registry


# The module is the API: `from fgvr.models import registry; registry.use(spec)`.
def use(spec: ModelSpec):  # noqa: ANN201 - a context manager yielding the family's loaded object
    """Lease the model for `spec` from the process-wide registry (see `Registry.use`)."""
    return process_registry().use(spec)


def set_budget(device: str, nbytes: int | str | None) -> None:
    process_registry().set_budget(device, nbytes)


def report() -> MemoryReport:
    return process_registry().report()


def unload(spec: ModelSpec | str) -> str:
    return process_registry().unload(spec)


def unload_all() -> None:
    process_registry().unload_all()
