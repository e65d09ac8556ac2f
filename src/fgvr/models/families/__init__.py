"""Model families: each module in this package describes one family (or two close ones) completely.

A family module declares `FAMILY = Family(...)` (or `FAMILIES = (...)`; `Family` is in `fgvr.models.family`): what it is called, how a folder
of it is recognised, how to load it, its size before loading, the network on the meta device for
`fgvr memory plan`, and what to try when it does not fit. The spec (`parse_spec`, `ModelSpec.create`),
the registry and the plan read these declarations and know no family by name, so adding a family is one
new file here (see docs/ARCHITECTURE.md, "How to add an encoder family" and "How to add a VLM family").
Code chooses a family by its role (`by_role("vlm")`, `vlm_declaration(...)`), never by its name.

Family modules are found and imported on first use, not when this package is imported, so importing
fgvr imports neither transformers nor any model code.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from fgvr.models.family import (ROLES, Family, VlmDeclaration, encoder_fit_hints, hf_dtype_kwargs,
                                hf_tokenizer_kwargs)

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

__all__ = ["Family", "VlmDeclaration", "ROLES", "all_families", "names", "get", "by_role", "vlm_declaration",
           "vlm_family", "default_vlm_family", "recognising_vlm_families",
           "architecture", "load", "estimate_bytes", "fit_hints", "encoder_fit_hints", "hf_dtype_kwargs",
           "hf_tokenizer_kwargs"]

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
            if (fam.role == "vlm") != (fam.vlm is not None):
                raise ValueError(f"{module.__name__}: family {fam.name!r}: a VLM declares `vlm=VlmDeclaration(...)`"
                                 " and only a VLM does")
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


def by_role(role: str) -> tuple[Family, ...]:
    """The families of one role ("vlm", "image-encoder", "text-embedder"), in module-name order."""
    return tuple(f for f in all_families() if f.role == role)


def vlm_family(name: str) -> Family:
    """The VLM family called `name` (what --vlm-family takes); ValueError naming the VLM families otherwise."""
    vlms = by_role("vlm")
    for fam in vlms:
        if fam.name == name:
            return fam
    other = next((f for f in all_families() if f.name == name), None)
    what = f" (the {other.title} family, role {other.role})" if other else ""
    raise ValueError(f"{name!r}{what} is not a VLM family; the VLM families are: {', '.join(f.name for f in vlms)}")


def default_vlm_family() -> Family:
    """The VLM family marked `default` (the grid a served VLM's images follow when fgvr cannot know its
    family), or the only one there is."""
    vlms = by_role("vlm")
    chosen = [f for f in vlms if f.vlm is not None and f.vlm.default] or list(vlms[:1] if len(vlms) == 1 else ())
    if len(chosen) != 1:
        raise ValueError(f"no single default VLM family among {', '.join(f.name for f in vlms) or 'none'}")
    return chosen[0]


def vlm_declaration(name: str | None = None) -> VlmDeclaration:
    """How VLM family `name` sees an image; with no name, the default VLM family's (`default_vlm_family`)."""
    if name is not None:
        fam = get(name)
        if fam.vlm is None:
            raise ValueError(f"{fam.title} is a {fam.role} model, not a VLM")
        return fam.vlm
    return default_vlm_family().vlm  # type: ignore[return-value]


def recognising_vlm_families(model_id: str) -> tuple[Family, ...]:
    """The VLM families whose declaration recognises a served model's id (as a server lists it, or the
    folder it serves), read in its last path part only ("Model-8B-Instruct" of "Org/Model-8B-Instruct" or
    "/data/other-model-runs/Model-8B-Instruct/": the folders above say nothing about the model): one of the
    family's `served_names` patterns is in it, or it is one of its `known_configs` names or `model_types`.
    No family is named here: each declares its own."""
    last = model_id.strip().rstrip("/").rsplit("/", 1)[-1]
    return tuple(f for f in by_role("vlm") if f.vlm is not None and
                 (f.vlm.recognises(last) or last.lower() in f.known_configs or last.lower() in f.model_types))


def architecture(name: str) -> tuple[str, dict] | None:
    """(family, config) for a model name some family declares in its `known_configs`, or None."""
    low = name.strip().lower()
    for fam in all_families():
        if low in fam.known_configs:
            return fam.name, fam.known_configs[low]
    return None


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


