"""The in-process System 2 backend: a VLM folder loaded through transformers, leased from the registry.

One generation path for all text (rationales, class descriptions, reflections): `vlm_generate`, greedy, left
padded, stopping at the family's end-of-turn token (<|im_end|> for Qwen). One scoring path: a single forward with `logits_to_keep=1` and the option
letters' log-probabilities at the next-token position.

The model is leased from the registry for the duration of each call only (so the encoder can be offloaded
while it runs, and back afterwards); this object holds the spec, never the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from fgvr.backends.base import LETTERS, BackendError, BackendOptions, Generated, OptionScores, user_turn

if TYPE_CHECKING:
    from fgvr.models.family import VlmDeclaration
    from fgvr.models.spec import ModelSpec

NAME = "transformers"
SERVED = False
CPU_BATCH = 4  # prompts per forward on CPU (memory is not the limit there; speed is)
MAX_AUTO_BATCH = 8
PLANNED_TEXT_TOKENS = 400  # the prompt text `fgvr memory plan` assumes per query


FALLBACK = True  # any folder or model name that no other backend claims: parse_spec says what is wrong with it


def claims(text: str) -> bool:
    return isinstance(text, str)


def open_backend(text: str, options: BackendOptions) -> "TransformersVlm":
    """A local folder of a VLM family (a model name gets parse_spec's "fetch it to ..." error). The pixel cap
    is the family's: --max-visual-tokens on its grid, else its default."""
    from fgvr.models import families
    from fgvr.models.spec import parse_spec

    spec = parse_spec(text, device=options.device, dtype=options.dtype, quantization=options.quantization,
                      min_pixels=options.min_pixels)
    fam = families.get(spec.family)
    if fam.vlm is None:
        titles = ", ".join(f.title for f in families.by_role("vlm"))
        raise BackendError(f"--vlm must be a VLM model folder ({titles}); {spec.source} is a {fam.title} model")
    if options.family and options.family != fam.name:  # --vlm-family is for served models; a folder says its own
        try:
            given = families.vlm_family(options.family).title
        except ValueError as e:
            raise BackendError(f"--vlm-family {options.family}: {e}") from None
        raise BackendError(f"--vlm-family {options.family} ({given}), but {spec.source} is a {fam.title} model "
                           "(its config.json): leave --vlm-family out for a local folder")
    if options.max_pixels or options.max_visual_tokens:
        spec = spec.replace(max_pixels=options.max_pixels or fam.vlm.pixels_for_tokens(options.max_visual_tokens))
    return TransformersVlm(spec, batch_size=options.batch_size)


def render_chat(processor: Any, messages: list[dict]) -> str:
    """The chat template's text for a conversation, ending with the assistant prefix."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def vlm_inputs(vlm: Any, texts: list[str], images: list[Image.Image]) -> Any:
    """Tokenise a batch (left-padded, so the last position of every row is its next-token position) with
    the pixel cap of the spec, on the model's device; pixel values in the model's dtype."""
    spec = vlm.spec
    decl = _declaration(spec)
    kwargs = decl.processor_kwargs(spec.max_pixels, spec.min_pixels)
    inputs = vlm.processor(text=texts, images=[decl.fit_pixels(im, spec.max_pixels, spec.min_pixels) for im in images]
                           or None, padding=True, padding_side="left", return_tensors="pt", **kwargs)
    param = next(vlm.model.parameters())
    inputs = inputs.to(param.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


def _declaration(spec: "ModelSpec") -> "VlmDeclaration":
    from fgvr.models import families

    return families.vlm_declaration(spec.family)


def letter_token_ids(tokenizer: Any, prompt: str, k: int) -> list[int]:
    """The token the model would emit for each option letter right after the assistant prefix.

    After Qwen's '<|im_start|>assistant\\n' the letter is its own token without a leading space ('A' = 32,
    not ' A' = 362); checked here by tokenising prefix+letter rather than assumed.
    """
    tail = prompt[-64:]
    base = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:k]:
        full = tokenizer(tail + letter, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise RuntimeError(f"option letter {letter!r} does not tokenise as one token after the prompt")
        ids.append(full[-1])
    return ids


def vlm_generate(vlm: Any, texts: list[str], images: list[Image.Image],
                 max_new_tokens: int) -> list[tuple[str, int, int]]:
    """Greedy generation for a batch of rendered prompts: (text, tokens in, tokens out) per row. `images`
    are all the batch's images in prompt order (a prompt may hold several)."""
    import torch

    inputs = vlm_inputs(vlm, texts, images)
    tok = vlm.tokenizer
    ends = [tok.convert_tokens_to_ids(t) for t in _declaration(vlm.spec).stop_tokens]
    stop = [i for i in (*ends, tok.pad_token_id, tok.eos_token_id)
            if isinstance(i, int) and i >= 0 and i != tok.unk_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=stop)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    results = []
    for row, mask in zip(new, inputs["attention_mask"]):
        n_out = next((j for j, t in enumerate(row) if t in stop), len(row))
        text = tok.decode(row[:n_out], skip_special_tokens=True).strip()
        results.append((text, int(mask.sum()), n_out))
    return results


