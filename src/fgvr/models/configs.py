"""Known model names: where to fetch them (nothing downloads at run time) and their architecture configs.

The architecture configs let `fgvr memory plan` build the real networks on the meta device, so sizes are
computed from the architecture itself rather than quoted.
"""

from __future__ import annotations

HUB_IDS: dict[str, str] = {
    "clip-vit-b32": "openai/clip-vit-base-patch32",
    "clip-vit-b16": "openai/clip-vit-base-patch16",
    "clip-vit-l14": "openai/clip-vit-large-patch14",
    "siglip-base": "google/siglip-base-patch16-224",
    "siglip2-base-patch16-224": "google/siglip2-base-patch16-224",
    "siglip2-base-patch16-256": "google/siglip2-base-patch16-256",
    "siglip2-base-patch16-384": "google/siglip2-base-patch16-384",
    "siglip2-base-patch16-512": "google/siglip2-base-patch16-512",
    "siglip2-large-patch16-256": "google/siglip2-large-patch16-256",
    "siglip2-large-patch16-384": "google/siglip2-large-patch16-384",
    "siglip2-large-patch16-512": "google/siglip2-large-patch16-512",
    "siglip2-so400m-patch14-384": "google/siglip2-so400m-patch14-384",
    "siglip2-so400m-patch16-256": "google/siglip2-so400m-patch16-256",
    "siglip2-so400m-patch16-384": "google/siglip2-so400m-patch16-384",
    "siglip2-so400m-patch16-512": "google/siglip2-so400m-patch16-512",
    "siglip2-base-patch16-naflex": "google/siglip2-base-patch16-naflex",
    "siglip2-so400m-patch16-naflex": "google/siglip2-so400m-patch16-naflex",
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
    "dinov3-vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3-vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3-vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3-vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2.5-vl-72b": "Qwen/Qwen2.5-VL-72B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3-vl-32b": "Qwen/Qwen3-VL-32B-Instruct",
}


# --- architecture configs -----------------------------------------------------------------------------
# The fields of each model's config.json that decide its shapes, as published with the weights (hub ids
# above). `fgvr memory plan` builds the networks from these on the meta device: no weights needed.

_QWEN_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def _qwen(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool,
          window_layers: int, vision_intermediate: int) -> dict:
    return _QWEN_COMMON | {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "max_window_layers": window_layers,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": vision_intermediate,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }


QWEN2_5_VL: dict[str, dict] = {
    # 3B ties its input embedding and lm_head (stored once); 7B/32B/72B do not.
    "qwen2.5-vl-3b": _qwen(2048, 11008, 36, 16, 2, 151936, True, 70, 3420),
    "qwen2.5-vl-7b": _qwen(3584, 18944, 28, 28, 4, 152064, False, 28, 3420),
    "qwen2.5-vl-32b": _qwen(5120, 27648, 64, 40, 8, 152064, False, 64, 3456),
    "qwen2.5-vl-72b": _qwen(8192, 29568, 80, 64, 8, 152064, False, 80, 3456),
}


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tie: bool, vision: tuple[int, int, int],
           deepstack: list[int]) -> dict:
    """A Qwen3-VL-*-Instruct config.json: every size has 8 KV heads of width 128, a 151,936-token vocabulary,
    interleaved M-RoPE and a 16-pixel-patch vision tower of `vision` = (depth, width, MLP width)."""
    depth, width, vision_intermediate = vision
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": tie,
        "text_config": {
            "model_type": "qwen3_vl_text", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
            "head_dim": 128, "hidden_act": "silu", "vocab_size": 151936, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-06, "rope_theta": 5000000, "attention_bias": False, "tie_word_embeddings": tie,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "bos_token_id": 151643, "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "qwen3_vl", "depth": depth, "hidden_size": width, "intermediate_size": vision_intermediate,
            "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": hidden, "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh",
            "deepstack_visual_indexes": deepstack,
        },
    }


QWEN3_VL: dict[str, dict] = {
    # 2B and 4B tie their input embedding and lm_head; 8B and 32B do not. 2B/4B share a 24-layer vision
    # tower of width 1024, 8B/32B a 27-layer one of width 1152.
    "qwen3-vl-2b": _qwen3(2048, 6144, 28, 16, True, (24, 1024, 4096), [5, 11, 17]),
    "qwen3-vl-4b": _qwen3(2560, 9728, 36, 32, True, (24, 1024, 4096), [5, 11, 17]),
    "qwen3-vl-8b": _qwen3(4096, 12288, 36, 32, False, (27, 1152, 4304), [8, 16, 24]),
    "qwen3-vl-32b": _qwen3(5120, 25600, 64, 64, False, (27, 1152, 4304), [8, 16, 24]),
}


def _clip(text: tuple[int, int, int, int], vision: tuple[int, int, int, int], patch: int, proj: int) -> dict:
    (th, ti, tl, ta), (vh, vi, vl, va) = text, vision
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": proj,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "hidden_size": th, "intermediate_size": ti, "num_hidden_layers": tl, "num_attention_heads": ta,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
            "projection_dim": proj, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": vh, "intermediate_size": vi, "num_hidden_layers": vl, "num_attention_heads": va,
            "image_size": 224, "patch_size": patch, "hidden_act": "quick_gelu", "projection_dim": proj,
        },
    }


CLIP: dict[str, dict] = {
    "clip-vit-b32": _clip((512, 2048, 12, 8), (768, 3072, 12, 12), 32, 512),
    "clip-vit-b16": _clip((512, 2048, 12, 8), (768, 3072, 12, 12), 16, 512),
    "clip-vit-l14": _clip((768, 3072, 12, 12), (1024, 4096, 24, 16), 14, 768),
}

