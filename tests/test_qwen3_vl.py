"""The Qwen3-VL family on a tiny random checkpoint with the real Qwen tokenizer: option scoring through the
CLI equals a forward run by hand, the grid equals the real processor's, plans are the real architecture on
the meta device, the serve flags name its own pixel-cap keyword, and no module outside the family knows it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fgvr.cli import cli
from fgvr.models import configs, families, parse_spec

SRC = Path(__file__).resolve().parents[1] / "src" / "fgvr"


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    import tiny_models

    return tiny_models.build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="module")
def talkative_qwen3_dir(tiny_qwen3_dir, tmp_path_factory) -> Path:
    """The tiny Qwen3-VL with its newline and end tokens zeroed, so `generate` writes visible text."""
    import tiny_models

    return tiny_models.make_talkative(tiny_qwen3_dir, tmp_path_factory.mktemp("talkative-qwen3-vl"))


def _hub_image_processor():
    """The image processor as Qwen3-VL-*-Instruct's preprocessor_config.json makes it (transformers 4.57)."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                 merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.mark.parametrize("h, w", [(32, 32), (100, 150), (480, 640), (1536, 2048), (3000, 400), (33, 1000)])
def test_the_grid_is_the_real_processors(h, w):
    decl = families.vlm_declaration("qwen3_vl")
    ip = _hub_image_processor()
    image = Image.new("RGB", (w, h), "green")
    for max_pixels, min_pixels in ((decl.default_max_pixels, decl.default_min_pixels), (256 * 32 * 32, 16 * 32 * 32)):
        kwargs = decl.processor_kwargs(max_pixels, min_pixels)
        t, gh, gw = ip(images=[image], return_tensors="pt", **kwargs)["image_grid_thw"][0].tolist()
        assert t == 1
        assert decl.fitted_size(h, w, max_pixels, min_pixels) == (gh * 16, gw * 16)
        assert decl.visual_tokens(h, w, max_pixels, min_pixels) == gh * gw // 4


def test_spec_defaults_and_the_loaded_processor_take_the_specs_cap(tiny_qwen3_dir):
    from fgvr.models.families import qwen3_vl

    spec = parse_spec(str(tiny_qwen3_dir))
    assert spec.family == "qwen3_vl" and spec.max_pixels == 1280 * 32 * 32 and spec.min_pixels == 65536
    big = Image.new("RGB", (2048, 1536), "green")
    for cap in (None, 64):
        s = parse_spec(str(tiny_qwen3_dir), max_pixels=cap * 32 * 32 if cap else None, min_pixels=16 * 32 * 32)
        processor = qwen3_vl.load_processor(s)
        out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[big], return_tensors="pt",
                        **qwen3_vl.VLM.processor_kwargs(s.max_pixels, s.min_pixels))
        n = int((out["input_ids"] == 151655).sum())
        # the folder allows 16,384 tokens; the spec's cap wins, on the 32-pixel grid
        assert n == qwen3_vl.VLM.visual_tokens(1536, 2048, s.max_pixels, s.min_pixels) <= (cap or 1280)
    with pytest.raises(ValueError, match="image-only"):
        processor(text=["x"], videos=[[big]])


def test_chat_template_has_no_default_system_turn(tiny_qwen3_dir):
    from fgvr.backends.base import user_turn
    from fgvr.backends.transformers_vlm import render_chat
    from fgvr.models import registry

    with registry.use(parse_spec(str(tiny_qwen3_dir))) as vlm:
        text = render_chat(vlm.processor, [user_turn("Which?")])
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which?<|im_end|>\n<|im_start|>assistant\n"


