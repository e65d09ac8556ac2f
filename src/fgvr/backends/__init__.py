"""System 2 backends: the one seam through which fgvr uses a vision-language model.

Every use of a VLM goes through a `VlmBackend`: scoring lettered options (System 2, experience building)
and writing text (class descriptions in `build-kb`, reflections in `build-experience`). `get_backend` is the
one place that reads what the user typed after --vlm; everything below the command line receives the open
backend. Which module answers is decided by the modules themselves:

    --vlm models/qwen2.5-vl-7b          a local folder   -> transformers_vlm.py (in-process)
    --vlm http://127.0.0.1:8000/v1      a URL            -> openai_vlm.py (vLLM, SGLang, any OpenAI-compatible)

(`--reranker`, the CPU visual re-ranker, is a `SlowPath` of its own: it scores exemplars, not prompts.)

Adding a backend is one new file in this package (docs/ARCHITECTURE.md, "How to add a System 2 backend")
that defines

    NAME: str                                         # shown in summaries
    SERVED: bool                                      # its model runs elsewhere (a server)
    FALLBACK: bool = False                            # True: asked after all others (the in-process one)
    def claims(text: str) -> bool                     # is this --vlm value mine?
    def open_backend(text: str, options: BackendOptions) -> VlmBackend

Every backend sends the model the pixels the in-process processor would see: `fit_pixels` resizes an image
on the VLM family's grid under the pixel cap (`fgvr.models.family.VlmDeclaration`) before it leaves fgvr.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from fgvr.backends.base import (LETTERS, BackendError, BackendOptions, Generated, OptionScores, VlmBackend,
                                fit_pixels, user_turn, with_pixels)

__all__ = ["LETTERS", "BackendError", "BackendOptions", "Generated", "OptionScores", "VlmBackend", "fit_pixels",
           "user_turn", "with_pixels", "get_backend", "reopen", "claimant", "backend_names"]


def _modules() -> list[ModuleType]:
    """Every backend module in this package (any module defining `claims` and `open_backend`)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "claims") and hasattr(mod, "open_backend"):
            found.append(mod)
    # a module with FALLBACK = True (the in-process one: any folder or model name) is asked last
    return sorted(found, key=lambda m: (getattr(m, "FALLBACK", False), m.__name__))


def backend_names() -> list[str]:
    return [m.NAME for m in _modules()]


def claimant(text: str) -> ModuleType:
    """The backend module that claims the --vlm value `text`. Nothing is opened: `fgvr memory plan` reads
    its `SERVED` without reaching a server."""
    for mod in _modules():
        if mod.claims(text):
            return mod
    raise BackendError(
        f"--vlm {text!r}: not a System 2 fgvr knows. Give a local VLM folder (in-process) or the URL of an "
        f"OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (backends: {', '.join(backend_names())})"
    )


def get_backend(text: str | Path, options: BackendOptions | None = None) -> VlmBackend:
    """The open backend for what the user typed after --vlm: the one door from a name to a VLM.

    Fails here, naming `text`, when the backend cannot start (a folder that is no VLM, a server that does
    not answer), before any work is done."""
    if not isinstance(text, (str, Path)):
        raise TypeError(f"get_backend takes the --vlm text, not a {type(text).__name__}")
    text, options = str(text), options or BackendOptions()
    backend = claimant(text).open_backend(text, options)
    try:
        backend.opened_as = (text, options)  # type: ignore[attr-defined]
    except AttributeError:  # a backend with __slots__ keeps no record: `reopen` gives it back unchanged
        pass
    return backend


def reopen(backend: VlmBackend, **changes: Any) -> VlmBackend:
    """The same backend opened again with some options changed (a served one's `cache_dir` per run). An
    in-process backend, whose options change nothing a run keeps, is returned as it is."""
    opened = getattr(backend, "opened_as", None)
    if not getattr(backend, "served", False) or opened is None:
        return backend
    text, options = opened
    return get_backend(text, replace(options, **changes))
