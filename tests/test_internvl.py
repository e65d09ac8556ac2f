"""The InternVL3 family on a tiny random checkpoint (the real Qwen tokenizer with InternVL's image tokens at
their real ids): `fgvr build-kb` writes class descriptions through its `generate`, `fgvr evaluate` scores
options with it, and those probabilities are a hand-run forward of the same model; its plans come from the
real InternVL3 architectures and its tile grid is the real processor's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import pattern_images
from PIL import Image

import tiny_models
from fgvr.cli import cli
from fgvr.models import families, parse_spec, registry
from fgvr.models.families import internvl
from fgvr.models.plan import make_plan, model_size
from fgvr.models.serve_plan import make_serve_plan


@pytest.fixture(scope="module")
def tiny_internvl_dir(tmp_path_factory):
    return tiny_models.build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"), talkative=True)


def test_tiny_folder_is_the_internvl_family_with_the_real_token_ids(tiny_internvl_dir):
    spec = parse_spec(str(tiny_internvl_dir))
    assert spec.family == "internvl"
    assert spec.max_pixels == internvl.DEFAULT_MAX_TILES * 448 * 448  # the spec's cap, not the folder's 12 tiles
    with registry.use(spec) as vlm:
        tok = vlm.tokenizer
        # Qwen2.5's vocabulary + InternVL3's image tokens where the InternVL3 tokenizer has them
        assert tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [151665, 151666, 151667]
        assert len(tok) == 151674 == vlm.model.config.text_config.vocab_size
        assert vlm.model.config.image_token_id == 151667
        assert vlm.processor.image_processor.max_patches == internvl.DEFAULT_MAX_TILES
        for h, w in ((56, 56), (200, 300), (90, 400)):  # the loaded model's count is its processor's own
            image = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
            inputs = vlm.processor(text=["<IMG_CONTEXT>"], images=[image], return_tensors="pt",
                                   **internvl.processor_kwargs(spec.max_pixels, spec.min_pixels))
            assert int((inputs["input_ids"] == 151667).sum()) == vlm.visual_tokens(h, w) > 0


def test_descriptions_and_option_scores_through_the_cli_are_the_models_forward(tmp_path, tiny_clip_dir,
                                                                                tiny_internvl_dir, monkeypatch):
    """build-kb writes one description per class through InternVL's generate; evaluate sends every image to
    System 2 and its option probabilities equal processor + model + softmax over the letter tokens by hand."""
    from fgvr.backends import transformers_vlm
    from fgvr.backends.transformers_vlm import TransformersVlm, letter_token_ids, render_chat, user_turn

    pattern_images(tmp_path / "support", 2, seed=0)
    pattern_images(tmp_path / "test", 1, seed=1)
    runner = CliRunner()
    r = runner.invoke(cli, ["build-kb", str(tmp_path / "support"), "--shots", "2", "--encoder", str(tiny_clip_dir),
                            "--vlm", str(tiny_internvl_dir), "--out", str(tmp_path / "kb")])
    assert r.exit_code == 0, r.output
    descriptions = json.loads((tmp_path / "kb" / "descriptions.json").read_text())
    assert descriptions and all(isinstance(t, str) and t.strip() for t in descriptions.values())

    seen: list[tuple[str, Image.Image, int]] = []
    original = TransformersVlm.score_options

    def recording(self, questions, images, n_options):
        seen.extend(zip(questions, images, n_options))
        return original(self, questions, images, n_options)

    monkeypatch.setattr(transformers_vlm.TransformersVlm, "score_options", recording)
    e = runner.invoke(cli, ["evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--slow-budget", "1",
                            "--vlm", str(tiny_internvl_dir), "--out", str(tmp_path / "eval")])
    assert e.exit_code == 0, e.output
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    slowed = [row for row in rows if row.get("slow_ran")]
    assert slowed and len(seen) == len(slowed)

    spec = parse_spec(str(tiny_internvl_dir))
    want = []
    with registry.use(spec) as vlm:
        for question, image, k in seen:
            prompt = render_chat(vlm.processor, [user_turn(question)])
            assert prompt.startswith("<|im_start|>user\n<IMG_CONTEXT>\n")  # the -hf chat template
            inputs = vlm.processor(text=[prompt], images=[image], return_tensors="pt",
                                   max_patches=internvl.DEFAULT_MAX_TILES, min_patches=1)
            n_tiles = inputs["pixel_values"].shape[0]
            assert (inputs["input_ids"] == 151667).sum() == n_tiles * 4  # 4 tokens per tiny 56-pixel tile
            with torch.inference_mode():
                logits = vlm.model(**inputs).logits[0, -1].float()
            ids = letter_token_ids(vlm.tokenizer, prompt, k)
            assert ids == [32, 33, 34, 35, 36][:k]  # 'A'.. as Qwen tokenises them after the assistant prefix
            want.append(torch.softmax(logits[ids], 0).tolist())
    got = {tuple(round(c["slow"], 7) for c in row["candidates"]) for row in slowed}
    assert len(got) == len(want)
    for w in want:
        assert any(np.allclose(w, g, atol=1e-5) for g in got), (w, got)


@pytest.mark.parametrize("size", [(100, 100), (480, 640), (1024, 1024), (300, 1500), (2000, 500), (900, 901)])
@pytest.mark.parametrize("tiles", [1, 4, 12])
def test_visual_tokens_are_what_the_real_processor_makes(size, tiles):
    """The family's tile grid against transformers' GotOcr2ImageProcessor at the real 448-pixel tiles."""
    from transformers import GotOcr2ImageProcessor

    ip = GotOcr2ImageProcessor(size={"height": 448, "width": 448})  # crop_to_patches off, as the bare default
    h, w = size
    image = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
    decl = families.vlm_declaration("internvl")
    cap = tiles * 448 * 448
    out = ip(images=[image], **decl.processor_kwargs(cap, 448 * 448), return_tensors="np")
    assert decl.visual_tokens(h, w, cap) == int(out["num_patches"][0]) * 256 == out["pixel_values"].shape[0] * 256
    assert decl.visual_tokens(h, w, cap) <= decl.tokens_at_cap(cap)
    assert decl.fit_pixels(image, cap).size == image.size  # sent as it is: the tiling is decided on the original


def test_a_visual_token_budget_becomes_a_tile_cap_that_keeps_to_it():
    decl = families.vlm_declaration("internvl")
    assert decl.tokens_at_cap(internvl.DEFAULT_MAX_PIXELS) == 1280  # 4 tiles + the thumbnail
    for budget in (256, 300, 512, 768, 1024, 1280, 3328):
        cap = decl.pixels_for_tokens(budget)
        assert cap % (448 * 448) == 0 and decl.tokens_at_cap(cap) <= budget
    assert decl.tokens_at_cap(decl.pixels_for_tokens(3328)) == 3328  # the folders' own 12 tiles + thumbnail
    assert decl.processor_kwargs(decl.pixels_for_tokens(768), 448 * 448) == {"crop_to_patches": True, "max_patches": 2,
                                                                          "min_patches": 1}


def test_memory_plan_weights_are_the_real_internvl3_8b(tmp_path):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from fgvr.models.configs import INTERNVL
    from fgvr.models.footprint import module_bytes, module_params

    out = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "internvl3-8b", "--encoder", "none", "--dtype", "bf16",
                                   "--budget", "24GiB", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(InternVLConfig(**json.loads(json.dumps(
            INTERNVL["internvl3-8b"]))), dtype=torch.bfloat16)
    assert plan["models"][0]["weight_bytes"] == module_bytes(model)
    assert plan["models"][0]["params"] == module_params(model)
    assert 7.9e9 < module_params(model) < 8.0e9  # the model card's 7.94 B
    assert plan["workload"]["visual_tokens"] == 1280 and plan["workload"]["kv_bytes_per_token"] == 57_344
    # the 38B's InternViT-6B and Qwen2.5-32B, the 1B's untied Qwen2.5-0.5B
    assert 38.0e9 < model_size("internvl3-38b", "vlm", "bf16").params < 38.8e9
    assert 0.9e9 < model_size("internvl3-1b", "vlm", "bf16").params < 1.0e9
    tight = make_plan("internvl3-8b", None, budget=15 * 2**30)
    assert not tight.fits and tight.recommendation  # int8 or fewer tiles


def test_memory_plan_sizes_a_local_internvl_folder(tiny_internvl_dir):
    from fgvr.models.plan import estimate_spec_bytes

    spec = parse_spec(str(tiny_internvl_dir), dtype="bf16")
    assert estimate_spec_bytes(spec) == families.estimate_bytes(spec)
    with registry.use(parse_spec(str(tiny_internvl_dir))) as vlm:
        from fgvr.models.footprint import module_bytes

        assert families.estimate_bytes(vlm.spec) == module_bytes(vlm.model)


def test_serve_flags_give_the_engines_the_tile_cap():
    v = make_serve_plan("vllm", "internvl3-8b", 24 * 2**30, encoder=None)
    cmd = v.command()
    assert "OpenGVLab/InternVL3-8B-hf" in cmd
    assert "--mm-processor-kwargs '{\"max_dynamic_patch\": 4, \"min_dynamic_patch\": 1}'" in cmd
    assert v.visual_tokens == 1280 and v.max_model_len == 4608 and v.fits
    six = make_serve_plan("vllm", "internvl3-8b", 24 * 2**30, encoder=None, max_pixels=6 * 448 * 448)
    assert '"max_dynamic_patch": 6' in six.command() and six.visual_tokens == 7 * 256
    s = make_serve_plan("sglang", "internvl3-8b", 24 * 2**30, encoder=None)
    assert "sglang.launch_server" in s.command() and "SGLANG_IMAGE_MAX_PIXELS" not in s.command()
    r = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "internvl3-8b", "--serve", "vllm", "--gpu", "24GiB",
                                 "--max-visual-tokens", "768"])
    assert r.exit_code == 0, r.output
    assert '"max_dynamic_patch": 2' in r.output  # 768 tokens = 2 tiles + the thumbnail


def test_missing_internvl_folder_names_what_to_fetch(tmp_path):
    from fgvr.models.spec import ModelSpec

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    spec = parse_spec(str(tmp_path))
    assert spec.family == "internvl"
    with pytest.raises(Exception, match="huggingface-cli download OpenGVLab/InternVL3-8B-hf"):
        families.load(spec)
    assert isinstance(spec, ModelSpec)


def test_fit_hints_name_fewer_tiles_and_quantisation(tiny_internvl_dir):
    spec = parse_spec(str(tiny_internvl_dir))
    hints = families.fit_hints(spec, "cuda")
    assert any("int8" in h for h in hints)
    assert any("--max-visual-tokens 1024 gives 3" in h for h in hints)  # 3 tiles + the thumbnail
