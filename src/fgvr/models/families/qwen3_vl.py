"""Qwen3-VL (2B/4B/8B/32B, dense) from a local folder: a System 2 reasoner next to Qwen2.5-VL.

What differs from Qwen2.5-VL, and why this module exists:
* The grid: 16-pixel patches merged 2x2, so one visual token is a 32x32-pixel cell (Qwen2.5-VL: 28).
* The pixel cap: transformers 4.57 resizes Qwen3-VL images with the same `smart_resize` as Qwen2-VL
  (Qwen2VLImageProcessor, factor patch_size * merge_size = 32), but the folders state the cap as
  `size={"shortest_edge": 65536, "longest_edge": 16777216}` (64 to 16,384 visual tokens), and the processor
  call takes the cap the same way, so `processor_kwargs` passes `size`. The default cap here is 1280 visual
  tokens (1280*32*32 pixels), as for Qwen2.5-VL; the smallest area stays the folders' 65,536 pixels.
* The chat template: Qwen3-VL's has no default system prompt (Qwen2.5-VL's adds "You are a helpful
  assistant."), so the same question tokenises differently.
* The architecture: Qwen3VLForConditionalGeneration, a SigLIP-style vision tower with learned position
  embeddings and DeepStack mergers (features of three vision layers added to the first decoder layers).
  `fgvr memory plan` sizes it exactly (the network on the meta device); its working memory is the
  Qwen2-VL-style estimate (`plan.merged_patch_workload`): that counts a gated vision MLP where Qwen3-VL's is
  plain (an over-count) and not the three DeepStack feature maps alive in the prefill (3 x tokens x LM width,
  31 MB for the 8B at 1280 tokens in bf16). A family `workload` of its own would have to import the plan,
  which imports the spec, which reads the families: a cycle the structure tests forbid.
* An image-only processor: the stock Qwen3VLProcessor builds a video processor that needs torchvision.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fgvr.encoder import torch_dtype
from fgvr.errors import SpecError
from fgvr.models import configs
from fgvr.models.families.qwen_vl import QwenVL, _chat_template, _fit_hints, load_weights
from fgvr.models.family import (Family, VlmDeclaration, config_without_dtype, grid_resize,
                                hf_tokenizer_kwargs)

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

PATCH = 32  # patch_size 16 x spatial_merge_size 2: one visual token per 32x32 pixels
DEFAULT_MAX_VISUAL_TOKENS = 1280
DEFAULT_MAX_PIXELS = DEFAULT_MAX_VISUAL_TOKENS * PATCH * PATCH
DEFAULT_MIN_PIXELS = 65536  # the folders' size["shortest_edge"] (64 visual tokens)

# The Qwen3-VL-*-Instruct chat template for text and image turns (the tool-call and video branches of the
# published template are left out: fgvr sends neither). No default system turn, unlike Qwen2.5-VL.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def _image_only_processor_class():
    """Built once, on first use, so that importing this module does not import transformers."""
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen3VLImageProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without its video part (which needs torchvision). Same call, same outputs for
        text + images; passing videos is an error."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ids = tokenizer.convert_tokens_to_ids
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.image_token_id, self.video_token_id = ids(self.image_token), ids(self.video_token)
            self.vision_start_token_id = ids(self.vision_start_token)
            self.vision_end_token_id = ids(self.vision_end_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError("this Qwen3-VL processor is image-only: pass images, not videos")
            return super().__call__(images=images, text=text, **kwargs)

    return Qwen3VLImageProcessor


def _check_folder(spec: ModelSpec) -> Path:
    path = Path(spec.source)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        names = ", ".join(f"{k} ({v})" for k, v in configs.HUB_IDS.items() if k.startswith("qwen3-vl"))
        raise SpecError(
            f"Qwen3-VL folder {spec.source} does not exist or has no config.json / weights. Nothing is "
            f"downloaded at run time: fetch one of {names}, e.g. `huggingface-cli download "
            f"Qwen/Qwen3-VL-8B-Instruct --local-dir models/qwen3-vl-8b`, and pass that folder."
        )
    return path


def processor_kwargs(max_pixels: int | None, min_pixels: int | None) -> dict:
    """The processor call's pixel cap as Qwen3-VL states it: `size` with both edges (the image processor
    takes max_pixels/min_pixels only when both are given and no `size` is)."""
    if not max_pixels:
        return {}
    return {"size": {"shortest_edge": DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
                     "longest_edge": max_pixels}}


def load_processor(spec: ModelSpec) -> Any:
    """Tokenizer + image processor from the folder, pixel cap from the spec (never the folder's)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    path = _check_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, **hf_tokenizer_kwargs())
    ip = Qwen2VLImageProcessor.from_pretrained(path)
    ip.min_pixels, ip.max_pixels = spec.min_pixels, spec.max_pixels
    ip.size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    chat = _chat_template(path, tokenizer) or QWEN3_VL_CHAT_TEMPLATE
    return _image_only_processor_class()(ip, tokenizer, chat_template=chat)


def load(spec: ModelSpec) -> QwenVL:
    """The model, its image-only processor and tokenizer (the same loaded record as Qwen2.5-VL's)."""
    from transformers import Qwen3VLForConditionalGeneration

    path = _check_folder(spec)
    t0 = time.perf_counter()
    model = load_weights(Qwen3VLForConditionalGeneration, path, spec)
    processor = load_processor(spec)
    return QwenVL(spec, model, processor, processor.tokenizer, load_seconds=time.perf_counter() - t0)


def _build_meta(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The real network for a plan config; the caller supplies the meta device."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**config), dtype=dtype)


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter + buffer bytes from the folder's config.json built on the meta device (no weights read), in
    the spec's dtype (not the one the config was saved in); int8/nf4 as `footprint.quantised_bytes` counts."""
    from fgvr.models.footprint import quantised_bytes

    path = _check_folder(spec)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path / 'config.json'}: not valid JSON ({exc}); re-download the model's config.json") from None
    with torch.device("meta"):
        model = _build_meta(config_without_dtype(config), torch_dtype(spec.dtype))
    return quantised_bytes(model, spec.quantization)


def _spec_defaults(fields: dict) -> dict:
    """The visual-token cap and smallest area (see the module docstring); bf16 on a GPU, fp32 on CPU."""
    fields = dict(fields)
    fields["max_pixels"] = fields["max_pixels"] or DEFAULT_MAX_PIXELS
    fields["min_pixels"] = fields["min_pixels"] or DEFAULT_MIN_PIXELS
    if fields["dtype"] is None and fields["device"].startswith("cuda"):
        fields["dtype"] = "bfloat16"
    return fields


def fitted_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_pixels: int = DEFAULT_MIN_PIXELS) -> tuple[int, int]:
    """(H, W) Qwen3-VL's processor resizes an image to: multiples of 32, area within [min, max] pixels
    (transformers 4.57's Qwen2VLImageProcessor `smart_resize` with factor 16 * 2)."""
    return grid_resize(height, width, PATCH, max_pixels, min_pixels)


