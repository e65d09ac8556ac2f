"""The `Encoder` interface every image encoder meets: images in, L2-normalised float32 embeddings out.

The knowledge base, the fast path and the re-ranker only ever talk to this interface, so an EfficientNet
(image only, the offline default) and a CLIP/SigLIP dual encoder (image + text) are interchangeable.
Embeddings always come back as float32 on the CPU, whatever dtype and device the model runs in, because
everything downstream (prototypes, matmuls against all classes, safetensors files) wants one format.

Encoders are built by `fgvr.models.families` and handed out by `fgvr.models.registry.use(spec)`; never
construct one directly in pipeline code, or the registry cannot see (or free) its memory.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec


class NoTextTowerError(RuntimeError):
    """Raised by `encode_texts` on an image-only encoder; check `encoder.has_text` first."""


def torch_dtype(name: str) -> torch.dtype:
    """'float32' / 'float16' / 'bfloat16' (a normalised `ModelSpec.dtype`) to the torch dtype."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS}


def resize_center_crop(image: Image.Image, size: int, upscale: str = "bicubic",
                       downscale: str = "bicubic") -> Image.Image:
    """Resize the shorter side to `size`, then cut the central `size`x`size` square.

    The filter depends on the direction: `upscale` when the image is enlarged, `downscale` when shrunk
    (PIL antialiases when shrinking with any of these filters). Each encoder family states its pair as part
    of its definition: on 28-px sources enlarged 8x, bicubic's overshoot at sharp edges costs accuracy
    (benchmarks/preprocessing.py).

    Why this and not a plain resize to a square: squashing changes aspect ratios, and shape is one of
    the cues that tells fine-grained classes apart (a coupe from a sedan, one dog breed from another).
    Why no extra border crop (ImageNet eval's 87.5% centre crop): objects in fine-grained photos often
    fill the frame, and the crop only ever removes the long side's margins this way.
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), RESAMPLE[upscale if nw > w else downscale])
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a (3,H,W) float32 tensor of 0..255 values (no torchvision here). The HWC -> CHW copy
    is numpy's, in the same pass as the cast: torch's permute().contiguous() took 1-3 ms per 224-px image
    on a busy 2-core machine, a sixth of ONNX Runtime's whole encode."""
    arr = np.asarray(image.convert("RGB"))  # (H,W,3) uint8
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))  # a fresh copy


def pil_batch(images: Sequence[Image.Image]) -> np.ndarray:
    """Same-size RGB images to one (N,3,H,W) float32 array of 0..255 values, each image copied once into
    place (no per-image tensor, no stack): the caller normalises it in place."""
    if not images:
        raise ValueError("pil_batch needs at least one image")
    w, h = images[0].size
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, im in enumerate(images):
        out[i] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    return out


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in float32 (fp16 norms of 1000-d vectors lose digits)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Encoder:
    """Base class of the image encoders. Subclasses set the attributes and implement the two encoders.

    Attributes: `spec` (the ModelSpec it was loaded from), `embed_dim`, `has_text`, `image_size`
    (the square input side the model sees), `device`, `dtype`.
    """

    spec: "ModelSpec"
    embed_dim: int
    has_text: bool = False
    image_size: int
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0  # set by the loader: weights read + moved, for reports
    graph = None  # the `fgvr.models.onnx_runtime.OrtGraph` running the image tower when spec.runtime is "onnx"

    def torch_modules(self) -> list[torch.nn.Module]:
        """What the registry measures, moves and leak-checks."""
        raise NotImplementedError

    def runtime_bytes(self) -> int:
        """Bytes of weights held outside `torch_modules()` by another runtime (an ONNX Runtime session):
        the registry adds them to what it measures; they are neither moved nor leak-checked. The ONNX
        Runtime session's graph initializer bytes where `graph` is set."""
        return self.graph.weight_bytes if self.graph is not None else 0

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N,3,H,W) float32 CPU tensor, normalised the way this model was trained."""
        raise NotImplementedError

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) from `preprocess` to (N,D) float32 CPU, L2-normalised."""
        raise NotImplementedError

    def encode_images(
        self, images: Sequence[Image.Image], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """Preprocess and encode in batches, so a whole support set never sits in memory as pixels."""
        if len(images) == 0:
            return torch.zeros(0, self.embed_dim)
        out = []
        steps = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"encoding ({self.spec.name})", unit="batch", file=sys.stderr)
        with torch.inference_mode():
            for i in steps:
                out.append(self.encode_pixels(self.preprocess(images[i : i + batch_size])))
        return torch.cat(out)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,D) L2-normalised text embeddings in the image space; long texts chunked and averaged."""
        raise NoTextTowerError(
            f"{self.spec.name} is an image-only encoder and has no text tower: build the knowledge base "
            "without text prototypes, or use a CLIP/SigLIP folder as --encoder"
        )
