"""CLIP and SigLIP dual encoders through transformers, from a local folder saved with save_pretrained.

Image embeddings are the towers' projected features (CLIP) or pooled features (SigLIP), L2-normalised,
float32 on the CPU. Text embeddings live in the same space, which is what text prototypes need.

Long texts: CLIP's text tower reads 77 positions, SigLIP's 64. A VLM-written class description is often
longer, and the stock tokenizer call truncates it silently, so the tail of the description (often the
discriminative part) would be lost. We split the token sequence into chunks that fit, wrap each chunk in
the tokenizer's own special tokens, embed every chunk, and average the normalised chunk embeddings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from fgvr.encoder import Encoder, l2_normalise, torch_dtype
from fgvr.models import configs
from fgvr.models.family import Family, hf_dtype_kwargs, hf_tokenizer_kwargs
from fgvr.errors import SpecError

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec


def _model_class(family: str):
    from transformers import CLIPModel, SiglipModel

    return {"clip": CLIPModel, "siglip": SiglipModel}[family]


def _check_folder(spec: ModelSpec) -> Path:
    path = Path(spec.source)
    # The OpenAI CLIP repos carry both model.safetensors and pytorch_model.bin; either loads.
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return path
    from fgvr.models.configs import HUB_IDS

    names = ", ".join(f"{k} ({v})" for k, v in HUB_IDS.items() if k.startswith(("clip", "siglip")))
    raise SpecError(
        f"{spec.family} folder {path} does not exist or has no config.json and weights. Nothing is "
        f"downloaded at run time: fetch one of {names}, e.g. `huggingface-cli download "
        f"openai/clip-vit-base-patch32 --local-dir models/clip-vit-b32`, and pass that folder."
    )


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter + buffer bytes from config.json on the meta device: counts the non-persistent buffers
    (position ids) the safetensors header does not hold, in the dtype the spec loads."""
    from transformers import AutoConfig

    from fgvr.models.footprint import module_bytes

    config = AutoConfig.from_pretrained(_check_folder(spec))
    cls = _model_class(spec.family)
    with torch.device("meta"):
        model = cls._from_config(config, **hf_dtype_kwargs(torch_dtype(spec.dtype)))
    # Under ONNX Runtime the session holds a second, float32 copy of the image tower (and its projection).
    graph = module_bytes(*_image_tower(model)) if spec.runtime == "onnx" else 0
    return module_bytes(model) + graph


