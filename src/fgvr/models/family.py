"""What a model family declares: the `Family` record every module of `fgvr.models.families` fills in, and
for a vision-language model the `VlmDeclaration` of how it sees an image and how an engine serves it.

This module imports nothing of fgvr at run time, so a family module can import it (and `fgvr.errors`)
without reaching back into the spec or the registry that read the declarations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from fgvr.models.spec import ModelSpec

ROLES = ("image-encoder", "vlm", "text-embedder")


def encoder_fit_hints(spec: "ModelSpec", device: str) -> list[str]:
    """What to try when an encoder does not fit its device's budget (the default for families)."""
    tries = []
    if device != "cpu":
        tries.append("this encoder on the CPU (device=cpu)")
    if spec.dtype == "float32":
        tries.append("dtype bf16/fp16 (half the bytes)")
    return tries


def no_serve_flags(engine: str, max_pixels: int, min_pixels: int) -> tuple[list[str], dict[str, str]]:
    """A family that declares no engine flags: the engine's own defaults."""
    return [], {}


def pixel_cap_kwargs(max_pixels: int | None, min_pixels: int | None) -> dict:
    """The processor keywords that set the pixel cap, as Qwen2-VL-style processors take them (the default)."""
    return {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v}


def config_without_dtype(config: dict) -> dict:
    """`config` without the dtype it was saved in, at every level. A config.json's `torch_dtype`/`dtype`
    ("bfloat16" in every hub VLM) is copied into its sub-configs, and transformers builds each sub-model in
    its sub-config's dtype whatever dtype `_from_config` is given: an fp32 plan of Qwen2.5-VL-7B kept its
    language model in bf16 (19.03 GB instead of 33.17 GB). A plan or an estimate is for the dtype asked for."""
    return {k: config_without_dtype(v) if isinstance(v, dict) else v for k, v in config.items()
            if k not in ("torch_dtype", "dtype")}