def serve_flags(engine: str, max_pixels: int, min_pixels: int) -> tuple[list[str], dict[str, str]]:
    """The engine's pixel cap: vLLM's `--mm-processor-kwargs` with the processor's own `size` keyword (its
    profiler otherwise reserves the folders' 16,384 visual tokens per image), SGLang's
    `SGLANG_IMAGE_MAX_PIXELS`. fgvr resizes to the same cap before it sends. The SGLang variable bounds the
    pixels but not the grid: SGLang versions that pre-resize do it on Qwen2.5-VL's 28-pixel grid for every
    Qwen family, so the server may resample a Qwen3-VL image once more (README, "The models fgvr knows")."""
    if engine == "vllm":
        size = '{"size": {"shortest_edge": %d, "longest_edge": %d}}' % (min_pixels, max_pixels)
        return ["--mm-processor-kwargs", size], {}
    if engine == "sglang":
        return [], {"SGLANG_IMAGE_MAX_PIXELS": str(max_pixels)}
    return [], {}


VLM = VlmDeclaration(patch=PATCH, default_max_pixels=DEFAULT_MAX_PIXELS, default_min_pixels=DEFAULT_MIN_PIXELS,
                     fitted_size=fitted_size, serve_flags=serve_flags, processor_kwargs=processor_kwargs,
                     served_names=(r"qwen3[._-]?vl",))  # "Qwen/Qwen3-VL-8B-Instruct", "Qwen3-VL-30B-A3B-Thinking"

FAMILY = Family(
    name="qwen3_vl",
    role="vlm",
    title="Qwen3-VL",
    load=load,
    estimate_bytes=estimate_bytes,
    build_meta=_build_meta,
    model_types=("qwen3_vl",),
    known_configs=configs.QWEN3_VL,
    spec_defaults=_spec_defaults,
    fit_hints=_fit_hints,
    vlm=VLM,
)
