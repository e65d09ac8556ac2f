"""One loader per model family. The registry calls `load(spec)` and `estimate_bytes(spec)`; nothing else should.

Each family module has `load(spec) -> object with torch_modules()` and `estimate_bytes(spec) -> int`
(the bytes of parameters and buffers the loaded object will hold, known before loading). The family
modules are imported lazily, so importing fgvr does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fgvr.models.spec import ModelSpec

_MODULES = {
    "efficientnet": "fgvr.models.families.efficientnet",
    "clip": "fgvr.models.families.clip",
    "siglip": "fgvr.models.families.clip",
    "qwen2_5_vl": "fgvr.models.families.qwen_vl",
    "sentence": "fgvr.models.families.sentence",
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
