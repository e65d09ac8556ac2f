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


@pytest.fixture(scope="session")
def lite0_setup(tmp_path_factory):
    """A Lite0 base (3 classes x 3 shots) and one uninterrupted `fgvr evaluate` run over 14 test images
    (12 of known classes, 1 of a class the base does not know, 1 unreadable)."""
    from click.testing import CliRunner
    from fakes import pattern_images
    from PIL import Image

    from fgvr.cli import cli
    from fgvr.knowledge_base import build_knowledge_base

    root = tmp_path_factory.mktemp("lite0")
    pattern_images(root / "support", 3, seed=0)
    pattern_images(root / "test", 4, seed=1)
    (root / "test" / "yellow_half").mkdir()
    Image.new("RGB", (32, 32), (240, 230, 30)).save(root / "test" / "yellow_half" / "0.png")
    (root / "test" / "red_disc" / "broken.png").write_bytes(b"garbage")
    build_knowledge_base(root / "support", root / "kb", shots=3, progress=False)
    full = CliRunner().invoke(cli, ["evaluate", str(root / "kb"), str(root / "test"), "--slow-budget", "0.3",
                                    "--batch-size", "8", "--out", str(root / "full")])
    assert full.exit_code == 0, full.output
    return root, full


@pytest.fixture(scope="session")
def shapes_kb(tmp_path_factory) -> Path:
    """A Lite0 knowledge base of 3 classes x 3 shots, and 2 test images per class under ../test."""
    from fakes import write_shapes

    from fgvr.knowledge_base import build_knowledge_base

    root = tmp_path_factory.mktemp("serve")
    write_shapes(root / "support", 3, seed=0)
    write_shapes(root / "test", 2, seed=1)
    build_knowledge_base(root / "support", root / "kb", shots=3, progress=False)
    return root / "kb"


@pytest.fixture(scope="session")
def talkative_qwen_dir(tiny_qwen_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL that writes visible text where the plain one writes only newlines (no answer)."""
    return tiny_models.make_talkative(tiny_qwen_dir, tmp_path_factory.mktemp("talkative-qwen"))


@pytest.fixture(scope="session")
def vllm_qwen_dir(tmp_path_factory) -> Path:
    """The talkative tiny Qwen2.5-VL in the shape vLLM's CPU build serves (head_dim 32, `architectures`)."""
    plain = tiny_models.build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen-hd32"), head_dim=32)
    return tiny_models.make_talkative(plain, tmp_path_factory.mktemp("vllm-qwen"))


@pytest.fixture(scope="session")
def tiny_siglip2_dir(tmp_path_factory) -> Path:
    """A random naflex SigLIP 2 folder (Siglip2Model, Siglip2ImageProcessor, a 64-token tokenizer)."""
    return tiny_models.build_tiny_siglip2(tmp_path_factory.mktemp("tiny-siglip2"))


@pytest.fixture(scope="session", params=["dinov2", "dinov3_vit"])
def tiny_dino_dir(request, tmp_path_factory) -> Path:
    """A random DINOv2 and a random DINOv3 ViT folder (the test runs once with each)."""
    return tiny_models.build_tiny_dino(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
