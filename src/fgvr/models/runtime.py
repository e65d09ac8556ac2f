"""Which runtime runs an encoder's network: the `runtime` field of a `ModelSpec` and how it is chosen.

"torch" everywhere; "onnx" (ONNX Runtime, `fgvr.models.onnx_runtime`) for the families that declare
`onnx_export` (their image tower exports cleanly), on the CPU in float32, where it is several times faster
than torch eager with the same features (within 1e-5). "auto" picks onnx where it can run, torch elsewhere (CUDA, half precision). The
knowledge base's encoder check ignores the runtime: features of either are interchangeable.
"""

from __future__ import annotations

import os

from fgvr.errors import ModelError

RUNTIMES = ("auto", "torch", "onnx")
ENV = "FGVR_RUNTIME"  # the process-wide preference (`fgvr --runtime ...` sets it)


class RuntimeChoiceError(ModelError, ValueError):
    """A runtime that does not exist, or ONNX asked for where it cannot run; the message says what to use."""


def _exports(family: str) -> bool:
    """The family declares `onnx_export` (an unknown family is the spec's error to raise, not ours)."""
    from fgvr.models import families

    try:
        return families.get(family).onnx_export
    except KeyError:
        return False


def resolve_runtime(requested: str | None, device: str, dtype: str, family: str) -> str:
    """'auto' (or unset: `FGVR_RUNTIME`, else auto) -> 'onnx' on CPU in float32 for a family that exports,
    'torch' otherwise. An explicit 'onnx' where it cannot run is a SpecError saying what to use."""
    strict = bool(requested)  # FGVR_RUNTIME=onnx (a process-wide preference) falls back where it cannot run
    raw = requested or os.environ.get(ENV, "") or "auto"
    r = raw.strip().lower()
    r = {"onnxruntime": "onnx", "ort": "onnx"}.get(r, r)
    if r not in RUNTIMES:
        raise RuntimeChoiceError(f"unknown runtime {raw!r}: use auto, torch or onnx")
    exports = _exports(family)
    can = exports and device == "cpu" and dtype == "float32"
    if r == "auto" or (r == "onnx" and not strict):
        return "onnx" if can else "torch"
    if r == "onnx" and not can:
        why = (f"the {family} family has no ONNX path" if not exports
               else f"ONNX Runtime runs float32 on the CPU here, not {dtype} on {device}")
        raise RuntimeChoiceError(f"--runtime onnx: {why}; use --runtime torch or auto")
    return r
