"""`fgvr memory plan`: will these models fit this budget, and if not, what is the cheapest change that fits?

Sizes come from the real architectures built on the meta device (shapes, no storage, no weights needed),
from the config.json values in `fgvr.models.configs` or a local model folder, not from quoted figures.
The working memory of one System 2 generation is estimated term by term (KV cache, vision tower and
language-model prefill activations, logits) so each term can be checked against a measurement
(benchmarks/gpu_memory.py prints the estimate next to CUDA's peak).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from fgvr.models import configs
from fgvr.models.footprint import format_bytes, module_params, quantised_bytes  # noqa: F401 (re-exported)
from fgvr.models.family import Family, VlmDeclaration, config_without_dtype
from fgvr.models.spec import ModelSpec, SpecError, normalise_dtype

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# The CUDA context and cuBLAS/cuDNN workspaces live outside torch's allocator. Measured by
# benchmarks/gpu_memory.py on an H200 (torch 2.11, CUDA 13): 648.87 MB (device used - torch reserved).
CUDA_CONTEXT_BYTES = 650 * 10**6
PIXEL_CAPS_TO_TRY = (1024, 768, 512, 384, 256)  # visual tokens per image, largest first


@dataclass
class ModelSize:
    name: str
    role: str  # vlm | encoder
    family: str
    dtype: str
    quantization: str | None
    params: int
    weight_bytes: int  # parameters + buffers once loaded (tied weights once; quantised layers packed)
    on_gpu: bool = True


@dataclass
class Workload:
    """One System 2 generation: a chat prompt with one image at the pixel cap, options, a short answer."""

    max_pixels: int
    visual_tokens: int  # worst case at the cap: floor(max_pixels / patch²) on the family's grid
    image_size: tuple[int, int]
    image_tokens: int  # the reference image resized under the cap, as the processor does
    text_tokens: int
    new_tokens: int
    batch: int  # prompts per forward (slow_path scores several queries at once)
    kv_bytes_per_token: int
    kv_bytes_per_1k: int
    kv_bytes: int
    vision_activation_bytes: int
    lm_activation_bytes: int
    logits_bytes: int
    working_bytes: int  # KV + the larger of the two activation peaks + logits
    full_logits_bytes: int = 0  # NOT in the total: a forward without logits_to_keep=1 adds this per row


@dataclass
class Option:
    change: str
    total_bytes: int
    fits: bool


@dataclass
class Plan:
    budget: int
    models: list[ModelSize]
    workload: Workload | None
    context_bytes: int
    total_bytes: int
    fits: bool
    options: list[Option] = field(default_factory=list)
    recommendation: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        gib = 2**30
        lines = [f"budget {format_bytes(self.budget)} ({self.budget / gib:.2f} GiB) on one GPU", ""]
        lines.append(f"{'model':<22} {'role':<8} {'params':>9}  {'dtype':<9} {'quant':<6} {'weights':>22}")
        for m in self.models:
            where = "" if m.on_gpu else "  (on CPU)"
            lines.append(
                f"{m.name:<22} {m.role:<8} {_count(m.params):>9}  {m.dtype:<9} {m.quantization or '-':<6} "
                f"{format_bytes(m.weight_bytes):>10} ({m.weight_bytes / gib:.2f} GiB){where}"
            )
        w = self.workload
        if w is not None:
            lines += [
                "",
                f"VLM working memory for one System 2 generation ({w.visual_tokens} visual tokens at the cap, "
                f"{w.text_tokens} text tokens, {w.new_tokens} new tokens"
                + (f", batch of {w.batch}" if w.batch > 1 else "") + "):",
                f"  pixel cap                    max_pixels={w.max_pixels} -> at most {w.visual_tokens} visual "
                f"tokens (a {w.image_size[0]}x{w.image_size[1]} image: {w.image_tokens})",
                f"  KV cache per 1k tokens       {format_bytes(w.kv_bytes_per_1k)} ({w.kv_bytes_per_token:,} B/token)",
                f"  KV cache                     {format_bytes(w.kv_bytes)}",
                f"  vision tower activations     {format_bytes(w.vision_activation_bytes)}",
                f"  LM prefill activations       {format_bytes(w.lm_activation_bytes)}",
                f"  logits                       {format_bytes(w.logits_bytes)}",
                f"  working memory               {format_bytes(w.working_bytes)}",
                f"  (a scoring forward that keeps logits for every position, not just the last, adds "
                f"{format_bytes(w.full_logits_bytes)}: pass logits_to_keep=1)",
            ]
        lines.append(f"  CUDA context (allowance)     {format_bytes(self.context_bytes)}")
        spare = self.budget - self.total_bytes
        verdict = f"fits, {format_bytes(spare)} spare" if self.fits else f"DOES NOT FIT, {format_bytes(-spare)} over"
        lines += ["", f"total {format_bytes(self.total_bytes)} ({self.total_bytes / gib:.2f} GiB): {verdict}"]
        if self.options:
            lines += ["", "changes, cheapest first:"]
            for o in self.options:
                lines.append(f"  {'fits' if o.fits else 'no  '}  {format_bytes(o.total_bytes):>10}  {o.change}")
            lines.append("")
            lines.append(f"cheapest change that fits: {self.recommendation}" if self.recommendation
                         else "no single change or pair of changes fits this budget; use a smaller VLM")
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


# --- architectures on the meta device --------------------------------------------------------------------


def resolve(name_or_folder: str) -> tuple[str, str, dict]:
    """(label, family, config) for a known model name or a local folder with a config.json."""
    from fgvr.models import families

    known = families.architecture(name_or_folder)
    if known is not None:
        return name_or_folder.strip().lower(), known[0], known[1]
    p = Path(name_or_folder).expanduser()
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        names = ", ".join(n for f in families.all_families() for n in f.known_configs)
        raise SpecError(f"{name_or_folder!r} is neither a known model ({names}) nor a folder with a config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{cfg_file}: not valid JSON ({exc}); re-download the model's config.json") from None
    family = next((f.name for f in families.all_families()
                   if cfg.get("model_type", "") in f.model_types and f.build_meta is not None), None)
    if family is None:
        raise SpecError(f"{cfg_file}: model_type {cfg.get('model_type')!r} is not one fgvr can plan for")
    return p.resolve().name, family, cfg


def vlm_family(name: str, family: str) -> Family:
    """The declaration of `family`, refused with what to give instead unless it is a VLM family."""
    from fgvr.models import families

    fam = families.get(family)
    if fam.vlm is None:
        titles = ", ".join(f.title for f in families.by_role("vlm"))
        raise SpecError(f"--vlm {name!r} is a {fam.title} model ({fam.role}); the VLM must be one of: {titles}")
    return fam


def build_meta(family: str, config: dict, dtype: str):
    """The real network for `config`, on the meta device, in `dtype` (the family's `build_meta`)."""
    import torch

    from fgvr.models import families

    try:
        build = families.get(family).build_meta
    except KeyError:
        build = None
    if build is None:
        raise SpecError(f"cannot build family {family!r}")
    with torch.device("meta"):
        return build(config_without_dtype(config), getattr(torch, normalise_dtype(dtype)))



@functools.lru_cache(maxsize=64)
def _measure_meta(family: str, config_json: str, dtype: str, quantization: str | None) -> tuple[int, int]:
    """(params, bytes) of an architecture; cached because a plan evaluates the same model several times."""
    model = build_meta(family, json.loads(config_json), dtype)
    return module_params(model), quantised_bytes(model, quantization)


def model_size(name_or_folder: str, role: str, dtype: str, quantization: str | None = None) -> ModelSize:
    label, family, cfg = resolve(name_or_folder)
    params, nbytes = _measure_meta(family, json.dumps(cfg, sort_keys=True), normalise_dtype(dtype), quantization)
    return ModelSize(label, role, family, normalise_dtype(dtype), quantization, params, nbytes)


def estimate_spec_bytes(spec: ModelSpec) -> int:
    """Bytes the model a spec names will take once loaded, from its architecture on the meta device."""
    _, family, cfg = resolve(spec.source)
    if spec.image_size and "image_size" in cfg:  # a config that states its input size takes the spec's
        cfg = cfg | {"image_size": spec.image_size}
    return _measure_meta(family, json.dumps(cfg, sort_keys=True), spec.dtype, spec.quantization)[1]


# --- the working memory of one System 2 generation ---------------------------------------------------------


def visual_tokens_for(height: int, width: int, max_pixels: int, min_pixels: int | None = None,
                      vlm: VlmDeclaration | None = None) -> int:
    """Visual tokens the VLM family's processor produces for an image: the size every System 2 backend
    sends (`VlmDeclaration.fit_pixels`), in patches of its grid (`vlm`: the default VLM family's)."""
    from fgvr.models import families

    vlm = vlm or families.vlm_declaration()
    try:
        return vlm.visual_tokens(height, width, max_pixels, min_pixels)
    except ValueError as e:  # an aspect ratio the processor refuses: bad input, not a bug
        raise SpecError(f"image size {height}x{width}: {e}") from None


def workload(config: dict, dtype: str, max_pixels: int, image_size: tuple[int, int] = (1024, 1024),
             text_tokens: int = 400, new_tokens: int = 32, batch: int = 1,
             vlm: VlmDeclaration | None = None) -> Workload:
    """Working memory of one generation for the VLM family `vlm` declares (the default VLM family's if None):
    the family's own `workload` where it declares one, else `merged_patch_workload`. A family's estimate may
    return the `Workload` fields as a dict: a family module cannot import this module (it imports the spec,
    which reads the families)."""
    from fgvr.models import families

    vlm = vlm or families.vlm_declaration()
    estimate = vlm.workload or merged_patch_workload
    work = estimate(config, normalise_dtype(dtype), max_pixels, image_size, text_tokens, new_tokens, batch, vlm)
    return work if isinstance(work, Workload) else Workload(**work)


def merged_patch_workload(config: dict, dtype: str, max_pixels: int, image_size: tuple[int, int],
                          text_tokens: int, new_tokens: int, batch: int, vlm: VlmDeclaration) -> Workload:
    """Working memory of one generation, term by term, for a Qwen2.5-VL-style config (a vision tower of
    merged patches before a decoder; `vlm`: how the family tiles an image).

    The peaks of the vision tower and of the language model's prefill do not overlap (the vision features
    are merged into the prompt before the first decoder layer runs), so the larger one counts. Each peak
    is the tensors alive inside one block at its widest point (the MLP): the residual stream, the normed
    input, gate, up, activation and product. Attention goes through SDPA's fused kernels on CUDA (no
    seq x seq matrix). generate() computes logits for the last position only.
    """
    b = _DTYPE_BYTES[normalise_dtype(dtype)]
    text = config.get("text_config", config)
    vis = config["vision_config"]
    layers, kv_heads = text["num_hidden_layers"], text["num_key_value_heads"]
    hidden, inter, heads = text["hidden_size"], text["intermediate_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    kv_per_token = 2 * layers * kv_heads * head_dim * b

    tokens = vlm.tokens_at_cap(max_pixels)
    merge = vis.get("spatial_merge_size", 2)
    patches = tokens * merge * merge
    patch_dim = vis.get("in_chans", vis.get("in_channels", 3)) * vis.get("temporal_patch_size", 2) * vis.get("patch_size", 14) ** 2
    vh, vi = vis["hidden_size"], vis["intermediate_size"]
    # Widest point of a block: residual + normed input in the compute dtype, the RMSNorm's fp32
    # temporaries (it upcasts), then either the MLP (gate, up, activation, product) or attention
    # (qkv, q and k upcast to fp32 for the rotary embedding, output), whichever is wider.
    vision_block = max(4 * vi * b, 3 * vh * b + 4 * vh * 4 + vh * b)
    vision = (
        patches * (2 * vh * b + 2 * vh * 4 + vision_block)
        + patches * patch_dim * 4  # pixel_values in fp32 as the processor makes them
        + patches * (vh // vis.get("num_heads", 16)) * 4 * 2  # rotary cos/sin (fp32)
        + tokens * vh * merge * merge * b * 2  # merger input and its first MLP layer
    )
    seq = tokens + text_tokens
    lm_block = max(4 * inter * b, (hidden + 2 * kv_heads * head_dim) * b * 2 + hidden * b)
    lm = (
        seq * (2 * hidden * b + 2 * hidden * 4 + lm_block)
        + seq * hidden * b * 2  # input embeddings and the copy the image features are scattered into
        + seq * 3 * 8  # 3-D rotary position ids
    )
    vocab = text.get("vocab_size", config.get("vocab_size"))
    logits = vocab * 4 * 3  # last position: logits, processed scores, probabilities (fp32)
    kv = (seq + new_tokens) * kv_per_token
    # A batch of prompts runs every term side by side: each grows with the batch.
    kv, vision, lm, logits = kv * batch, vision * batch, lm * batch, logits * batch
    working = kv + max(vision, lm) + logits
    return Workload(
        max_pixels=max_pixels, visual_tokens=tokens, image_size=tuple(image_size),
        image_tokens=visual_tokens_for(image_size[0], image_size[1], max_pixels, vlm=vlm), text_tokens=text_tokens,
        new_tokens=new_tokens, batch=batch, kv_bytes_per_token=kv_per_token, kv_bytes_per_1k=kv_per_token * 1000,
        kv_bytes=kv, vision_activation_bytes=vision, lm_activation_bytes=lm, logits_bytes=logits,
        working_bytes=working, full_logits_bytes=seq * vocab * b * batch,
    )


# --- the plan -----------------------------------------------------------------------------------------------


def _total(models: list[ModelSize], work: Workload | None, context: int) -> int:
    return sum(m.weight_bytes for m in models if m.on_gpu) + (work.working_bytes if work else 0) + context


def make_plan(
    vlm: str | None = "qwen2.5-vl-7b",
    encoder: str | None = "clip-vit-b32",
    dtype: str = "bf16",
    budget: int = 18 * 2**30,
    *,
    quantization: str | None = None,
    max_pixels: int | None = None,
    image_size: tuple[int, int] = (1024, 1024),
    text_tokens: int = 400,
    new_tokens: int = 32,
    batch: int = 1,
    encoder_dtype: str | None = None,
    context_bytes: int = CUDA_CONTEXT_BYTES,
) -> Plan:
    """Sizes, working memory, total and verdict; where it does not fit, each change evaluated."""
    from fgvr.models import families

    models: list[ModelSize] = []
    vlm_cfg, decl = None, families.vlm_declaration()
    if vlm:
        _, family, vlm_cfg = resolve(vlm)
        decl = vlm_family(vlm, family).vlm
        models.append(model_size(vlm, "vlm", dtype, quantization))
    max_pixels = max_pixels or decl.default_max_pixels
    if encoder:
        models.append(model_size(encoder, "encoder", encoder_dtype or dtype))
    work = workload(vlm_cfg, dtype, max_pixels, image_size, text_tokens, new_tokens, batch, vlm=decl) if vlm_cfg else None
    total = _total(models, work, context_bytes)
    plan = Plan(budget, models, work, context_bytes, total, total <= budget)
    if plan.fits or not vlm:
        return plan
    _add_options(plan, vlm, vlm_cfg, dtype, quantization, max_pixels, decl,
                 lambda cfg, px: workload(cfg, dtype, px, image_size, text_tokens, new_tokens, batch, vlm=decl))
    return plan


def _add_options(plan: Plan, vlm: str, vlm_cfg: dict, dtype: str, quantization: str | None, max_pixels: int,
                 decl: VlmDeclaration, work_at: Callable[[dict, int], Workload]) -> None:
    """Each change that could make `plan` fit, evaluated (plan.options), and the cheapest that does."""
    models, budget, context_bytes = plan.models, plan.budget, plan.context_bytes
    # Changes in order of what they cost in quality: none, some detail, some accuracy, more accuracy.
    vlm_bytes = {quantization: models[0].weight_bytes}

    def evaluate(enc_off: bool, tokens: int | None, quant: str | None) -> int:
        ms = [ModelSize(**asdict(m)) for m in models]
        for m in ms:
            if m.role == "encoder" and enc_off:
                m.on_gpu = False
            if m.role == "vlm" and quant and quant != m.quantization:
                if quant not in vlm_bytes:
                    vlm_bytes[quant] = model_size(vlm, "vlm", dtype, quant).weight_bytes
                m.weight_bytes = vlm_bytes[quant]
                m.quantization = quant
        px = decl.pixels_for_tokens(tokens) if tokens else max_pixels
        return _total(ms, work_at(vlm_cfg, px), context_bytes)

    has_encoder = any(m.role == "encoder" for m in models)
    current_tokens = decl.tokens_at_cap(max_pixels)
    caps = [t for t in PIXEL_CAPS_TO_TRY if t < current_tokens]
    quants = [q for q in ("int8", "nf4") if q != quantization and not (quantization == "nf4" and q == "int8")]

    def best_cap(enc_off: bool, quant: str | None) -> tuple[int | None, int]:
        """The largest cap that fits with these other changes (or the smallest tried, if none does)."""
        last = None
        for t in caps:
            last = (t, evaluate(enc_off, t, quant))
            if last[1] <= budget:
                return last
        return last if last else (None, evaluate(enc_off, None, quant))

    def change_text(enc_off: bool, tokens: int | None, quant: str | None) -> str:
        parts = []
        if enc_off:
            parts.append("encoder off the GPU while the VLM runs (registry offloads it to CPU)")
        if tokens:
            parts.append(f"pixel cap {tokens} visual tokens (--max-pixels {decl.pixels_for_tokens(tokens)})")
        if quant:
            parts.append(f"{quant} VLM (--quant {quant}; bitsandbytes, CUDA only)")
        return " + ".join(parts)

    # Each base change (encoder off, a quantisation, or both); a lower pixel cap is added only where the
    # base change alone does not fit, at the largest cap that then fits.
    bases: list[tuple[bool, str | None]] = [(True, None)] if has_encoder else []
    bases.append((False, None))
    for q in quants:
        bases += [(False, q), (True, q)] if has_encoder else [(False, q)]
    seen = set()
    for enc_off, q in bases:
        tries = [] if (enc_off, q) == (False, None) else [(enc_off, None, q)]
        if caps and (not tries or evaluate(*tries[0]) > budget):
            tries.append((enc_off, best_cap(enc_off, q)[0], q))
        for c in tries:
            if c not in seen:
                seen.add(c)
                t = evaluate(*c)
                plan.options.append(Option(change_text(*c), t, t <= budget))
    fitting = [o for o in plan.options if o.fits]
    plan.recommendation = fitting[0].change if fitting else None


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SpecError(f"image size {text!r}: write HEIGHTxWIDTH, e.g. 1024x1024") from None
    return h, w
