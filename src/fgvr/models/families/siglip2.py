"""SigLIP 2 dual encoders (image + text tower) through transformers, from a local save_pretrained folder.

SigLIP 2 comes in two forms on the hub:
* fixed resolution (google/siglip2-{base,large,so400m}-patch16-{224,256,384,512}): SiglipModel folders
  (config.json model_type "siglip") with the Gemma tokenizer. They are the `siglip` family's computation
  exactly (square resize, mean/std 0.5, texts padded to 64 tokens), so `parse_spec` gives them that family;
  this module only declares their architectures for `fgvr memory plan` and `fgvr models`.
* naflex (google/siglip2-*-patch16-naflex): Siglip2Model, model_type "siglip2". Each image is resized,
  keeping its aspect ratio, to the largest patch grid within a budget of `max_num_patches` patches (256 on
  the hub; `image_size=S` in the spec sets it to (S/patch)^2), and the learned 16x16 position embeddings
  are resized to that grid. That is this family.

Texts: the text tower reads 64 positions and was trained on texts padded to the full 64 tokens
(padding="max_length", as the model card calls the processor) with no attention mask; longer texts are cut
into 64-token chunks whose embeddings are averaged (the `siglip` family's chunking, reused).

Pixels: the encoder interface passes one tensor per batch, so a naflex batch travels packed as
(N, 1 + max_num_patches, 3*patch*patch): row 0 holds each image's patch grid (rows, cols), the rest its
patches, padding after the grid's rows*cols patches (that count is the pixel attention mask). Test-time
views that flip or crop (N,3,H,W) pixels do not apply to naflex patches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from fgvr.encoder import l2_normalise, torch_dtype
from fgvr.models import configs
from fgvr.models.family import Family, hf_dtype_kwargs, hf_tokenizer_kwargs
from fgvr.models.families.clip import CLIPEncoder, _special_tokens_around
from fgvr.errors import SpecError

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

TEXT_LENGTH = 64  # the model card's max_length (padding="max_length")


def _check_folder(spec: ModelSpec) -> Path:
    path = Path(spec.source)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    raise SpecError(
        f"siglip2 folder {path} does not exist or has no config.json and safetensors weights. Nothing is "
        "downloaded at run time: fetch one, e.g. `huggingface-cli download google/siglip2-base-patch16-naflex "
        "--local-dir models/siglip2-base-patch16-naflex`, and pass that folder."
    )


def pack(pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(N,P,C) patches + (N,2) grids -> one (N,1+P,C) float32 tensor (see the module docstring)."""
    header = torch.zeros(pixel_values.shape[0], 1, pixel_values.shape[2])
    header[:, 0, :2] = spatial_shapes.float()
    return torch.cat([header, pixel_values.float()], dim=1)


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values, pixel_attention_mask, spatial_shapes) from a `pack`ed tensor; ValueError for a
    tensor that is not one (e.g. an (N,3,H,W) test-time view flipped or cropped the packed patches)."""
    if packed.dim() != 3 or packed.shape[1] < 2:
        raise ValueError(f"naflex SigLIP 2 takes packed patches (N, 1+P, C), not {tuple(packed.shape)}")
    shapes = packed[:, 0, :2].round().long()
    patches = packed[:, 1:]
    count = shapes[:, 0] * shapes[:, 1]
    if bool((count < 1).any() or (count > patches.shape[1]).any() or packed[:, 0, 2:].abs().sum() > 0):
        raise ValueError("naflex SigLIP 2 pixels are packed patches and test-time views (flip, crop) do not "
                         "apply to them: use a fixed-resolution SigLIP 2 folder for the re-ranker's views")
    mask = (torch.arange(patches.shape[1])[None, :] < count[:, None]).long()
    return patches, mask, shapes


class Siglip2Encoder(CLIPEncoder):
    """A naflex SigLIP 2 model: aspect-preserving patch grids within a patch budget, 64-token texts."""

    has_text = True

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, image_processor: Any) -> None:
        self.spec, self.model, self.tokenizer, self.image_processor = spec, model, tokenizer, image_processor
        self.device, self.dtype = torch.device(spec.device), torch_dtype(spec.dtype)
        cfg = model.config
        self.embed_dim = cfg.text_config.projection_size
        self.patch_size = cfg.vision_config.patch_size
        budget = image_processor.max_num_patches
        if spec.image_size:
            budget = (spec.image_size // self.patch_size) ** 2
        self.max_num_patches = int(budget)
        self.image_size = int(self.patch_size * self.max_num_patches ** 0.5)  # the square the budget allows
        self.text_limit = min(TEXT_LENGTH, cfg.text_config.max_position_embeddings)
        self.prefix, self.suffix = _special_tokens_around(tokenizer)
        self.pad_to_limit = True

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt",
                                   max_num_patches=self.max_num_patches, patch_size=self.patch_size)
        return pack(out["pixel_values"], out["spatial_shapes"])

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self._weights()
        patches, mask, shapes = unpack(pixels)
        with torch.inference_mode():
            feats = self.model.get_image_features(
                pixel_values=patches.to(device=p.device, dtype=p.dtype),
                pixel_attention_mask=mask.to(p.device), spatial_shapes=shapes.to(p.device))
        return l2_normalise(feats).cpu()


def load(spec: ModelSpec) -> Siglip2Encoder:
    from transformers import AutoTokenizer, Siglip2ImageProcessor, Siglip2Model

    if spec.quantization:
        raise SpecError(f"siglip2 encoders are small; load them in fp16/bf16, not {spec.quantization}")
    path = _check_folder(spec)
    t0 = time.perf_counter()
    model = Siglip2Model.from_pretrained(path, **hf_dtype_kwargs(torch_dtype(spec.dtype)))
    model = model.to(spec.device).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hf_tokenizer_kwargs())
    except (ImportError, ValueError) as e:
        raise SpecError(f"cannot load the tokenizer in {path}: {e} (the Gemma tokenizer needs "
                        "`pip install sentencepiece` or a tokenizer.json)") from e
    image_processor = Siglip2ImageProcessor.from_pretrained(path)  # the slow one: PIL and numpy only
    enc = Siglip2Encoder(spec, model, tokenizer, image_processor)
    enc.load_seconds = time.perf_counter() - t0
    return enc


def build_meta(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The real network for a plan config (naflex Siglip2Model or fixed-resolution SiglipModel); the
    caller supplies the meta device."""
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    config_class, model_class = ((Siglip2Config, Siglip2Model) if config.get("model_type") == "siglip2"
                                 else (SiglipConfig, SiglipModel))
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return model_class._from_config(config_class(**fields), dtype=dtype)


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter + buffer bytes from config.json on the meta device, in the dtype the spec loads."""
    import json

    from fgvr.models.footprint import meta_bytes

    config = json.loads((_check_folder(spec) / "config.json").read_text())
    return meta_bytes(lambda: build_meta(config, torch_dtype(spec.dtype)))


FAMILY = Family(
    name="siglip2", role="image-encoder", title="SigLIP 2", load=load, estimate_bytes=estimate_bytes,
    build_meta=build_meta, model_types=("siglip2",), known_configs=configs.SIGLIP2,
    text_tower=True,
)
