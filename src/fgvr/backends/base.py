"""What every System 2 backend shares: the options it is opened with, its answers, the `VlmBackend` protocol
and the pixels it sends. Backend modules import this module, not the package, so finding them (the package
lists its modules) makes no import cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image

from fgvr.errors import ModelError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BackendError(ModelError, RuntimeError):
    """A backend cannot start (server down, no such model, folder missing); the message says what to do."""


@dataclass
class BackendOptions:
    """What a backend may need; each backend reads the fields that concern it and ignores the rest."""

    device: str = "cpu"
    dtype: str | None = None
    quantization: str | None = None
    max_pixels: int | None = None  # None: from max_visual_tokens on the family's grid, else its default cap
    min_pixels: int | None = None  # None: the family's
    max_visual_tokens: int | None = None  # the cap in the family's visual tokens (used when max_pixels is None)
    family: str | None = None  # the VLM family a served model's images are sized for (--vlm-family; None: the one
    # the served model's id names, else the default one); a local folder's must match its own
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
    `{"type": "image"}` entry, taken in order from that conversation's image list.

    `served`: the model runs elsewhere (a server), so its memory is not this process's (no GPU budget here,
    no GPU for a System 2 actor). `get_backend` records `opened_as` (the text and options it opened the
    backend from) so a run can open the same backend again with an answer cache of its own (`reopen`)."""

    name: str
    served: bool

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


def fit_pixels(image: Image.Image, max_pixels: int | None = None, min_pixels: int | None = None,
               family: str | None = None) -> Image.Image:
    """The image at the size VLM family `family`'s processor resizes it to under the cap (the default VLM
    family's when None: fgvr cannot know a served model's family). See `VlmDeclaration.fit_pixels`."""
    from fgvr.models import families

    return families.vlm_declaration(family).fit_pixels(image, max_pixels, min_pixels)


def with_pixels(options: BackendOptions, family: str | None = None) -> BackendOptions:
    """`options` with the pixel cap filled in from the VLM family's declaration: --max-visual-tokens on its
    grid, else its default cap; the smallest area likewise."""
    from dataclasses import replace

    from fgvr.models import families

    decl = families.vlm_declaration(family or options.family)
    max_px = options.max_pixels or (decl.pixels_for_tokens(options.max_visual_tokens) if options.max_visual_tokens
                                    else decl.default_max_pixels)
    min_px = decl.default_min_pixels if options.min_pixels is None else options.min_pixels
    return replace(options, max_pixels=max_px, min_pixels=min_px)


def user_turn(question: str, n_images: int = 1) -> dict:
    """One user message: the images first, then the text (the order Qwen2.5-VL's examples use)."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]}


