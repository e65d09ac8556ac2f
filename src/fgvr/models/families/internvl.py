"""InternVL3 (1B/2B/8B/38B, the transformers-format "OpenGVLab/InternVL3-*-hf" folders) as the System 2 reasoner.

How InternVL sees an image, and why this family declares it differently from Qwen2.5-VL:
* InternViT looks at 448x448 tiles; a pixel-shuffle MLP projector turns each tile's 32x32 patches into
  256 visual tokens (16x16, so one token covers 28x28 pixels of a tile).
* Dynamic tiling: the processor picks the grid of `cols x rows` tiles (between min and max tiles) whose
  aspect ratio is closest to the image's, resizes the image onto that grid, and when there is more than
  one tile adds a 448x448 thumbnail of the whole image. Visual tokens = (cols*rows + thumbnail) * 256.
* The pixel cap is a tile cap: a spec's `max_pixels` is `max_tiles * 448 * 448` and the processor gets
  `max_patches` / `min_patches`. The default is 4 tiles + the thumbnail = 1,280 visual tokens, the same
  budget as the Qwen2.5-VL default (the folders ship max_patches=12: 3,328 tokens per photo).
* Images are sent as they are, not resized first: the grid choice depends on the original size and the
  thumbnail is taken from the original, so a served InternVL given the same image and tile cap tiles it
  the same way.
* An image-only processor around the slow `GotOcr2ImageProcessor`: the stock InternVLProcessor builds a
  video processor and the fast image processor, both of which need torchvision.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fgvr.encoder import torch_dtype
from fgvr.errors import SpecError
from fgvr.models import configs
from fgvr.models.family import Family, VlmDeclaration, hf_tokenizer_kwargs

if TYPE_CHECKING:
    from PIL import Image

    from fgvr.models.spec import ModelSpec

TILE = 448
TOKENS_PER_TILE = 256
PATCH = TILE // int(math.isqrt(TOKENS_PER_TILE))  # 28: pixels per side of one visual token within a tile
TILE_PIXELS = TILE * TILE
DEFAULT_MAX_TILES = 4
DEFAULT_MIN_TILES = 1
DEFAULT_MAX_PIXELS = DEFAULT_MAX_TILES * TILE_PIXELS
DEFAULT_MIN_PIXELS = DEFAULT_MIN_TILES * TILE_PIXELS

# The chat template of the InternVL3-*-hf folders (transformers' convert_internvl_weights_to_hf.py): one
# <IMG_CONTEXT> per image, which the processor expands to <img> + 256 x tiles <IMG_CONTEXT> + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# The image tokens the InternVL3 tokenizer adds after Qwen2.5's 151,665 (ids 151665-151673; <IMG_CONTEXT>
# is config.image_token_id 151667), and the processor's names for the three it uses.
SPECIAL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
EXTRA_SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>"}


# --- the tile grid ----------------------------------------------------------------------------------
def tiles_for_pixels(pixels: int | None, default: int) -> int:
    """The tile count a pixel cap allows (at least one tile)."""
    return max(1, int(pixels) // TILE_PIXELS) if pixels else default


def tile_grid(height: int, width: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """(cols, rows) the processor tiles a `height` x `width` image into: the grid with the closest aspect
    ratio; on a tie the one with more tiles while the image covers more than half of it (transformers'
    `get_optimal_tiled_canvas`, same order and tie rule). One tile when the cap is one tile."""
    if max_tiles <= 1:
        return 1, 1
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * TILE_PIXELS * c * r:
            best = (c, r)
    return best


def fitted_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_pixels: int = DEFAULT_MIN_PIXELS) -> tuple[int, int]:
    """(H, W) of the tile canvas the processor resizes the image onto (before it cuts the tiles)."""
    cols, rows = tile_grid(height, width, tiles_for_pixels(max_pixels, DEFAULT_MAX_TILES),
                           tiles_for_pixels(min_pixels, DEFAULT_MIN_TILES))
    return rows * TILE, cols * TILE


def tiles_of(height: int, width: int, max_pixels: int, min_pixels: int | None = None) -> int:
    """Tiles the processor makes of one image: the grid, plus the thumbnail when the grid has more than one."""
    cols, rows = tile_grid(height, width, tiles_for_pixels(max_pixels, DEFAULT_MAX_TILES),
                           tiles_for_pixels(min_pixels, DEFAULT_MIN_TILES))
    return cols * rows + (1 if cols * rows > 1 else 0)


@dataclass(frozen=True)
class TiledVlmDeclaration(VlmDeclaration):
    """A `VlmDeclaration` for a VLM that tiles an image rather than resizing it onto a patch grid: the cap
    is whole tiles (`max_pixels` = tiles x tile area), a multi-tile image costs a thumbnail tile more,
    and the image is sent as it is (the tiling is decided on the original)."""

    tile: int = TILE
    tokens_per_tile: int = TOKENS_PER_TILE

    def _tiles(self, max_pixels: int) -> int:
        return max(1, max_pixels // (self.tile * self.tile))

    def pixels_for_tokens(self, tokens: int) -> int:
        """The largest tile cap whose worst case (tiles + thumbnail) stays within `tokens`."""
        tiles = max(1, tokens // self.tokens_per_tile)
        if tiles > 1:
            tiles = max(1, tiles - 1)  # room for the thumbnail
        return tiles * self.tile * self.tile

    def tokens_at_cap(self, max_pixels: int) -> int:
        tiles = self._tiles(max_pixels)
        return (tiles + (1 if tiles > 1 else 0)) * self.tokens_per_tile

    def visual_tokens(self, height: int, width: int, max_pixels: int, min_pixels: int | None = None) -> int:
        if max(height, width) / max(1, min(height, width)) > 200:
            raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
        return tiles_of(height, width, max_pixels,
                        self.default_min_pixels if min_pixels is None else min_pixels) * self.tokens_per_tile

    def fit_pixels(self, image: "Image.Image", max_pixels: int | None = None,
                   min_pixels: int | None = None) -> "Image.Image":
        """The RGB image unchanged: the processor picks the grid from the original size and takes the
        thumbnail from the original, so resizing first would change what the model sees."""
        return image.convert("RGB")


def processor_kwargs(max_pixels: int | None, min_pixels: int | None) -> dict:
    """The InternVL processor's tile cap: `max_patches` / `min_patches` (its images_kwargs), and tiling on
    (the bare GotOcr2 image processor's default is off; InternVLProcessor turns it on)."""
    return {"crop_to_patches": True, "max_patches": tiles_for_pixels(max_pixels, DEFAULT_MAX_TILES),
            "min_patches": tiles_for_pixels(min_pixels, DEFAULT_MIN_TILES)}


def serve_flags(engine: str, max_pixels: int, min_pixels: int) -> tuple[list[str], dict[str, str]]:
    """vLLM's InternVL processor takes the tile cap as `max_dynamic_patch` / `min_dynamic_patch` in
    `--mm-processor-kwargs` (without it, the config's 12 tiles + thumbnail per image are profiled).
    SGLang reads the cap from the model folder (no flag): the folder's own max_patches applies there."""
    if engine == "vllm":
        kw = {"max_dynamic_patch": tiles_for_pixels(max_pixels, DEFAULT_MAX_TILES),
              "min_dynamic_patch": tiles_for_pixels(min_pixels, DEFAULT_MIN_TILES)}
        return ["--mm-processor-kwargs", json.dumps(kw)], {}
    return [], {}


# --- loading ----------------------------------------------------------------------------------------
@functools.cache
def _image_only_processor_class():
    """Built on first use, so that importing this module does not import transformers."""
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class InternVLImageProcessor(InternVLProcessor):
        """InternVLProcessor without its video part (which needs torchvision). Same call, same outputs for
        text + images; passing videos is an error."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=256, **kw):
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = "<img>", "</img>"
            self.image_token = "<IMG_CONTEXT>"
            self.video_token = "<video>"
            ids = tokenizer.convert_tokens_to_ids([self.start_image_token, self.end_image_token, self.image_token])
            self.start_image_token_id, self.end_image_token_id, self.image_token_id = ids
            self.image_ids = [self.image_token_id, self.start_image_token_id, self.end_image_token_id]
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, audio=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError("this InternVL processor is image-only: pass images, not videos")
            return super().__call__(images=images, text=text, **kwargs)

    return InternVLImageProcessor


def image_only_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None,
                         image_seq_length: int = TOKENS_PER_TILE) -> Any:
    """An InternVL processor for text + images that works without torchvision."""
    return _image_only_processor_class()(image_processor, tokenizer, chat_template=chat_template,
                                         image_seq_length=image_seq_length)


@dataclass
class InternVL:
    """A loaded InternVL3: the model, its (image-only) processor and tokenizer, and the spec."""

    spec: "ModelSpec"
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
        """Visual tokens one HxW image costs under the spec's tile cap (the processor's own count)."""
        kw = processor_kwargs(self.spec.max_pixels, self.spec.min_pixels)
        patches = self.processor.image_processor.get_number_of_image_patches(height, width, kw)
        return patches * self.processor.image_seq_length


def _check_folder(spec: "ModelSpec") -> Path:
    path = Path(spec.source)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        names = ", ".join(f"{k} ({v})" for k, v in configs.HUB_IDS.items() if k.startswith("internvl"))
        raise SpecError(
            f"InternVL folder {spec.source} does not exist or has no config.json / weights. Nothing is "
            f"downloaded at run time: fetch one of {names}, e.g. `huggingface-cli download "
            f"OpenGVLab/InternVL3-8B-hf --local-dir models/internvl3-8b`, and pass that folder."
        )
    return path


def _chat_template(path: Path, tokenizer: Any) -> str:
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if f.is_file():
            text = f.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None) or INTERNVL_CHAT_TEMPLATE


def load_processor(spec: "ModelSpec") -> Any:
    """Tokenizer + slow GotOcr2 image processor from the folder; the tile cap comes from the spec at
    every call (`processor_kwargs`), never from the folder's max_patches."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessor

    path = _check_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, **hf_tokenizer_kwargs())
    ip = GotOcr2ImageProcessor.from_pretrained(path)
    ip.max_patches = tiles_for_pixels(spec.max_pixels, DEFAULT_MAX_TILES)
    ip.min_patches = tiles_for_pixels(spec.min_pixels, DEFAULT_MIN_TILES)
    seq = json.loads((path / "config.json").read_text()).get("image_seq_length", TOKENS_PER_TILE)
    return image_only_processor(ip, tokenizer, chat_template=_chat_template(path, tokenizer), image_seq_length=seq)


