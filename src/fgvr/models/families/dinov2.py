"""DINOv2 and DINOv3 (ViT) image-only encoders through transformers, from a local save_pretrained folder.

Self-supervised DINO features are the strongest off-the-shelf descriptors for fine-grained retrieval; they
have no text tower, so a base built on them has image prototypes only.

Two poolings, each its own family so a knowledge base records which one made its vectors:
* `dinov2` / `dinov3_vit`: the final-layer-normed CLS token (the model's `pooler_output`), what the model
  cards use for retrieval and k-NN;
* `dino_mean`: the mean of the final-layer-normed patch tokens (register tokens excluded), chosen by an
  empty file `fgvr-mean-pool` in the model folder (`touch models/dinov2-base/fgvr-mean-pool`).

Preprocessing is the model cards': shorter side resized to 256 (bicubic), central 224 crop, ImageNet
mean/std. A folder's preprocessor_config.json, where it states other sizes, wins.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from fgvr.encoder import Encoder, l2_normalise, pil_to_tensor, resize_center_crop, torch_dtype
from fgvr.models import configs
from fgvr.models.family import Family, hf_dtype_kwargs
from fgvr.errors import SpecError

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

MEAN_POOL_MARKER = "fgvr-mean-pool"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224  # the model cards' evaluation transform


def _classes(model_type: str):
    from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

    return {"dinov2": (Dinov2Config, Dinov2Model), "dinov3_vit": (DINOv3ViTConfig, DINOv3ViTModel)}[model_type]


def _check_folder(spec: ModelSpec) -> tuple[Path, dict]:
    path = Path(spec.source)
    cfg = path / "config.json"
    if cfg.is_file() and any(path.glob("*.safetensors")):
        config = json.loads(cfg.read_text())
        if config.get("model_type") in ("dinov2", "dinov3_vit"):
            return path, config
    raise SpecError(
        f"{spec.family} folder {path} has no DINOv2/DINOv3 config.json and safetensors weights. Nothing is "
        "downloaded at run time: fetch one, e.g. `huggingface-cli download facebook/dinov2-base --local-dir "
        "models/dinov2-base`, and pass that folder."
    )


def _preprocessing(path: Path) -> tuple[int, int, tuple, tuple]:
    """(resize, crop, mean, std): the folder's preprocessor_config.json where it gives a shortest-edge
    resize and a crop, else the model card's 256 / 224."""
    pp = path / "preprocessor_config.json"
    cfg = json.loads(pp.read_text()) if pp.is_file() else {}
    resize = int((cfg.get("size") or {}).get("shortest_edge") or RESIZE)
    side = int((cfg.get("crop_size") or {}).get("height") or CROP)
    return resize, side, tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD))


class DinoEncoder(Encoder):
    """A DINOv2/DINOv3 ViT: CLS or mean-of-patches features, L2-normalised, float32 on the CPU."""

    has_text = False

    def __init__(self, spec: ModelSpec, model: Any, pooling: str, preprocessing: tuple) -> None:
        self.spec, self.model, self.pooling = spec, model, pooling
        self.device, self.dtype = torch.device(spec.device), torch_dtype(spec.dtype)
        self.embed_dim = model.config.hidden_size
        self.resize, self.image_size, mean, std = preprocessing
        if spec.image_size:
            self.resize, self.image_size = round(spec.image_size * RESIZE / CROP), spec.image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # tokens before the patches: CLS, then DINOv3's register tokens
        self.skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for im in images:
            resized = resize_center_crop(im, self.resize, upscale="bicubic", downscale="bicubic")
            off = (self.resize - self.image_size) // 2
            crop = resized.crop((off, off, off + self.image_size, off + self.image_size))
            out.append((pil_to_tensor(crop) / 255.0 - self.mean) / self.std)
        return torch.stack(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        with torch.inference_mode():
            out = self.model(pixel_values=pixels.to(device=p.device, dtype=p.dtype))
        if self.pooling == "mean":
            feats = out.last_hidden_state[:, self.skip:].float().mean(1)
        else:
            feats = out.pooler_output
        return l2_normalise(feats).cpu()


def load(spec: ModelSpec) -> DinoEncoder:
    if spec.quantization:
        raise SpecError(f"{spec.family} encoders are small; load them in fp16/bf16, not {spec.quantization}")
    path, config = _check_folder(spec)
    t0 = time.perf_counter()
    _, model_class = _classes(config["model_type"])
    model = model_class.from_pretrained(path, **hf_dtype_kwargs(torch_dtype(spec.dtype)))
    model = model.to(spec.device).eval().requires_grad_(False)
    pooling = "mean" if spec.family == "dino_mean" else "cls"
    enc = DinoEncoder(spec, model, pooling, _preprocessing(path))
    enc.load_seconds = time.perf_counter() - t0
    return enc


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter + buffer bytes of the folder's architecture on the meta device, in the spec's dtype."""
    from fgvr.models.footprint import meta_bytes

    _, config = _check_folder(spec)
    return meta_bytes(lambda: build_meta(config, torch_dtype(spec.dtype)))


def build_meta(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The real network for a config dict; the caller supplies the meta device."""
    config_class, model_class = _classes(config.get("model_type", "dinov2"))
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return model_class._from_config(config_class(**fields), dtype=dtype)


FAMILIES = (
    Family(name="dinov2", role="image-encoder", title="DINOv2", load=load, estimate_bytes=estimate_bytes,
           build_meta=build_meta, model_types=("dinov2",), known_configs=configs.DINOV2),
    Family(name="dinov3_vit", role="image-encoder", title="DINOv3", load=load, estimate_bytes=estimate_bytes,
           build_meta=build_meta, model_types=("dinov3_vit",), known_configs=configs.DINOV3),
    Family(name="dino_mean", role="image-encoder", title="DINOv2/v3 (mean-pooled patches)", load=load,
           estimate_bytes=estimate_bytes, build_meta=build_meta, marker_file=MEAN_POOL_MARKER),
)
