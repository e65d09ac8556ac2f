"""The visual re-ranker (CPU System 2): its math on hand-made tensors, and the real Lite2 through the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fgvr import reranker as rr
from fgvr.knowledge_base import KnowledgeBase
from fgvr.slow_path import SlowAnswer, SlowQuery

SIZE = 72  # small input: fast, and a registry key no other test uses


def test_match_scores_mix_prototype_and_best_exemplar():
    ex = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    q = torch.tensor([[1.0, 0.0]])
    proto0 = F.normalize(ex[0] + ex[1], dim=0)
    s = rr.match_scores(q, ex, labels, 2, proto_weight=0.25)
    assert s[0, 0].item() == pytest.approx(0.25 * proto0[0].item() + 0.75 * 1.0)
    assert s[0, 1].item() == pytest.approx(0.0)


def test_candidate_softmax_follows_candidate_order():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    p = rr.candidate_softmax(scores, torch.tensor([[3, 1, 2]]), temperature=0.1)
    assert p.shape == (1, 3) and p.sum().item() == pytest.approx(1.0)
    assert p[0].argmax().item() == 0  # class 3, listed first, has the best score
    rev = rr.candidate_softmax(scores, torch.tensor([[2, 1, 3]]), temperature=0.1)
    assert torch.allclose(rev[0], p[0].flip(0))


def _clusters(n_per: int, classes: int = 3, dim: int = 16, spread: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(classes * n_per, dim, generator=g)
    return F.normalize(x, dim=-1), torch.arange(classes).repeat_interleave(n_per)


def test_support_loo_never_scores_an_image_against_itself():
    x, y = _clusters(2)
    scores, usable = rr.support_loo_scores(x, y, 3, proto_weight=0.0)
    assert usable.all()
    # with proto_weight 0 the own-class score is the one other exemplar of that class, not itself (cosine 1)
    for i in range(len(x)):
        other = [j for j in range(len(x)) if y[j] == y[i] and j != i][0]
        assert scores[i, y[i]].item() == pytest.approx((x[i] @ x[other]).item(), abs=1e-6)


def test_fit_on_support_separable_clusters_and_one_shot():
    x, y = _clusters(4)
    fit = rr.fit_on_support(x, y, 3)
    assert fit["fitted"] and fit["loo_accuracy"] == 1.0
    assert fit["proto_weight"] in rr.PROTO_WEIGHTS
    assert fit["temperature"] == min(rr.TEMPERATURES)  # perfectly separated: sharpest wins
    noisy, yn = _clusters(4, spread=2.0, seed=3)
    assert rr.fit_on_support(noisy, yn, 3)["temperature"] > fit["temperature"]  # overlap: softer
    one, y1 = _clusters(1)
    assert rr.fit_on_support(one, y1, 3)["fitted"] is False


def test_layout_weight_is_chosen_where_the_evidence_is():
    """Descriptors whose pooled half is noise and whose layout half separates the classes (and vice versa)."""
    grid = 1  # pooled part 8-d, layout part 8-d
    sep, y = _clusters(4, dim=8)
    noise = F.normalize(torch.randn(len(y), 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    layout_good = torch.cat([noise, sep], 1) / math.sqrt(2)
    pooled_good = torch.cat([sep, noise], 1) / math.sqrt(2)
    assert rr.fit_on_support(layout_good, y, 3, grid)["layout_weight"] == max(rr.LAYOUT_WEIGHTS)
    assert rr.fit_on_support(pooled_good, y, 3, grid)["layout_weight"] == 0.0
    # the re-weighting is exact: w=0 is the pooled cosine alone, w=1 the layout cosine alone
    a, b = layout_good[:1], layout_good[1:2]
    assert (rr.weight_parts(a, grid, 0.0) @ rr.weight_parts(b, grid, 0.0).T).item() == pytest.approx(
        (noise[0] @ noise[1]).item(), abs=1e-6)
    assert (rr.weight_parts(a, grid, 1.0) @ rr.weight_parts(b, grid, 1.0).T).item() == pytest.approx(
        (sep[0] @ sep[1]).item(), abs=1e-6)


def _crops(photo, boxes):
    return [photo.crop(b).resize((48, 48)) for b in boxes]


@pytest.fixture(scope="module")
def support(tmp_path_factory, sample_photos):
    """Two classes from the two sample photos (temple, flower): three crops each, saved as PNG files."""
    d = tmp_path_factory.mktemp("rerank-support")
    china, flower = sample_photos
    boxes = [(0, 0, 300, 300), (100, 50, 400, 350), (200, 100, 500, 400)]
    paths, labels = [], []
    for cls, photo in enumerate((china, flower)):
        for j, im in enumerate(_crops(photo, boxes)):
            p = d / f"{cls}-{j}.png"
            im.save(p)
            paths.append(p)
            labels.append(cls)
    queries = _crops(china, [(300, 150, 600, 420)]) + _crops(flower, [(320, 120, 620, 420)])
    return paths, labels, queries


def test_reranker_through_the_registry(support, tmp_path):
    from fgvr.models import registry

    paths, labels, (q_china, q_flower) = support
    r = rr.VisualReranker(paths, labels, 3, image_size=SIZE, cache_dir=tmp_path / "cache")
    assert r.name == "visual-reranker"
    queries = [SlowQuery(image=q_flower, candidates=[0, 1]), SlowQuery(image=q_china, candidates=[1, 0, 2])]
    first = r.rank(queries)
    second = r.rank(queries)  # used twice: one load, same answers
    assert registry.report().model(r.spec.key).loads == 1
    for a, b in zip(first, second):
        assert isinstance(a, SlowAnswer)
        assert a.probs == pytest.approx(b.probs)
    flower_ans, china_ans = first
    assert len(flower_ans.probs) == 2 and len(china_ans.probs) == 3
    for ans in first:
        assert all(0.0 <= p <= 1.0 for p in ans.probs) and math.isclose(sum(ans.probs), 1.0, rel_tol=1e-6)
    # each query's own class wins, and probabilities follow the order the candidates were given in
    assert flower_ans.probs[1] > flower_ans.probs[0]
    assert china_ans.probs[1] > china_ans.probs[0]
    # class 2 has no exemplars: it scores like nothing and never beats a real match
    assert china_ans.probs[2] < china_ans.probs[1]
    # the exemplar descriptors were cached on disk: a new instance reads them instead of re-encoding
    cached = list((tmp_path / "cache").glob("support-*.safetensors"))
    assert len(cached) == 1
    r2 = rr.VisualReranker(paths, labels, 3, image_size=SIZE, cache_dir=tmp_path / "cache")
    assert torch.equal(r2.support_features(), r.support_features())


def test_reranker_rejects_bad_input(support):
    paths, labels, (q, _) = support
    with pytest.raises(rr.RerankerError, match="needs support images"):
        rr.VisualReranker([], [], 2)
    with pytest.raises(rr.RerankerError, match="unknown test-time view"):
        rr.VisualReranker(paths, labels, 2, views=("rotate",))
    r = rr.VisualReranker(paths, labels, 2, image_size=SIZE, proto_weight=0.5, layout_weight=0.5, temperature=0.05)
    with pytest.raises(rr.RerankerError, match="outside 0..1"):
        r.rank([SlowQuery(image=q, candidates=[0, 7])])


def test_from_knowledge_base_needs_support_paths():
    z = torch.zeros(2, 4)
    kb = KnowledgeBase(classes=["a", "b"], encoder_spec={}, encoder_key="e", embed_dim=4, prototypes=z,
                       exemplars=z, exemplar_labels=torch.arange(2), manifest={"support": []})
    with pytest.raises(rr.RerankerError, match="lists no support image paths"):
        rr.VisualReranker.from_knowledge_base(kb)


def test_image_size_follows_the_support_images(tmp_path):
    """28-px support images are enlarged either way: 224, System 1's size. One photo of 300 px: Lite2's 260."""
    from PIL import Image

    small = []
    for i in range(3):
        small.append(tmp_path / f"small{i}.png")
        Image.new("L", (28, 28), 40 * i).save(small[-1])
    assert rr.image_size_for(small) == rr.SMALL_SOURCE_SIZE == 224
    big = tmp_path / "big.jpg"
    Image.new("RGB", (400, 300), "white").save(big)
    assert rr.image_size_for(small + [big]) == rr.DEFAULT_IMAGE_SIZE == 260
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert rr.image_size_for(small + [tmp_path / "broken.png"]) == 260  # unknown: the size for real photos


def test_from_knowledge_base_uses_the_rule_unless_told(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (28, 28), 100 * i).save(root / c / f"{i}.png")
    z = torch.zeros(4, 4)
    support = [{"path": f"{c}/{i}.png", "class_id": j} for j, c in enumerate("ab") for i in range(2)]
    kb = KnowledgeBase(classes=["a", "b"], encoder_spec={}, encoder_key="e", embed_dim=4, prototypes=z[:2],
                       exemplars=z, exemplar_labels=torch.tensor([0, 0, 1, 1]),
                       manifest={"support": support, "data": {"root": str(root)}})
    assert [r.path.name for r in kb.support_files()] == ["0.png", "1.png"] * 2
    assert rr.VisualReranker.from_knowledge_base(kb).spec.image_size == 224
    assert rr.VisualReranker.from_knowledge_base(kb, image_size=260).spec.image_size == 260