def load(spec: "ModelSpec") -> InternVL:
    from transformers import InternVLForConditionalGeneration

    from fgvr.models.families.qwen_vl import load_weights  # one loading path (and one bitsandbytes set-up)

    path = _check_folder(spec)
    t0 = time.perf_counter()
    model = load_weights(InternVLForConditionalGeneration, path, spec)
    processor = load_processor(spec)
    return InternVL(spec, model, processor, processor.tokenizer, load_seconds=time.perf_counter() - t0)


def _build_meta(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The real network for a plan config; the caller supplies the meta device."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    return InternVLForConditionalGeneration._from_config(InternVLConfig(**json.loads(json.dumps(config))),
                                                         dtype=dtype)


def estimate_bytes(spec: "ModelSpec") -> int:
    """Parameter + buffer bytes from the folder's config.json built on the meta device (no weights read)."""
    from fgvr.models.footprint import quantised_bytes

    cfg = json.loads((_check_folder(spec) / "config.json").read_text())
    with torch.device("meta"):
        model = _build_meta(cfg, torch_dtype(spec.dtype))
    return quantised_bytes(model, spec.quantization)


def _spec_defaults(fields: dict) -> dict:
    """The tile cap (see the module docstring), and bf16 on a GPU (fp32 doubles the weights for nothing)."""
    fields = dict(fields)
    fields["max_pixels"] = fields["max_pixels"] or DEFAULT_MAX_PIXELS
    fields["min_pixels"] = fields["min_pixels"] or DEFAULT_MIN_PIXELS
    if fields["dtype"] is None and fields["device"].startswith("cuda"):
        fields["dtype"] = "bfloat16"
    return fields


