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
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2.5-vl-72b": "Qwen/Qwen2.5-VL-72B-Instruct",
}