def _hand_run_probs(folder: Path, question: str, image: Image.Image, k: int) -> list[float]:
    """Option probabilities computed without fgvr: the folder's tokenizer, chat template and image processor,
    the image placeholder expanded by hand, one forward of Qwen3VLForConditionalGeneration, log_softmax over
    the vocabulary, then renormalised over the letter tokens."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen3VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(folder, **families.hf_tokenizer_kwargs())
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ip = Qwen2VLImageProcessor.from_pretrained(folder)
    pixels = ip(images=[image], return_tensors="pt", size={"shortest_edge": 65536, "longest_edge": 1280 * 32 * 32})
    n = int(pixels["image_grid_thw"][0].prod()) // 4
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    enc = tok([text], return_tensors="pt")
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(**enc, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).logits
    logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCDEFGH"[:k]]
    assert letters == [32 + i for i in range(k)]  # the real Qwen ids: 'A' = 32 after the assistant prefix
    return torch.softmax(logp[letters], dim=0).tolist()


def test_cli_option_probabilities_equal_a_hand_run_forward(talkative_qwen3_dir, tmp_path):
    """build-kb writes the class descriptions through the family's `generate`; evaluate scores every image's
    options through it; each probability equals the hand-run forward of the same folder."""
    from fakes import pattern_images

    from fgvr.slow_path import build_question

    pattern_images(tmp_path / "support", 2, seed=0)
    pattern_images(tmp_path / "test", 1, seed=1)
    runner = CliRunner()
    folder = talkative_qwen3_dir
    built = runner.invoke(cli, ["build-kb", str(tmp_path / "support"), "--shots", "2", "--vlm", str(folder),
                                "--out", str(tmp_path / "kb")])
    assert built.exit_code == 0, built.output
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    assert manifest["vlm"] is not None and "qwen3_vl" in json.dumps(manifest["vlm"])
    ran = runner.invoke(cli, ["evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--vlm", str(folder),
                              "--slow-budget", "1", "--top-k", "3", "--out", str(tmp_path / "run")])
    assert ran.exit_code == 0, ran.output
    descriptions = json.loads((tmp_path / "kb" / "descriptions.json").read_text())
    assert len(descriptions) == 3 and all(d.strip() for d in descriptions.values())
    recs = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    slow = [r for r in recs if r["path_taken"] == "slow"]
    assert len(slow) == 3
    for r in slow:
        names = [c["name"] for c in r["candidates"]]
        got = [c["slow"] for c in r["candidates"]]
        image = Image.open(r["path"]).convert("RGB")
        want = _hand_run_probs(folder, build_question(names, descriptions), image, len(names))
        assert np.allclose(got, want, atol=1e-5), (got, want)
        assert max(got) - min(got) > 1e-4  # a real distribution, not the uniform one a broken path gives


def test_memory_plan_weights_are_the_real_architecture_on_the_meta_device():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "qwen3-vl-8b", "--encoder", "none", "--dtype", "bf16",
                                   "--budget", "80GiB", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**configs.QWEN3_VL["qwen3-vl-8b"]),
                                                             dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert plan["models"][0]["weight_bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert plan["models"][0]["params"] == sum(p.numel() for p in model.parameters())
    assert 8.7e9 < plan["models"][0]["params"] < 8.8e9  # "8.77B parameters" (the model card)
    assert len(model.model.visual.deepstack_merger_list) == 3
    w = plan["workload"]
    assert w["visual_tokens"] == 1280 and w["kv_bytes_per_token"] == 2 * 36 * 8 * 128 * 2
    assert w["image_tokens"] == (1024 // 32) ** 2  # a 1024x1024 image: 32x32 cells of 32 pixels


def test_the_known_sizes_tie_where_the_real_models_do():
    from fgvr.models.plan import model_size

    sizes = {n: model_size(n, "vlm", "bf16") for n in configs.QWEN3_VL}
    assert [round(sizes[n].params / 1e9, 1) for n in ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b")] \
        == [2.1, 4.4, 8.8, 33.4]
    assert configs.HUB_IDS["qwen3-vl-32b"] == "Qwen/Qwen3-VL-32B-Instruct"


def test_memory_plan_serve_flags_are_the_familys_own_keywords():
    out = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "qwen3-vl-8b", "--serve", "both", "--gpu", "24GiB"])
    assert out.exit_code == 0, out.output
    assert "vllm serve Qwen/Qwen3-VL-8B-Instruct" in out.output
    assert """--mm-processor-kwargs '{"size": {"shortest_edge": 65536, "longest_edge": 1310720}}'""" in out.output
    assert "SGLANG_IMAGE_MAX_PIXELS=1310720 python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct" \
        in out.output
    assert "1280 visual tokens" in out.output
    capped = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "qwen3-vl-8b", "--serve", "vllm", "--gpu", "24GiB",
                                      "--max-visual-tokens", "256"])
    assert capped.exit_code == 0, capped.output
    assert '"longest_edge": 262144' in capped.output and "256 visual tokens" in capped.output


def test_adding_the_family_touched_no_module_but_its_own_and_the_configs():
    """No fgvr module outside families/qwen3_vl.py and the config data names Qwen3-VL: the spec, the plans,
    the backends and the CLI know it only through its declaration."""
    allowed = {SRC / "models" / "families" / "qwen3_vl.py", SRC / "models" / "configs.py"}
    pattern = re.compile(r"qwen3[-_ ]?vl", re.IGNORECASE)
    naming = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))
              if p not in allowed and pattern.search(p.read_text(encoding="utf-8"))]
    assert naming == []
    assert families.get("qwen3_vl").known_configs is configs.QWEN3_VL
