"""System 2 backends: the one seam through which fgvr uses a vision-language model.

Every use of a VLM goes through a `VlmBackend`: scoring lettered options (System 2, experience building)
and writing text (class descriptions in `build-kb`, reflections in `build-experience`). Which backend is
chosen by one spec string, read by the backend modules themselves:

    --vlm models/qwen2.5-vl-7b          a local folder   -> transformers_vlm.py (in-process, as before)
    --vlm http://127.0.0.1:8000/v1      a URL            -> openai_vlm.py (vLLM, SGLang, any OpenAI-compatible)

(`--reranker`, the CPU visual re-ranker, is a `SlowPath` of its own: it scores exemplars, not prompts.)

Adding a backend is one new file in this package that defines

    NAME: str                                         # shown in summaries
    FALLBACK: bool = False                            # True: asked after all others (the in-process one)
    def claims(spec: str) -> bool                     # is this spec mine?
    def open_backend(spec, options: BackendOptions) -> VlmBackend

`open_backend` below finds the module that claims a spec; nothing else in fgvr branches on the kind.

Both backends send the model the same pixels: `fit_pixels` resizes an image to Qwen2.5-VL's grid under the
pixel cap before it leaves fgvr (PNG, lossless, for a server), so the processor on the other side has
nothing left to resize and a served model sees exactly what the in-process one would.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image

from fgvr.errors import ModelError
from fgvr.models.spec import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, QWEN_PATCH

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BackendError(ModelError, RuntimeError):
    """A backend cannot start (server down, no such model, folder missing); the message says what to do."""


@dataclass
class BackendOptions:
    """What a backend may need; each backend reads the fields that concern it and ignores the rest."""

    device: str = "cpu"
    dtype: str | None = None
    quantization: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: int = DEFAULT_MIN_PIXELS
    batch_size: int | None = None  # in-process prompts per forward; None: sized from the GPU budget
    model: str | None = None  # served model name; None: the only one the server lists
    concurrency: int = 8  # requests in flight at once (served)
    timeout_s: float = 120.0  # per try of one answer: connect, headers and body together (served)
    retries: int = 4  # after the first try, on 429 / 5xx / time-out / connection error (served)
    backoff_s: float = 0.5  # first retry waits this long, doubling each time (served)
    api_key_env: str = "FGVR_VLM_API_KEY"  # the environment variable holding the API key (never stored)
    cache_dir: Path | None = None  # answers kept here so a killed run does not ask again (served)
    max_top_logprobs: int = 20  # vLLM's default --max-logprobs
    max_reply_bytes: int = 8 * 2**20  # a served answer longer than this is refused unread (served)
    openai_key: bool = False  # also send $OPENAI_API_KEY, only to an https URL (served)


@dataclass
class OptionScores:
    """A backend's answer to one lettered question: a distribution over the options (same order), what it
    cost, and, when this row failed on its own (the others may have succeeded), why."""

    probs: list[float] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None


@dataclass
class Generated:
    """Text a backend wrote for one conversation, and its token counts."""

    text: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None


class VlmBackend(Protocol):
    """What fgvr needs from a VLM. Conversations use the processor's message format:
    `{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}`, one image per
    `{"type": "image"}` entry, taken in order from that conversation's image list."""

    name: str

    def score_options(self, questions: Sequence[str], images: Sequence[Image.Image],
                      n_options: Sequence[int]) -> list[OptionScores]:
        """For each (question, image): the probability of each of the first n option letters as the first
        token of the answer, renormalised over the options."""
        ...

    def generate(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
                 max_new_tokens: int) -> list[Generated]:
        """Greedy text for each conversation (the assistant's next turn)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What answered, for summaries and results (never a secret)."""
        ...


# --- the pixels every backend sends ----------------------------------------------------------------------


def fitted_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_pixels: int = DEFAULT_MIN_PIXELS) -> tuple[int, int]:
    """(H, W) Qwen2.5-VL's processor resizes an image to: multiples of 28, area within [min, max] pixels
    (the `smart_resize` of transformers' Qwen2VLImageProcessor, same rounding)."""
    f = QWEN_PATCH
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = max(f, round(height / f) * f)
    w = max(f, round(width / f) * f)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / f) * f
        w = math.ceil(width * beta / f) * f
    return h, w


def fit_pixels(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_pixels: int = DEFAULT_MIN_PIXELS) -> Image.Image:
    """The RGB image at the size the processor would resize it to, resized the way it would (PIL bicubic).
    Resizing again to the same size is a no-op in PIL, so a processor given this image leaves it as is."""
    image = image.convert("RGB")
    h, w = fitted_size(image.height, image.width, max_pixels, min_pixels)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


def user_turn(question: str, n_images: int = 1) -> dict:
    """One user message: the images first, then the text (the order Qwen2.5-VL's examples use)."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]}


# --- the registry: a spec string -> the module that claims it ------------------------------------------


def _modules() -> list[Any]:
    """Every backend module in this package (any module defining `claims` and `open_backend`)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "claims") and hasattr(mod, "open_backend"):
            found.append(mod)
    # a module with FALLBACK = True (the in-process one: any folder or model name) is asked last
    return sorted(found, key=lambda m: (getattr(m, "FALLBACK", False), m.__name__))


def backend_names() -> list[str]:
    return [m.NAME for m in _modules()]


def open_backend(spec: Any, options: BackendOptions | None = None) -> VlmBackend:
    """The backend for `spec` (a URL, a local folder, or a ModelSpec for the in-process path)."""
    options = options or BackendOptions()
    for mod in _modules():
        if mod.claims(spec):
            return mod.open_backend(spec, options)
    raise BackendError(
        f"--vlm {spec!r}: not a System 2 fgvr knows. Give a local Qwen2.5-VL folder (in-process) or the "
        f"URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (backends: {', '.join(backend_names())})"
    )


def is_served(spec: Any) -> bool:
    """Whether a --vlm value names a server (its memory is the server's, not this process's)."""
    return isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://"))