def _fit_hints(spec: "ModelSpec", device: str) -> list[str]:
    """What to try when the VLM does not fit: quantise, fewer tiles, move the encoder off the GPU."""
    tries = []
    if spec.quantization != "nf4":
        q = "int8" if not spec.quantization else "nf4"
        tries.append(f"quantization={q} (needs CUDA and bitsandbytes; see `fgvr memory plan --quant {q}`)")
    tiles = tiles_for_pixels(spec.max_pixels, DEFAULT_MAX_TILES)
    if tiles > 1:
        fewer = VLM.tokens_at_cap((tiles - 1) * TILE_PIXELS)
        tries.append(f"fewer tiles per image (now {tiles} of {TILE}x{TILE}; --max-visual-tokens {fewer} "
                     f"gives {tiles - 1}) to cut the working memory")
    tries.append("the image encoder off the GPU (device=cpu) while the VLM runs")
    return tries


# --- working memory -----------------------------------------------------------------------------------
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # the plan passes the dtype normalised


def workload(config: dict, dtype: str, max_pixels: int, image_size: tuple[int, int], text_tokens: int,
             new_tokens: int, batch: int, vlm: VlmDeclaration) -> dict:
    """Working memory of one generation for InternVL, term by term.

    Vision: InternViT runs every tile (the cap's tiles + thumbnail) as its own sequence of 1 + (448/14)^2
    = 1,025 tokens; the widest point of a block is the residual stream, the normed input in fp32 (its
    LayerNorm/RMSNorm) and either the MLP (fc1 and its GELU) or attention (q, k, v, output). Then the
    pixel shuffle (4x wider, 4x fewer tokens) and the projector (LayerNorm, linear_1, GELU, linear_2).
    Language model: a Qwen2 decoder over the visual + text tokens (1-D rotary positions). The two peaks do
    not overlap (the image features are scattered into the prompt before the first decoder layer).
    Returned as the fields of `fgvr.models.plan.Workload` (this module cannot import the plan).
    """
    b = _DTYPE_BYTES[dtype]
    text, vis = config.get("text_config", config), config["vision_config"]
    layers, kv_heads = text["num_hidden_layers"], text["num_key_value_heads"]
    hidden, inter, heads = text["hidden_size"], text["intermediate_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    kv_per_token = 2 * layers * kv_heads * head_dim * b

    tokens = vlm.tokens_at_cap(max_pixels)
    tiles = tokens // TOKENS_PER_TILE
    size = vis.get("image_size", TILE)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = vis.get("patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    seq_tile = (size // patch) ** 2 + 1
    vh, vi = vis["hidden_size"], vis["intermediate_size"]
    vision_block = max(2 * vi * b, 4 * vh * b)
    vision = (
        tiles * seq_tile * (2 * vh * b + vh * 4 + vision_block)
        + tiles * 3 * size * size * 4  # pixel_values in fp32 as the processor makes them
    )
    shuffled = 4 * vh  # downsample_ratio 0.5: 2x2 neighbours side by side
    projector = tokens * (2 * shuffled * b + shuffled * 4 + 2 * hidden * b)
    vision = max(vision, projector + tokens * hidden * b)
    seq = tokens + text_tokens
    lm_block = max(4 * inter * b, (hidden + 2 * kv_heads * head_dim) * b * 2 + hidden * b)
    lm = seq * (2 * hidden * b + 2 * hidden * 4 + lm_block) + seq * hidden * b * 2 + seq * 8
    vocab = text.get("vocab_size", config.get("vocab_size"))
    logits = vocab * 4 * 3
    kv = (seq + new_tokens) * kv_per_token
    kv, vision, lm, logits = kv * batch, vision * batch, lm * batch, logits * batch
    return dict(
        max_pixels=max_pixels, visual_tokens=tokens, image_size=tuple(image_size),
        image_tokens=vlm.visual_tokens(image_size[0], image_size[1], max_pixels), text_tokens=text_tokens,
        new_tokens=new_tokens, batch=batch, kv_bytes_per_token=kv_per_token, kv_bytes_per_1k=kv_per_token * 1000,
        kv_bytes=kv, vision_activation_bytes=vision, lm_activation_bytes=lm, logits_bytes=logits,
        working_bytes=kv + max(vision, lm) + logits, full_logits_bytes=seq * vocab * b * batch,
    )


VLM = TiledVlmDeclaration(patch=PATCH, default_max_pixels=DEFAULT_MAX_PIXELS, default_min_pixels=DEFAULT_MIN_PIXELS,
                          fitted_size=fitted_size, serve_flags=serve_flags, processor_kwargs=processor_kwargs,
                          stop_tokens=("<|im_end|>",), workload=workload,
                          # "OpenGVLab/InternVL3-8B-hf", "InternVL2_5-8B", "InternVL3_5-8B": 448-pixel tiles
                          # plus a thumbnail in every InternVL release since 1.5
                          served_names=(r"internvl",))

FAMILY = Family(
    name="internvl",
    role="vlm",
    title="InternVL3",
    load=load,
    estimate_bytes=estimate_bytes,
    build_meta=_build_meta,
    model_types=("internvl",),
    known_configs=configs.INTERNVL,
    spec_defaults=_spec_defaults,
    fit_hints=_fit_hints,
    vlm=VLM,
)
