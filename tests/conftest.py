"""Fixtures shared by every test area: tiny random checkpoints (built once per session, offline) and
small real photos. Keep only fixtures more than one area needs here; the rest belong in the test files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import tiny_models`

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel folder (config, safetensors, tokenizer, image processor) for from_pretrained."""
    return tiny_models.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    """A random SiglipModel folder, same layout as a hub SigLIP folder."""
    return tiny_models.build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A random Qwen2.5-VL folder with the real Qwen tokenizer and the Qwen2.5-VL chat template."""
    return tiny_models.build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def sample_photos():
    """scikit-learn's two sample photos (china.jpg: a temple, flower.jpg: a flower) as RGB PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]
