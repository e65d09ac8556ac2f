"""SigLIP 2 (naflex) and DINOv2/DINOv3 encoder families: a tiny random checkpoint of each goes through
`fgvr build-kb` and `fgvr evaluate` from the CLI, and the vectors the base stores are the model's own
forward on the same preprocessed pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import pattern_images
from PIL import Image

from fgvr.cli import cli
from fgvr.knowledge_base import load_knowledge_base
from fgvr.models import configs, registry
from fgvr.models.families import dinov2 as dino_family
from fgvr.models.families import siglip2 as siglip2_family
from fgvr.models.spec import ModelSpec, parse_spec


def _build_and_evaluate(tmp_path: Path, folder: Path):
    pattern_images(tmp_path / "support", 2, seed=0)
    pattern_images(tmp_path / "test", 1, seed=1)
    runner = CliRunner()
    r = runner.invoke(cli, ["build-kb", str(tmp_path / "support"), "--shots", "2", "--encoder", str(folder),
                            "--out", str(tmp_path / "kb")])
    assert r.exit_code == 0, r.output
    e = runner.invoke(cli, ["evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--slow-budget", "0",
                            "--out", str(tmp_path / "eval")])
    assert e.exit_code == 0, e.output
    kb = load_knowledge_base(tmp_path / "kb")
    images = [Image.open(tmp_path / "support" / p if not Path(p).is_absolute() else p)
              for p in kb.support_paths]
    return kb, images


def _kb_rows(kb) -> torch.Tensor:
    return kb.exemplars


def test_dino_features_through_the_cli_are_the_models_forward(tmp_path, tiny_dino_dir):
    kb, images = _build_and_evaluate(tmp_path, tiny_dino_dir)
    spec = parse_spec(str(tiny_dino_dir))
    model_type = json.loads((tiny_dino_dir / "config.json").read_text())["model_type"]
    assert spec.family == model_type and kb.encoder_spec["family"] == model_type
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_dino_dir).eval()
    # the model card's transform, by hand: shorter side 256 bicubic, central 224, ImageNet mean/std
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = []
    for im in images:
        big = im.convert("RGB").resize((256, 256), Image.BICUBIC).crop((16, 16, 240, 240))
        pixels.append((torch.from_numpy(np.asarray(big, dtype=np.float32)).permute(2, 0, 1)
                       / 255.0 - mean) / std)
    with torch.no_grad():
        out = model(pixel_values=torch.stack(pixels))
    want = torch.nn.functional.normalize(out.pooler_output, dim=-1)
    assert torch.allclose(_kb_rows(kb), want, atol=1e-5)


def test_dino_mean_pooling_excludes_cls_and_registers(tiny_dino_dir, sample_photos):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_dino_dir).eval()
    registers = getattr(model.config, "num_register_tokens", 0) or 0
    with registry.use(ModelSpec.create("dino_mean", tiny_dino_dir)) as enc, \
            registry.use(parse_spec(str(tiny_dino_dir))) as cls_enc:
        pixels = enc.preprocess(sample_photos)
        assert pixels.shape == (2, 3, 224, 224) and torch.equal(pixels, cls_enc.preprocess(sample_photos))
        got, cls_got = enc.encode_pixels(pixels), cls_enc.encode_pixels(pixels)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape[1] == 1 + registers + (224 // model.config.patch_size) ** 2
    want = torch.nn.functional.normalize(hidden[:, 1 + registers:].mean(1), dim=-1)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, cls_got, atol=1e-2)


def test_mean_pool_marker_makes_the_folder_dino_mean(tmp_path, tiny_dino_dir):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dino_dir, folder)
    (folder / dino_family.MEAN_POOL_MARKER).touch()
    assert parse_spec(str(folder)).family == "dino_mean"


def test_siglip2_naflex_features_and_text_through_the_cli(tmp_path, tiny_siglip2_dir):
    from transformers import AutoTokenizer, Siglip2ImageProcessor, Siglip2Model

    kb, images = _build_and_evaluate(tmp_path, tiny_siglip2_dir)
    assert kb.encoder_spec["family"] == "siglip2"
    model = Siglip2Model.from_pretrained(tiny_siglip2_dir).eval()
    processor = Siglip2ImageProcessor.from_pretrained(tiny_siglip2_dir)
    inputs = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 16  # the folder's patch budget
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.get_image_features(**inputs), dim=-1)
    assert torch.allclose(_kb_rows(kb), want, atol=1e-5)
    # text prototypes: 64-token max_length padding, no attention mask, as the model card's processor
    tok = AutoTokenizer.from_pretrained(tiny_siglip2_dir)
    with registry.use(parse_spec(str(tiny_siglip2_dir))) as enc:
        got = enc.encode_texts(["a photo of a cardinal."])
    ids = tok(["a photo of a cardinal."], padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want_text = torch.nn.functional.normalize(model.get_text_features(input_ids=ids), dim=-1)
    assert torch.allclose(got, want_text, atol=1e-5)


def test_siglip2_patch_budget_follows_the_spec(tiny_siglip2_dir, sample_photos):
    spec = parse_spec(str(tiny_siglip2_dir), image_size=48)  # (48 / 8)^2 = 36 patches
    with registry.use(spec) as enc:
        packed = enc.preprocess(sample_photos)
        patches, mask, shapes = siglip2_family.unpack(packed)
        assert patches.shape[1] == 36 and enc.image_size == 48
        assert all(int(h) * int(w) <= 36 for h, w in shapes) and torch.equal(mask.sum(1), shapes.prod(1))
        # china.jpg is 640x427: the grid keeps its landscape aspect
        assert shapes[0, 1] > shapes[0, 0]
        assert enc.encode_pixels(packed).shape == (2, 32)


@pytest.mark.parametrize("name,millions", [("dinov2-small", 22.06), ("dinov2-giant", 1136.5),
                                           ("dinov3-vitl16", 303.1), ("dinov3-vith16plus", 840.6),
                                           ("siglip2-base-patch16-naflex", 375.2),
                                           ("siglip2-so400m-patch14-384", 1136.0)])
def test_known_configs_build_the_published_sizes(name, millions):
    from fgvr.models.families import architecture, get

    family, config = architecture(name)
    with torch.device("meta"):
        model = get(family).build_meta(config, torch.float32)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.5


def test_estimate_before_loading_equals_loaded_bytes(tiny_siglip2_dir, tiny_dino_dir):
    from fgvr.models import families

    for folder in (tiny_siglip2_dir, tiny_dino_dir):
        spec = parse_spec(str(folder), dtype="bf16")
        estimate = families.estimate_bytes(spec)
        with registry.use(spec) as enc:
            loaded = sum(t.numel() * t.element_size() for m in enc.torch_modules()
                         for t in list(m.parameters()) + list(m.buffers()))
        assert estimate == loaded


def test_siglip2_refuses_views_that_scrambled_its_packed_patches(tiny_siglip2_dir, sample_photos):
    with registry.use(parse_spec(str(tiny_siglip2_dir))) as enc:
        packed = enc.preprocess(sample_photos)
        with pytest.raises(ValueError, match="test-time views"):
            enc.encode_pixels(packed.flip(-1))
        with pytest.raises(ValueError, match="packed patches"):
            enc.encode_pixels(torch.zeros(2, 3, 32, 32)[:, 0])