SIGLIP: dict[str, dict] = {
    "siglip-base": {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "max_position_embeddings": 64, "vocab_size": 32000},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    },
}


def _siglip2_tower(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads}


# SigLIP 2 (google/siglip2-*): the fixed-resolution checkpoints are SiglipModel folders (model_type
# "siglip") with the 256k-token Gemma tokenizer; the naflex ones are Siglip2Model with a 16x16 grid of
# learned position embeddings resized to each image's patch grid. Text towers read 64 tokens.
_SIGLIP2_TOWERS = {
    "base": _siglip2_tower(768, 3072, 12, 12),
    "large": _siglip2_tower(1024, 4096, 24, 16),
    "so400m": _siglip2_tower(1152, 4304, 27, 16),
}


def _siglip2(size: str, patch: int, image: int | None) -> dict:
    tower = _SIGLIP2_TOWERS[size]
    text = tower | {"vocab_size": 256000, "max_position_embeddings": 64}
    if image is None:  # naflex
        return {"architectures": ["Siglip2Model"], "model_type": "siglip2", "text_config": text,
                "vision_config": tower | {"patch_size": patch, "num_patches": 256}}
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text,
            "vision_config": tower | {"patch_size": patch, "image_size": image}}


SIGLIP2: dict[str, dict] = {
    f"siglip2-{size}-patch{patch}-{image or 'naflex'}": _siglip2(size, patch, image)
    for size, patch, image in [
        ("base", 16, 224), ("base", 16, 256), ("base", 16, 384), ("base", 16, 512),
        ("large", 16, 256), ("large", 16, 384), ("large", 16, 512),
        ("so400m", 14, 384), ("so400m", 16, 256), ("so400m", 16, 384), ("so400m", 16, 512),
        ("base", 16, None), ("so400m", 16, None),
    ]
}


def _dinov2(hidden: int, layers: int, heads: int, swiglu: bool = False) -> dict:
    return {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "mlp_ratio": 4, "patch_size": 14,
            "image_size": 518, "layerscale_value": 1.0, "use_swiglu_ffn": swiglu}


DINOV2: dict[str, dict] = {
    "dinov2-small": _dinov2(384, 12, 6),
    "dinov2-base": _dinov2(768, 12, 12),
    "dinov2-large": _dinov2(1024, 24, 16),
    "dinov2-giant": _dinov2(1536, 40, 24, swiglu=True),
}


def _dinov3(hidden: int, intermediate: int, layers: int, heads: int, gated: bool = False) -> dict:
    return {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "patch_size": 16, "image_size": 224, "num_register_tokens": 4, "layerscale_value": 1.0,
            "use_gated_mlp": gated, "key_bias": False, "rope_theta": 100.0}


DINOV3: dict[str, dict] = {
    "dinov3-vits16": _dinov3(384, 1536, 12, 6),
    "dinov3-vitb16": _dinov3(768, 3072, 12, 12),
    "dinov3-vitl16": _dinov3(1024, 4096, 24, 16),
    "dinov3-vith16plus": _dinov3(1280, 5120, 32, 20, gated=True),
}

# EfficientNet-Lite: the network comes from efficientnet-lite-pytorch by name; input size as TF's builder.
EFFICIENTNET: dict[str, dict] = {
    "efficientnet-lite0": {"model_name": "efficientnet-lite0", "image_size": 224},
    "efficientnet-lite2": {"model_name": "efficientnet-lite2", "image_size": 260},
}


# --- InternVL3 (transformers format, OpenGVLab/InternVL3-*-hf) --------------------------------------------
# InternViT-300M-448px-V2.5 (1B/2B/8B) or InternViT-6B-448px-V2.5 (38B) + a pixel-shuffle MLP projector +
# a Qwen2.5 decoder with InternVL3's 151,674-token vocabulary. Values from the published config.json files
# (llm_config / vision_config of OpenGVLab/InternVL3-*, renamed as transformers'
# convert_internvl_weights_to_hf.py does: qkv_bias -> attention_bias, qk_normalization -> use_qk_norm).
HUB_IDS.update({
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
    "internvl3-38b": "OpenGVLab/InternVL3-38B-hf",
})

_INTERNVIT_300M = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-06,
    "hidden_act": "gelu", "image_size": [448, 448], "patch_size": [14, 14], "num_channels": 3,
    "use_absolute_position_embeddings": True, "layer_scale_init_value": 0.1, "use_mean_pooling": True,
    "model_type": "internvl_vision",
}
_INTERNVIT_6B = _INTERNVIT_300M | {
    "hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "num_attention_heads": 25,
    "attention_bias": False, "use_qk_norm": True, "norm_type": "rms_norm",
}


def _internvl(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tie: bool,
              vision: dict) -> dict:
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": tie,
        "vision_config": dict(vision),
        "text_config": {
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": 151674, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "tie_word_embeddings": tie, "use_sliding_window": False, "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    }


INTERNVL: dict[str, dict] = {
    # Decoders: Qwen2.5-0.5B/1.5B/7B/32B. InternVL3 unties the input embedding and lm_head in every size
    # (the chat configs' "tie_word_embeddings": false), so the 1B has 0.94 B parameters, not 0.80 B.
    "internvl3-1b": _internvl(896, 4864, 24, 14, 2, False, _INTERNVIT_300M),
    "internvl3-2b": _internvl(1536, 8960, 28, 12, 2, False, _INTERNVIT_300M),
    "internvl3-8b": _internvl(3584, 18944, 28, 28, 4, False, _INTERNVIT_300M),
    "internvl3-38b": _internvl(5120, 27648, 64, 40, 8, False, _INTERNVIT_6B),
}