def auto_batch_size(vlm: Any) -> int:
    """Prompts per forward that fit the GPU budget next to what the registry already holds there, from the
    same per-prompt working memory `fgvr memory plan` computes (KV, activations, logits at the pixel cap).
    On CPU memory is not the limit: CPU_BATCH."""
    from fgvr.models import registry
    from fgvr.models.plan import CUDA_CONTEXT_BYTES, workload

    device = str(vlm.device)
    if not device.startswith("cuda"):
        return CPU_BATCH
    reg = registry.process_registry()
    budget = reg.budget(device)
    if budget is None:
        return CPU_BATCH
    spare = budget - reg.held_bytes(device) - CUDA_CONTEXT_BYTES
    per_prompt = workload(vlm.model.config.to_dict(), vlm.spec.dtype, vlm.spec.max_pixels,
                          text_tokens=PLANNED_TEXT_TOKENS, new_tokens=1, batch=1,
                          vlm=_declaration(vlm.spec)).working_bytes
    return max(1, min(MAX_AUTO_BATCH, spare // max(1, per_prompt)))


class TransformersVlm:
    """A VLM in this process (see the module docstring)."""

    name = NAME
    served = SERVED

    def __init__(self, spec: "ModelSpec", batch_size: int | None = None) -> None:
        self.spec = spec
        self.batch_size = batch_size
        self.last_batch_size: int | None = None

    def _batch(self, vlm: Any) -> int:
        self.last_batch_size = self.batch_size or auto_batch_size(vlm)
        return self.last_batch_size

    def score_options(self, questions: Sequence[str], images: Sequence[Image.Image],
                      n_options: Sequence[int]) -> list[OptionScores]:
        import torch

        from fgvr.models import registry

        out: list[OptionScores] = []
        if not questions:
            return out
        with registry.use(self.spec) as vlm:
            step = self._batch(vlm)
            for i in range(0, len(questions), step):
                prompts = [render_chat(vlm.processor, [user_turn(q)]) for q in questions[i:i + step]]
                inputs = vlm_inputs(vlm, prompts, list(images[i:i + step]))
                with torch.inference_mode():
                    # logits_to_keep=1: only the next-token row is projected onto the 152k vocabulary; full
                    # logits would cost (tokens x 152k) per sample, ~0.4 GB in bf16 for a 1,300-token prompt.
                    logits = vlm.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
                logp = torch.log_softmax(logits, dim=-1)
                for row, (prompt, k) in enumerate(zip(prompts, n_options[i:i + step])):
                    ids = letter_token_ids(vlm.tokenizer, prompt, k)
                    out.append(OptionScores(probs=torch.softmax(logp[row, ids], dim=0).tolist(),
                                            tokens_in=int(inputs["attention_mask"][row].sum()), tokens_out=1))
        return out

    def generate(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
                 max_new_tokens: int) -> list[Generated]:
        from fgvr.models import registry

        out: list[Generated] = []
        if not conversations:
            return out
        with registry.use(self.spec) as vlm:
            step = self._batch(vlm)
            for i in range(0, len(conversations), step):
                texts = [render_chat(vlm.processor, c) for c in conversations[i:i + step]]
                flat = [im for ims in images[i:i + step] for im in ims]
                out += [Generated(t, n_in, n_out) for t, n_in, n_out in vlm_generate(vlm, texts, flat, max_new_tokens)]
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": NAME, "mode": "logits", "model": self.spec.name, "key": self.spec.key,
                "device": self.spec.device, "dtype": self.spec.dtype, "quantization": self.spec.quantization,
                "max_pixels": self.spec.max_pixels, "batch_size": self.batch_size or "auto"}
