"""`fgvr memory plan --serve vllm|sglang`: the serving engine's command line that fits one GPU.

When System 2 is served, the VLM's memory is the engine's: it loads the weights once, profiles one forward
at its longest request, and gives what is left under its memory fraction to the paged KV cache. The sizes
here come from the same architectures as `fgvr memory plan` (weights on the meta device, KV bytes per
token and the per-request activation peak from `plan.workload`), so the two plans agree:

* `--max-model-len` / `--context-length`: the longest request fgvr sends: a class description (up to 3
  support images at the pixel cap, the prompt, the new tokens), rounded up to 256.
* `--limit-mm-per-prompt '{"image": 3}'`: the description prompt's images (option scoring sends one).
* the pixel cap, in the words the VLM family declares for each engine (`VlmDeclaration.serve_flags`:
  for Qwen2.5-VL vLLM's `--mm-processor-kwargs`, SGLang's `SGLANG_IMAGE_MAX_PIXELS`). fgvr resizes to the
  same cap before sending, so the server's own resize is a no-op.
* `--gpu-memory-utilization` (vLLM, the fraction of the GPU the engine may use in all) leaves fgvr's own
  process its share of the same GPU (the image encoder and a CUDA context); `--mem-fraction-static` (SGLang,
  weights + KV pool only) is that minus the activation peak and the engine's context.
* `--max-logprobs`: at least the option letters (top-k) and 20 (vLLM's default) for the top_logprobs mode.
* `--max-num-seqs` / `--max-running-requests`: the requests of the longest length the KV pool holds at once.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field

from fgvr.defaults import DEFAULTS
from fgvr.models import configs
from fgvr.models.footprint import format_bytes
from fgvr.models.plan import CUDA_CONTEXT_BYTES, model_size, resolve, vlm_family, workload
from fgvr.errors import SpecError

DESCRIPTION_IMAGES = 3  # the knowledge base's description prompt shows up to 3 support images
PROMPT_TEXT_TOKENS = 400  # question, options with descriptions, rules (as `fgvr memory plan` assumes)
LONGEST_NEW_TOKENS = 160  # the reflection step's answer (the longest text fgvr asks for)
ENGINES = ("vllm", "sglang")


@dataclass
class ServePlan:
    engine: str
    model: str  # hub id or folder to serve
    gpu_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int  # the engine's profiled peak for one longest request
    fgvr_bytes: int  # what fgvr's own process keeps on this GPU (encoder + its CUDA context)
    max_model_len: int
    images_per_prompt: int
    max_pixels: int
    min_pixels: int
    fraction: float  # --gpu-memory-utilization (vLLM) or --mem-fraction-static (SGLang)
    kv_tokens: int  # tokens the KV pool holds
    max_seqs: int  # longest requests held at once
    max_logprobs: int
    port: int
    fits: bool
    visual_tokens: int = 0  # per image at the cap, on the family's grid
    pixel_args: list[str] = field(default_factory=list)  # the family's words for this engine's pixel cap
    pixel_env: dict[str, str] = field(default_factory=dict)

    def command(self) -> str:
        env = "".join(f"{k}={shlex.quote(v)} " for k, v in self.pixel_env.items())
        if self.engine == "vllm":
            args = ["vllm", "serve", self.model, "--port", str(self.port), "--dtype", "bfloat16",
                    "--max-model-len", str(self.max_model_len),
                    "--limit-mm-per-prompt", f'{{"image": {self.images_per_prompt}}}', *self.pixel_args,
                    "--gpu-memory-utilization", f"{self.fraction:.2f}", "--max-logprobs", str(self.max_logprobs),
                    "--max-num-seqs", str(max(1, self.max_seqs))]
            return env + " ".join(shlex.quote(a) for a in args)
        args = ["python", "-m", "sglang.launch_server", "--model-path", self.model, "--port", str(self.port),
                "--dtype", "bfloat16", "--context-length", str(self.max_model_len), *self.pixel_args,
                "--mem-fraction-static", f"{self.fraction:.2f}", "--max-running-requests", str(max(1, self.max_seqs))]
        return env + " ".join(shlex.quote(a) for a in args)

    def format(self) -> str:
        gib = 2**30
        name = {"vllm": "vLLM", "sglang": "SGLang"}[self.engine]
        what = "--gpu-memory-utilization" if self.engine == "vllm" else "--mem-fraction-static"
        lines = [
            f"{name} on one GPU of {self.gpu_bytes / gib:.1f} GiB: {'fits' if self.fits else 'DOES NOT FIT'}",
            f"  weights {format_bytes(self.weight_bytes)}, activation peak of one longest request "
            f"{format_bytes(self.activation_bytes)}, KV {self.kv_bytes_per_token:,} B/token",
            f"  fgvr's own process keeps {format_bytes(self.fgvr_bytes)} on this GPU (encoder + CUDA context)",
            f"  longest request {self.max_model_len} tokens ({self.images_per_prompt} images at "
            f"{self.visual_tokens} visual tokens, prompt, answer); {what} {self.fraction:.2f}",
            f"  KV pool {self.kv_tokens:,} tokens = {self.max_seqs} longest requests at once "
            "(option-scoring requests are ~4x shorter: more fit)",
            "",
            "  " + self.command(),
        ]
        lines.append(f"  then: fgvr evaluate KB DATA --out RUN --vlm http://127.0.0.1:{self.port}/v1")
        if not self.fits:
            lines.append("  the weights and one request do not fit: lower --max-visual-tokens, a bigger GPU, "
                         "or a quantised checkpoint (AWQ/GPTQ) served by the engine")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self) | {"command": self.command()}


def make_serve_plan(engine: str, vlm: str = "qwen2.5-vl-7b", gpu_bytes: int = 24 * 2**30, *,
                    encoder: str | None = "clip-vit-b32", max_pixels: int | None = None,
                    min_pixels: int | None = None, top_k: int = DEFAULTS.top_k, port: int | None = None) -> ServePlan:
    """The engine's flags for `vlm` on a GPU of `gpu_bytes`, next to fgvr's encoder on the same GPU."""
    if engine not in ENGINES:
        raise SpecError(f"--serve {engine!r}: use vllm or sglang")
    label, family, cfg = resolve(vlm)
    decl = vlm_family(vlm, family).vlm
    max_pixels = max_pixels or decl.default_max_pixels
    min_pixels = decl.default_min_pixels if min_pixels is None else min_pixels
    weights = model_size(vlm, "vlm", "bf16").weight_bytes
    tokens = decl.tokens_at_cap(max_pixels)
    longest = DESCRIPTION_IMAGES * tokens + PROMPT_TEXT_TOKENS + LONGEST_NEW_TOKENS
    max_len = math.ceil(longest / 256) * 256
    # one longest request's activation peak: the vision tower runs per image, the LM prefill over it all
    work = workload(cfg, "bf16", max_pixels, text_tokens=max_len - tokens, new_tokens=0, vlm=decl)
    activation = max(work.vision_activation_bytes, work.lm_activation_bytes) + work.logits_bytes
    fgvr_bytes = CUDA_CONTEXT_BYTES + (model_size(encoder, "encoder", "fp16").weight_bytes if encoder else 0)
    # the engine may use what fgvr's process leaves, minus 2% for fragmentation, at most vLLM's default 0.9
    util = min(0.90, math.floor((1 - fgvr_bytes / gpu_bytes - 0.02) * 100) / 100)
    pool = util * gpu_bytes - weights - activation - CUDA_CONTEXT_BYTES
    kv_tokens = max(0, int(pool // work.kv_bytes_per_token))
    max_seqs = kv_tokens // max_len
    fraction = util if engine == "vllm" else math.floor((weights + max(0.0, pool)) / gpu_bytes * 100) / 100
    model = configs.HUB_IDS.get(label, vlm)
    pixel_args, pixel_env = decl.serve_flags(engine, max_pixels, min_pixels)
    return ServePlan(engine=engine, model=model, gpu_bytes=gpu_bytes, weight_bytes=weights,
                     kv_bytes_per_token=work.kv_bytes_per_token, activation_bytes=activation, fgvr_bytes=fgvr_bytes,
                     max_model_len=max_len, images_per_prompt=DESCRIPTION_IMAGES, max_pixels=max_pixels,
                     min_pixels=min_pixels, fraction=fraction, kv_tokens=kv_tokens, max_seqs=max_seqs,
                     max_logprobs=max(20, top_k), port=port or (8000 if engine == "vllm" else 30000),
                     fits=max_seqs >= 1, visual_tokens=tokens,
                     pixel_args=pixel_args, pixel_env=pixel_env)
