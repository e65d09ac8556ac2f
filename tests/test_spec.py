"""ModelSpec: every spelling of one model normalises to one key; everything that changes the loaded
weights or where they live changes the key; bad specs are refused with what to do."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from fgvr.models import ModelSpec, SpecError, parse_spec
from fgvr.models.families.qwen_vl import DEFAULT_MAX_PIXELS
from fgvr.models.spec import normalise_device, normalise_dtype


@pytest.fixture()
def qwen_folder(tmp_path):
    d = tmp_path / "models" / "qwen-small"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (d / "model.safetensors").write_bytes(b"0" * 100)
    return d


def test_spellings_normalise_to_one_key(qwen_folder, monkeypatch):
    monkeypatch.chdir(qwen_folder.parent.parent)
    keys = {
        parse_spec("models/qwen-small", device="cuda", dtype="bf16").key,
        parse_spec("./models/qwen-small/", device="cuda:0", dtype="bfloat16").key,
        parse_spec(str(qwen_folder), device="CUDA:0", dtype="BF16").key,
        parse_spec("models/../models/qwen-small", device=" cuda ", dtype="bfloat16").key,
    }
    assert len(keys) == 1


@pytest.mark.parametrize("change", [
    {"dtype": "fp16"}, {"device": "cpu"}, {"device": "cuda:1"}, {"quantization": "int8"},
    {"max_pixels": 256 * 28 * 28},
])
def test_what_changes_the_loaded_model_changes_the_key(qwen_folder, change):
    base = parse_spec(str(qwen_folder), device="cuda", dtype="bf16")
    assert base.replace(**change).key != base.key


def test_new_weights_in_the_same_folder_change_the_key(qwen_folder):
    before = parse_spec(str(qwen_folder)).key
    (qwen_folder / "model.safetensors").write_bytes(b"0" * 101)
    assert parse_spec(str(qwen_folder)).key != before


def test_qwen_gets_the_default_pixel_cap(qwen_folder):
    spec = parse_spec(str(qwen_folder))
    assert spec.family == "qwen2_5_vl" and spec.max_pixels == DEFAULT_MAX_PIXELS == 1280 * 28 * 28
    assert "maxpx=1003520" in spec.key


def test_efficientnet_names():
    a, b = parse_spec("efficientnet-lite0"), parse_spec("lite0")
    assert a == b and a.family == "efficientnet" and a.source == "efficientnet-lite0" and a.device == "cpu"
    assert parse_spec("EfficientNet-Lite2").source == "efficientnet-lite2"


def test_spec_is_an_immutable_hashable_value(qwen_folder):
    s = parse_spec(str(qwen_folder))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dtype = "float16"  # type: ignore[misc]
    assert {s: 1}[parse_spec(str(qwen_folder))] == 1
    assert ModelSpec(**s.to_json()) == s


def test_normalisers():
    assert normalise_device("cuda") == normalise_device("cuda:0") == "cuda:0"
    assert normalise_device(None) == "cpu"
    assert normalise_dtype("half") == "float16" and normalise_dtype(None) == "float32"
    with pytest.raises(SpecError, match="unknown device"):
        normalise_device("tpu")
    with pytest.raises(SpecError, match="unknown dtype"):
        normalise_dtype("int4")


def test_known_hub_name_is_refused_with_what_to_fetch():
    with pytest.raises(SpecError, match="Qwen/Qwen2.5-VL-7B-Instruct") as e:
        parse_spec("qwen2.5-vl-7b")
    assert "nothing is downloaded" in str(e.value) and "huggingface-cli download" in str(e.value)


def test_folder_without_config_or_with_unknown_model_is_refused(tmp_path):
    with pytest.raises(SpecError, match="no config.json"):
        parse_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SpecError, match="not supported"):
        parse_spec(str(tmp_path))
    with pytest.raises(SpecError, match="neither a known model name"):
        parse_spec(str(tmp_path / "missing"))


def test_bad_family_and_quantisation_are_refused():
    with pytest.raises(SpecError, match="unknown model family"):
        ModelSpec.create("resnet", "/x")
    with pytest.raises(SpecError, match="unknown quantisation"):
        ModelSpec.create("clip", "/x", quantization="int3")


def test_a_vlm_defaults_to_bf16_on_cuda_and_fp32_on_cpu(tiny_qwen_dir):
    """A 7B VLM in fp32 on a GPU would take 33 GB instead of 16.6 GB: the default follows the device."""
    assert parse_spec(str(tiny_qwen_dir), device="cuda").dtype == "bfloat16"
    assert parse_spec(str(tiny_qwen_dir), device="cpu").dtype == "float32"
    assert parse_spec(str(tiny_qwen_dir), device="cuda", dtype="fp16").dtype == "float16"
    assert parse_spec("efficientnet-lite0", device="cuda").dtype == "float32"  # encoders keep their default


def test_cli_vlm_options_become_the_spec_and_the_budget(tiny_qwen_dir):
    from fgvr.cli import open_vlm
    from fgvr.models import registry

    opts = {"vlm_dtype": "fp16", "quant": "int8", "max_visual_tokens": 256, "gpu_budget": "18GiB"}
    try:
        backend = open_vlm(str(tiny_qwen_dir), "cuda", opts)
        assert not backend.served
        spec = backend.spec
        assert (spec.dtype, spec.quantization, spec.max_pixels, spec.device) == ("float16", "int8", 256 * 28 * 28,
                                                                                "cuda:0")
        assert registry.process_registry().budget("cuda:0") == 18 * 2**30
    finally:
        registry.set_budget("cuda:0", None)
    assert open_vlm(None, "cpu", {}) is None
    with pytest.raises(Exception, match="Qwen2.5-VL"):
        open_vlm("efficientnet-lite0", "cpu", {})


def test_a_text_only_model_as_image_encoder_is_one_line_and_not_offered(tmp_path):
    from click.testing import CliRunner

    from fgvr.cli import cli
    from fgvr.models.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="text-only") as e:
        parse_spec("minilm", role="image-encoder")
    assert "minilm" not in str(e.value).split("known:")[1]
    with pytest.raises(SpecError) as e:
        parse_spec("nosuch", role="image-encoder")
    assert "minilm" not in str(e.value) and "lite0" in str(e.value)
    data = tmp_path / "d"
    for c in "ab":
        (data / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(data / c / "0.png")
    r = CliRunner().invoke(cli, ["build-kb", str(data), "--out", str(tmp_path / "kb"), "--encoder", "minilm", "-k", "1"])
    assert r.exit_code == 5 and "text-only" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "kb").exists()
