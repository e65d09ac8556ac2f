"""The VLM reasoner on the tiny random Qwen2.5-VL: the real prompt → processor → option-scoring path with
the real Qwen tokenizer, so the option letters are the token ids the 7B model would score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fgvr.backends.transformers_vlm import TransformersVlm
from fgvr.experience import Rule
from fgvr.models import parse_spec, registry
from fgvr.slow_path import (
    LETTERS,
    SlowQuery,
    VlmReasoner,
    build_question,
    letter_token_ids,
    one_line,
    render_chat,
    user_turn,
    vlm_inputs,
)

CLASSES = ["coat", "pullover", "shirt", "T-shirt", "dress"]
DESCRIPTIONS = {
    "shirt": "A top with a collar and a button placket down the front.\nSecond line never shown.",
    "T-shirt": "A collarless short-sleeved top pulled over the head.",
}
RULES = [
    Rule("r1", ["shirt", "T-shirt"], "buttons", "Shirts have buttons down the front; T-shirts do not."),
    Rule("r2", ["coat", "pullover"], "length", "A coat reaches below the hip; a pullover stops at the waist."),
    Rule("r3", ["dress"], "hem", "A dress is one piece from shoulder to knee."),
]
IMAGE_PAD = 151655  # <|image_pad|> in the real Qwen vocabulary


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def spec(tiny_qwen_dir):
    return parse_spec(str(tiny_qwen_dir), max_pixels=64 * 28 * 28, min_pixels=4 * 28 * 28)


@pytest.fixture(scope="module")
def queries():
    # different image sizes (so different numbers of visual tokens) and different numbers of candidates:
    # batching has to left-pad, and the mrope positions have to skip the padding
    return [
        SlowQuery(_image(56, 56, 0), [2, 3, 0], RULES, path="a.png"),
        SlowQuery(_image(200, 300, 1), [1, 4]),
        SlowQuery(_image(90, 60, 2), [3, 2, 4, 1], RULES[:1]),
        SlowQuery(_image(120, 120, 3), [0, 1, 2, 3, 4], RULES),
    ]


def test_letters_are_the_real_qwen_tokens(spec):
    with registry.use(spec) as vlm:
        prompt = render_chat(vlm.processor, [user_turn("Which? A. x B. y")])
        assert prompt.endswith("<|im_start|>assistant\n")
        # after the assistant prefix the letter is a token of its own without a space: 'A' = 32, not ' A' = 362
        assert letter_token_ids(vlm.tokenizer, prompt, 4) == [32, 33, 34, 35]


def test_option_scoring_batched_equals_one_by_one(spec, queries):
    batched = VlmReasoner(TransformersVlm(spec, batch_size=4), CLASSES, DESCRIPTIONS).rank(queries)
    single = VlmReasoner(TransformersVlm(spec, batch_size=1), CLASSES, DESCRIPTIONS).rank(queries)
    assert len(batched) == len(queries)
    for q, a, b in zip(queries, batched, single):
        assert len(a.probs) == len(q.candidates)
        assert abs(sum(a.probs) - 1) < 1e-5 and all(p > 0 for p in a.probs)
        assert np.allclose(a.probs, b.probs, atol=1e-4), (a.probs, b.probs)
        best = q.candidates[int(np.argmax(a.probs))]
        assert best in q.candidates  # the answer is always one of the options
        assert a.tokens_in > 0 and a.tokens_out == 1 and a.seconds > 0
    assert batched[0].rules_used == ["r1", "r2"]  # r3 (dress) does not concern shirt/T-shirt/coat
    assert batched[1].rules_used == []


def test_probs_are_the_softmax_over_the_letter_logits(spec, queries):
    """Recompute one answer by hand: a plain unpadded forward, next-token logits at 'A', 'B', 'C'."""
    r = VlmReasoner(TransformersVlm(spec), CLASSES, DESCRIPTIONS)
    q = queries[0]
    got = r.rank([q])[0].probs
    with registry.use(spec) as vlm:
        question, _ = r.question(q)
        text = render_chat(vlm.processor, [user_turn(question)])
        inputs = vlm.processor(text=[text], images=[q.image], return_tensors="pt",
                               max_pixels=spec.max_pixels, min_pixels=spec.min_pixels)
        with torch.inference_mode():
            logits = vlm.model(**inputs).logits[0, -1]
    want = torch.softmax(logits[[32, 33, 34]].float(), 0).tolist()
    assert np.allclose(got, want, atol=1e-5)


def test_prompt_has_options_descriptions_rules_and_no_other_class(spec, queries):
    r = VlmReasoner(TransformersVlm(spec), CLASSES, DESCRIPTIONS, max_rules=1)
    question, rules = r.question(queries[0])  # candidates shirt, T-shirt, coat
    assert question.splitlines()[1:4] == [
        "A. shirt — A top with a collar and a button placket down the front.",
        "B. T-shirt — A collarless short-sleeved top pulled over the head.",
        "C. coat",
    ]
    assert "Second line" not in question
    assert [x.id for x in rules] == ["r1"]  # at most max_rules
    assert RULES[0].text in question and RULES[1].text not in question
    assert question.endswith("Answer with the letter only.")
    # only the candidates are named: the other classes (pullover, dress) never appear
    assert "pullover" not in question and "dress" not in question
    # the query carries no label, so the prompt is a function of image, candidates and rules only
    assert not hasattr(queries[0], "label")


def test_pixel_cap_limits_image_tokens(tiny_qwen_dir):
    big = SlowQuery(_image(480, 640, 5), [0, 1])
    counts = {}
    for cap in (16, 64):
        spec = parse_spec(str(tiny_qwen_dir), max_pixels=cap * 28 * 28, min_pixels=4 * 28 * 28)
        r = VlmReasoner(TransformersVlm(spec), CLASSES)
        with registry.use(spec) as vlm:
            inputs = vlm_inputs(vlm, [render_chat(vlm.processor, [user_turn(r.question(big)[0])])], [big.image])
        counts[cap] = int((inputs["input_ids"] == IMAGE_PAD).sum())
        assert counts[cap] <= cap
    assert counts[16] < counts[64]  # the cap, not the image, is what limits the count


def test_rationale_is_generated_after_the_scored_answer(spec, queries):
    plain = VlmReasoner(TransformersVlm(spec), CLASSES, DESCRIPTIONS).rank(queries[:2])
    why = VlmReasoner(TransformersVlm(spec), CLASSES, DESCRIPTIONS, rationale=True, rationale_tokens=8).rank(queries[:2])
    for a, b in zip(plain, why):
        assert np.allclose(a.probs, b.probs, atol=1e-6)  # the rationale never changes the answer
        assert isinstance(b.rationale, str) and a.rationale is None
        assert 1 < b.tokens_out <= 1 + 8 and b.tokens_in > a.tokens_in


def test_reasoner_holds_a_spec_not_a_model(spec, queries):
    r = VlmReasoner(TransformersVlm(spec), CLASSES)
    r.rank(queries[:1])
    assert not any(isinstance(v, torch.nn.Module) for v in vars(r).values())
    rec = registry.report().model(spec.key)
    assert rec.leases == 0  # the lease ended with rank()


def test_question_helpers():
    assert one_line("x " * 200).endswith("…") and len(one_line("x " * 200)) <= 161
    assert one_line(None) == "" and one_line("\n\n  first  line \nsecond") == "first line"
    q = build_question(["a", "b"], {"a": "desc"}, [])
    assert q.splitlines()[1:3] == ["A. a — desc", "B. b"] and "Lessons" not in q
    with pytest.raises(ValueError):
        build_question([str(i) for i in range(len(LETTERS) + 1)])


def test_in_process_batch_is_sized_from_the_gpu_budget(tiny_qwen_dir):
    """On CUDA the option-scoring batch is what fits the budget next to what the registry holds, from the
    plan's per-prompt working memory; on CPU a fixed batch. (The arithmetic only: a fake CUDA model.)"""
    import json
    from types import SimpleNamespace

    from fgvr.backends.transformers_vlm import CPU_BATCH, MAX_AUTO_BATCH, PLANNED_TEXT_TOKENS, auto_batch_size
    from fgvr.models.plan import CUDA_CONTEXT_BYTES, workload

    cfg = json.loads((tiny_qwen_dir / "config.json").read_text())
    spec = SimpleNamespace(family="qwen2_5_vl", dtype="bfloat16", max_pixels=1280 * 28 * 28)
    per = workload(cfg, "bfloat16", spec.max_pixels, text_tokens=PLANNED_TEXT_TOKENS, new_tokens=1).working_bytes
    fake = SimpleNamespace(device="cuda:7", spec=spec, model=SimpleNamespace(config=SimpleNamespace(to_dict=lambda: cfg)))
    try:
        registry.set_budget("cuda:7", CUDA_CONTEXT_BYTES + int(3.5 * per))
        assert auto_batch_size(fake) == 3
        registry.set_budget("cuda:7", CUDA_CONTEXT_BYTES + per // 2)
        assert auto_batch_size(fake) == 1  # never below one prompt: the registry refuses what cannot load
        registry.set_budget("cuda:7", 10**15)
        assert auto_batch_size(fake) == MAX_AUTO_BATCH
    finally:
        registry.set_budget("cuda:7", None)
    assert auto_batch_size(SimpleNamespace(device="cpu")) == CPU_BATCH