def grid_resize(height: int, width: int, factor: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """(H, W) on a grid of `factor` pixels with the area within [min, max] pixels: the `smart_resize` of
    transformers' Qwen2-VL-style image processors, same rounding (shared by VLMs that tile the same way)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class VlmDeclaration:
    """How a VLM family sees an image, declared once so that the spec, the plans and every backend agree.

    patch               pixels per side of one visual token (the grid the processor resizes to).
    default_max_pixels  the pixel cap a spec gets when none is given (the per-image visual-token budget).
    default_min_pixels  the smallest area the processor resizes up to.
    fitted_size         (height, width, max_pixels, min_pixels) -> the (H, W) the processor resizes to.
    serve_flags         (engine, max_pixels, min_pixels) -> (extra command-line words, environment) that
                        make a serving engine ("vllm", "sglang") resize to the same cap.
    default             the family a served VLM's pixels follow when no family is named (one per role).
    processor_kwargs    (max_pixels, min_pixels) -> the keywords that give the family's processor that cap.
    stop_tokens         the tokens that end an assistant turn in the family's chat template.
    workload            (config, dtype, max_pixels, image_size, text_tokens, new_tokens, batch, declaration)
                        -> `fgvr.models.plan.Workload` or a dict of its fields (a family module cannot import
                        the plan without an import cycle): one generation's working memory for the family's own
                        architecture; None: the Qwen2-VL-style estimate of `fgvr.models.plan.merged_patch_workload`.
    served_names        regular expressions (case-insensitive, found anywhere in it) that the last path part of
                        a served model's id matches when it is this family. vLLM and SGLang list the hub id or folder the engine
                        was started with ("Org/Model-8B-Instruct", "/models/model-8b"), so this is how a
                        served model's images get this family's grid without `--vlm-family`
                        (`fgvr.models.families.recognising_vlm_families`). Declare only ids whose processor sizes
                        images exactly as this family's does.
    """

    patch: int
    default_max_pixels: int
    default_min_pixels: int
    fitted_size: Callable[[int, int, int, int], tuple[int, int]]
    serve_flags: Callable[[str, int, int], tuple[list[str], dict[str, str]]] = no_serve_flags
    default: bool = False
    processor_kwargs: Callable[[int | None, int | None], dict] = pixel_cap_kwargs
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    workload: Callable[..., Any] | None = None
    served_names: tuple[str, ...] = ()

    def recognises(self, model_id: str) -> bool:
        """Whether a served model's id matches one of `served_names`."""
        import re

        return any(re.search(p, model_id, flags=re.IGNORECASE) for p in self.served_names)

    def pixels_for_tokens(self, tokens: int) -> int:
        """The pixel cap that allows `tokens` visual tokens."""
        return tokens * self.patch * self.patch

    def tokens_at_cap(self, max_pixels: int) -> int:
        """Visual tokens of the worst-case image at the cap."""
        return max_pixels // (self.patch * self.patch)

    def visual_tokens(self, height: int, width: int, max_pixels: int, min_pixels: int | None = None) -> int:
        """Visual tokens the processor makes of a `height` x `width` image under the cap."""
        h, w = self.fitted_size(height, width, max_pixels,
                                self.default_min_pixels if min_pixels is None else min_pixels)
        return (h // self.patch) * (w // self.patch)

    def fit_pixels(self, image: "Image.Image", max_pixels: int | None = None,
                   min_pixels: int | None = None) -> "Image.Image":
        """The RGB image at the size the processor would resize it to, resized the way it would (PIL
        bicubic). Resizing again to the same size is a no-op in PIL, so a processor given this image leaves
        it as is, and a served model sees the pixels the in-process one would."""
        from PIL import Image

        image = image.convert("RGB")
        h, w = self.fitted_size(image.height, image.width, max_pixels or self.default_max_pixels,
                                self.default_min_pixels if min_pixels is None else min_pixels)
        if (h, w) == (image.height, image.width):
            return image
        return image.resize((w, h), resample=Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class Family:
    """Everything fgvr needs to know about one model family; declared in the family's own module.

    name            the spec's `family` ("clip"); role: one of ROLES.
    title           how messages name it ("CLIP").
    load            spec -> loaded object with `torch_modules()` (an `fgvr.encoder.Encoder` for image encoders).
    estimate_bytes  spec -> bytes of parameters + buffers once loaded, known without loading any weights.
    build_meta      (config dict, torch dtype) -> the real network, built under the meta device by the caller
                    (`fgvr memory plan`); None where the family cannot be planned from a config.
    model_types     config.json `model_type` values that make a folder this family.
    marker_file     a file whose presence makes a folder this family (checked before config.json).
    known_configs   model names `fgvr memory plan` can size without a folder: name -> config dict.
    named_sources   names a user may type for packaged weights: name -> () -> (source, revision or None).
    local_folder    the spec's source is a model folder (made absolute; its revision is a content digest).
    spec_defaults   fills a new spec's unset fields, e.g. a VLM's pixel cap: (fields dict) -> fields dict.
    fit_hints       (spec, device) -> what to try when it does not fit the budget (the registry's error).
    vlm             role "vlm" only: how it sees an image and how an engine serves it (`VlmDeclaration`).
    text_tower      an image encoder with a text tower in the same space (CLIP-style): class names and
                    VLM-written descriptions become text prototypes (`fgvr bench` asks for descriptions).
    onnx_export     its image tower exports cleanly to ONNX and `spec.runtime == "onnx"` runs it by ONNX
                    Runtime (`fgvr.models.runtime`); declared only where the export was checked equal to torch.
    """

    name: str
    role: str
    title: str
    load: Callable[["ModelSpec"], Any]
    estimate_bytes: Callable[["ModelSpec"], int]
    build_meta: Callable[[dict, "torch.dtype"], Any] | None = None
    model_types: tuple[str, ...] = ()
    marker_file: str | None = None
    known_configs: Mapping[str, dict] = field(default_factory=dict)
    named_sources: Mapping[str, Callable[[], tuple[str, str | None]]] = field(default_factory=dict)
    local_folder: bool = True
    spec_defaults: Callable[[dict], dict] | None = None
    fit_hints: Callable[["ModelSpec", str], list[str]] = encoder_fit_hints
    vlm: VlmDeclaration | None = None
    text_tower: bool = False
    onnx_export: bool = False


# --- transformers version differences, in one place ---------------------------------------------------
def _transformers_version() -> tuple[int, int, int]:
    import transformers

    parts = (transformers.__version__.split("+")[0].split(".") + ["0", "0"])[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def hf_dtype_kwargs(dtype: "torch.dtype") -> dict:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    return {"dtype" if _transformers_version() >= (4, 56, 0) else "torch_dtype": dtype}


def hf_tokenizer_kwargs() -> dict:
    """transformers 4.57.3+ warns that every local tokenizer folder saved by 4.57.3+ has Mistral's broken
    regex ("will lead to incorrect tokenization") whatever the model; the fix is Mistral-only, so say no."""
    return {"fix_mistral_regex": False} if (4, 57, 3) <= _transformers_version() < (5, 0, 0) else {}