def _special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (CLIP: <sot> / <eot>; SigLIP: - / </s>).

    Found by encoding a probe with and without special tokens, so it works for any tokenizer class
    without knowing how its post-processor is configured.
    """
    plain = tokenizer("a photo", add_special_tokens=False)["input_ids"]
    full = tokenizer("a photo")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain) :]
    raise ValueError("cannot locate the text inside the tokenizer's special tokens")


class CLIPEncoder(Encoder):
    """A CLIP or SigLIP model with its tokenizer and image processor."""

    has_text = True

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, image_processor: Any) -> None:
        self.spec, self.model, self.tokenizer, self.image_processor = spec, model, tokenizer, image_processor
        self.device, self.dtype = torch.device(spec.device), torch_dtype(spec.dtype)
        cfg = model.config
        self.embed_dim = getattr(cfg, "projection_dim", None) or cfg.vision_config.hidden_size
        ip = image_processor
        crop = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
        self.image_size = int(crop.get("height") or crop.get("shortest_edge"))
        if spec.image_size and spec.image_size != self.image_size:
            raise SpecError(
                f"{spec.name} takes {self.image_size}px images (its position embeddings fix that); "
                f"drop image_size={spec.image_size} from the spec"
            )
        limit = cfg.text_config.max_position_embeddings
        if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
            limit = min(limit, tokenizer.model_max_length)
        self.text_limit = limit  # tokens per chunk, special tokens included
        self.prefix, self.suffix = _special_tokens_around(tokenizer)
        # SigLIP was trained on texts padded to the full 64 tokens without an attention mask; CLIP pools
        # at the end-of-text token under a causal mask, so padding to the batch's longest is exact.
        self.pad_to_limit = spec.family == "siglip"

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _weights(self) -> torch.Tensor:
        return next(self.model.parameters())  # follow the weights if the registry moved them

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"].float()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) -> (N,D) projected image features, by ONNX Runtime or torch (spec.runtime)."""
        if self.graph is not None:
            return l2_normalise(self.graph.run(pixels)).cpu()
        p = self._weights()
        with torch.inference_mode():
            feats = self.model.get_image_features(pixel_values=pixels.to(device=p.device, dtype=p.dtype))
        return l2_normalise(feats).cpu()

    def chunk_ids(self, text: str) -> list[list[int]]:
        """Token ids of `text` cut into tower-sized chunks, each wrapped in the special tokens.

        Cuts fall after a sentence end where one lies in the back half of a chunk, else before a word,
        so a chunk is a readable piece of the description rather than half a word.
        """
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=fast)
        ids = enc["input_ids"]
        # how good a cut just before token i is: 2 after a sentence end, 1 between words, 0 inside a word
        quality = [0] * len(ids)
        for i, (start, _) in enumerate(enc["offset_mapping"] if fast else []):
            before = text[:start]
            if before[-1:].isspace() or text[start : start + 1].isspace():  # byte-level BPE keeps the space
                quality[i] = 2 if before.rstrip().endswith((".", ";", "!", "?")) else 1
        body = self.text_limit - len(self.prefix) - len(self.suffix)
        pieces, i = [], 0
        while i < len(ids):
            end = min(i + body, len(ids))
            if end < len(ids):
                for q in (2, 1):
                    cut = next((j for j in range(end, i + body // 2, -1) if quality[j] >= q), None)
                    if cut is not None:
                        end = cut
                        break
            pieces.append(ids[i:end])
            i = end
        return [self.prefix + piece + self.suffix for piece in (pieces or [[]])]

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N,D) float32 CPU, L2-normalised; a text longer than the tower's limit is the normalised mean
        of its chunks' embeddings (never truncated)."""
        chunks, owner = [], []
        for i, t in enumerate(texts):
            for c in self.chunk_ids(t):
                chunks.append(c)
                owner.append(i)
        if not chunks:
            return torch.zeros(0, self.embed_dim)
        p = self._weights()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        embs = []
        with torch.inference_mode():
            for s in range(0, len(chunks), batch_size):
                batch = chunks[s : s + batch_size]
                width = self.text_limit if self.pad_to_limit else max(len(c) for c in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, c in enumerate(batch):
                    ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
                    mask[r, : len(c)] = 1
                kwargs = {"input_ids": ids.to(p.device)}
                if not self.pad_to_limit:
                    kwargs["attention_mask"] = mask.to(p.device)
                embs.append(l2_normalise(self.model.get_text_features(**kwargs)).cpu())
        per_chunk = torch.cat(embs)
        owner_t = torch.tensor(owner)
        summed = torch.zeros(len(texts), per_chunk.shape[1]).index_add_(0, owner_t, per_chunk)
        return l2_normalise(summed)


def load(spec: ModelSpec) -> CLIPEncoder:
    from transformers import AutoImageProcessor, AutoTokenizer

    if spec.quantization:
        raise SpecError(f"{spec.family} encoders are small; load them in fp16/bf16, not {spec.quantization}")
    path = _check_folder(spec)
    t0 = time.perf_counter()
    model = _model_class(spec.family).from_pretrained(path, **hf_dtype_kwargs(torch_dtype(spec.dtype)))
    model = model.to(spec.device).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hf_tokenizer_kwargs())
    except (ImportError, ValueError) as e:  # SigLIP's sentencepiece tokenizer without sentencepiece
        raise SpecError(f"cannot load the tokenizer in {path}: {e} (SigLIP needs `pip install sentencepiece`)") from e
    # The slow processors need only PIL and numpy; the fast ones need torchvision.
    image_processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    enc = CLIPEncoder(spec, model, tokenizer, image_processor)
    if spec.runtime == "onnx":
        enc.graph = _onnx_graph(enc, path)
    enc.load_seconds = time.perf_counter() - t0
    return enc


def _image_tower(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `get_image_features` runs: the vision transformer and, for CLIP, its projection."""
    return [m for m in (model.vision_model, getattr(model, "visual_projection", None)) if m is not None]


class _ImageFeatures(torch.nn.Module):
    """What the ONNX graph computes: preprocessed pixels -> the projected (not yet normalised) features."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels)


def _onnx_graph(enc: CLIPEncoder, folder: Path):
    """The cached ONNX export of this folder's image tower (made on first use), opened in ORT. The graph's
    name covers the spec's revision (config text, weight files' names and sizes) and the weights' mtimes,
    so a checkpoint dropped in with the same file size is exported afresh."""
    from fgvr.models import onnx_runtime

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))

    def make():
        return _ImageFeatures(enc.model).eval(), torch.zeros(1, 3, enc.image_size, enc.image_size)

    extra = [enc.spec.revision] + [f.stat().st_mtime_ns for f in files]
    name = onnx_runtime.graph_name(f"{enc.spec.family}-{enc.image_size}px", files[0], extra=extra)
    path = onnx_runtime.cached_graph(onnx_runtime.cache_root(files[0]) / name, make)
    return onnx_runtime.open_graph(path)


def _build_meta(family: str):
    def build(config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """The real network for a plan config; the caller supplies the meta device."""
        from transformers import CLIPConfig, SiglipConfig

        config_class = {"clip": CLIPConfig, "siglip": SiglipConfig}[family]
        return _model_class(family)._from_config(config_class(**config), dtype=dtype)

    return build


FAMILIES = (
    Family(name="clip", role="image-encoder", title="CLIP", load=load, estimate_bytes=estimate_bytes,
           build_meta=_build_meta("clip"), model_types=("clip",), known_configs=configs.CLIP, text_tower=True,
           onnx_export=True),
    Family(name="siglip", role="image-encoder", title="SigLIP", load=load, estimate_bytes=estimate_bytes,
           build_meta=_build_meta("siglip"), model_types=("siglip",), known_configs=configs.SIGLIP,
           text_tower=True, onnx_export=True),
)
