"""Model families: each module in this package describes one family (or two close ones) completely.

A family module declares `FAMILY = Family(...)` (or `FAMILIES = (...)`): what it is called, how a folder
of it is recognised, how to load it, its size before loading, the network on the meta device for
`fgvr memory plan`, and what to try when it does not fit. The spec (`parse_spec`, `ModelSpec.create`),
the registry and the plan read these declarations and know no family by name, so adding a family is one
new file here (see docs/ARCHITECTURE.md, "How to add an encoder family").

Family modules are found and imported on first use, not when this package is imported, so importing
fgvr imports neither transformers nor any model code.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

    from fgvr.models.spec import ModelSpec

ROLES = ("image-encoder", "vlm", "text-embedder")


def encoder_fit_hints(spec: "ModelSpec", device: str) -> list[str]:
    """What to try when an encoder does not fit its device's budget (the default for families)."""
    tries = []
    if device != "cpu":
        tries.append("this encoder on the CPU (device=cpu)")
    if spec.dtype == "float32":
        tries.append("dtype bf16/fp16 (half the bytes)")
    return tries


@dataclass(frozen=True)
class Family:
    """Everything fgvr needs to know about one model family; declared in the family's own module.

    name            the spec's `family` ("clip"); role: one of ROLES.
    title           how messages name it ("CLIP").
    load            spec -> loaded object with `torch_modules()` (an `fgvr.encoder.Encoder` for image encoders).
    estimate_bytes  spec -> bytes of parameters + buffers once loaded, known without loading any weights.
    build_meta      (config dict, torch dtype) -> the real network, built under the meta device by the caller
                    (`fgvr memory plan`); None where the family cannot be planned from a config.
    model_types     config.json `model_type` values that make a folder this family.
    marker_file     a file whose presence makes a folder this family (checked before config.json).
    known_configs   model names `fgvr memory plan` can size without a folder: name -> config dict.
    named_sources   names a user may type for packaged weights: name -> () -> (source, revision or None).
    local_folder    the spec's source is a model folder (made absolute; its revision is a content digest).
    spec_defaults   fills a new spec's unset fields, e.g. a VLM's pixel cap: (fields dict) -> fields dict.
    fit_hints       (spec, device) -> what to try when it does not fit the budget (the registry's error).
    """

    name: str
    role: str
    title: str
    load: Callable[["ModelSpec"], Any]
    estimate_bytes: Callable[["ModelSpec"], int]
    build_meta: Callable[[dict, "torch.dtype"], Any] | None = None
    model_types: tuple[str, ...] = ()
    marker_file: str | None = None
    known_configs: Mapping[str, dict] = field(default_factory=dict)
    named_sources: Mapping[str, Callable[[], tuple[str, str | None]]] = field(default_factory=dict)
    local_folder: bool = True
    spec_defaults: Callable[[dict], dict] | None = None
    fit_hints: Callable[["ModelSpec", str], list[str]] = encoder_fit_hints


@functools.cache
def all_families() -> tuple[Family, ...]:
    """Every family declared by a module of this package, in module-name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        declared = getattr(module, "FAMILIES", None) or ((module.FAMILY,) if hasattr(module, "FAMILY") else ())
        for fam in declared:
            if fam.role not in ROLES:
                raise ValueError(f"{module.__name__}: family {fam.name!r} has unknown role {fam.role!r}")
            found.append(fam)
    names = [f.name for f in found]
    if len(set(names)) != len(names):
        raise ValueError(f"a model family is declared twice: {names}")
    return tuple(found)


def names() -> tuple[str, ...]:
    return tuple(f.name for f in all_families())


def get(name: str) -> Family:
    """The family called `name`; KeyError naming the known ones otherwise."""
    for fam in all_families():
        if fam.name == name:
            return fam
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(names())}")


def _family(spec: "ModelSpec") -> Family:
    try:
        return get(spec.family)
    except KeyError:
        raise ValueError(f"no loader for model family {spec.family!r}; known: {', '.join(names())}") from None


def load(spec: "ModelSpec") -> Any:
    """Load the model `spec` names (weights from disk only), on `spec.device` in `spec.dtype`."""
    return _family(spec).load(spec)


def estimate_bytes(spec: "ModelSpec") -> int:
    """Bytes of parameters + buffers once loaded, computed without loading any weights."""
    return _family(spec).estimate_bytes(spec)


def fit_hints(spec: "ModelSpec", device: str) -> list[str]:
    """What to try when `spec` does not fit `device`'s budget."""
    return _family(spec).fit_hints(spec, device)


# --- transformers version differences, in one place ---------------------------------------------------
def _transformers_version() -> tuple[int, int, int]:
    import transformers

    parts = (transformers.__version__.split("+")[0].split(".") + ["0", "0"])[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def hf_dtype_kwargs(dtype: "torch.dtype") -> dict:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    return {"dtype" if _transformers_version() >= (4, 56, 0) else "torch_dtype": dtype}


def hf_tokenizer_kwargs() -> dict:
    """transformers 4.57.3+ warns that every local tokenizer folder saved by 4.57.3+ has Mistral's broken
    regex ("will lead to incorrect tokenization") whatever the model; the fix is Mistral-only, so say no."""
    return {"fix_mistral_regex": False} if (4, 57, 3) <= _transformers_version() < (5, 0, 0) else {}
