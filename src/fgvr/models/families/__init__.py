"""One loader per model family. The registry calls `load(spec)` and `estimate_bytes(spec)`; nothing else should.

Each family module has `load(spec) -> object with torch_modules()` and `estimate_bytes(spec) -> int`
(the bytes of parameters and buffers the loaded object will hold, known before loading). The family
modules are imported lazily, so importing fgvr does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

_MODULES = {
    "efficientnet": "fgvr.models.families.efficientnet",
    "clip": "fgvr.models.families.clip",
    "siglip": "fgvr.models.families.clip",
    "qwen2_5_vl": "fgvr.models.families.qwen_vl",
}


def _family(spec: "ModelSpec"):
    try:
        return importlib.import_module(_MODULES[spec.family])
    except KeyError:
        raise ValueError(f"no loader for model family {spec.family!r}; known: {', '.join(_MODULES)}") from None


def load(spec: "ModelSpec") -> Any:
    """Load the model `spec` names (weights from disk only), on `spec.device` in `spec.dtype`."""
    return _family(spec).load(spec)


def estimate_bytes(spec: "ModelSpec") -> int:
    """Bytes of parameters + buffers once loaded, computed without loading any weights."""
    return _family(spec).estimate_bytes(spec)
