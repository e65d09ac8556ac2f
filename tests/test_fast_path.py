"""System 1 on small synthetic knowledge bases: vectorised scores equal the per-class loop, posteriors are
over all classes, top-k / margin / entropy are right, leave-one-out never sees the query itself."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fgvr.fast_path import best_exemplar_scores, support_loo, system1


def normed(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def make_kb(num_classes: int = 6, shots: int = 3, dim: int = 16, text: bool = False, seed: int = 0,
            fusion: dict | None = None):
    g = torch.Generator().manual_seed(seed)
    centres = normed(torch.randn(num_classes, dim, generator=g))
    ex = normed(centres.repeat_interleave(shots, 0) + 0.3 * torch.randn(num_classes * shots, dim, generator=g))
    labels = torch.arange(num_classes).repeat_interleave(shots)
    protos = normed(torch.zeros(num_classes, dim).index_add_(0, labels, ex))
    return SimpleNamespace(
        classes=[f"class {i}" for i in range(num_classes)],
        prototypes=protos, exemplars=ex, exemplar_labels=labels,
        text_prototypes=normed(centres + 0.5 * torch.randn(num_classes, dim, generator=g)) if text else None,
        fusion=fusion if fusion is not None else {"w": 0.7, "tau": 0.1},
        stats=None, centres=centres,
    )


def reference_logits(kb, q, w, e=0.5):
    """The obvious per-class loop the vectorised code must match."""
    s = []
    for c in range(len(kb.classes)):
        proto = q @ kb.prototypes[c]
        best = (q @ kb.exemplars[kb.exemplar_labels == c].T).max(dim=1).values
        img = (1 - e) * proto + e * best
        if kb.text_prototypes is not None:
            img = w * img + (1 - w) * (q @ kb.text_prototypes[c])
        s.append(img)
    return torch.stack(s, 1)


@pytest.mark.parametrize("text", [False, True])
def test_scores_match_per_class_loop(text):
    kb = make_kb(text=text)
    q = normed(torch.randn(9, 16, generator=torch.Generator().manual_seed(1)))
    fast = system1(kb, q, k=3)
    ref = reference_logits(kb, q, w=0.7)
    assert torch.allclose(fast.logits, ref, atol=1e-6)
    assert torch.allclose(fast.probs, torch.softmax(ref / 0.1, 1), atol=1e-6)
    assert fast.probs.shape == (9, 6) and torch.allclose(fast.probs.sum(1), torch.ones(9), atol=1e-6)


def test_without_text_prototypes_w_is_ignored():
    kb = make_kb(text=False)
    q = normed(torch.randn(4, 16))
    a, b = system1(kb, q, w=0.2), system1(kb, q, w=1.0)
    assert torch.allclose(a.probs, b.probs) and a.w == 1.0


def test_modality_weight_and_temperature_change_the_posterior():
    kb = make_kb(text=True)
    q = normed(torch.randn(4, 16))
    img_only, txt_only = system1(kb, q, w=1.0), system1(kb, q, w=0.0)
    assert not torch.allclose(img_only.probs, txt_only.probs)
    assert torch.allclose(txt_only.logits, q @ kb.text_prototypes.T, atol=1e-6)
    sharp, flat = system1(kb, q, tau=0.01), system1(kb, q, tau=10.0)
    assert (sharp.entropy < flat.entropy).all()


def test_topk_margin_entropy():
    kb = make_kb()
    q = kb.centres[[0, 3]]  # near classes 0 and 3
    fast = system1(kb, q, k=4)
    assert fast.topk_ids[:, 0].tolist() == [0, 3]
    assert fast.topk_ids.shape == (2, 4)
    sorted_p = fast.probs.sort(dim=1, descending=True).values
    assert torch.allclose(fast.topk_probs, sorted_p[:, :4])
    assert torch.allclose(fast.margin, sorted_p[:, 0] - sorted_p[:, 1])
    h = -(fast.probs * fast.probs.log()).sum(1) / math.log(6)
    assert torch.allclose(fast.entropy, h, atol=1e-6)
    recs = fast.records(kb.classes)
    assert recs[0]["topk_names"][0] == "class 0" and len(recs[1]["topk_probs"]) == 4
    cand = fast.candidates_probs(0)
    assert abs(sum(cand) - 1) < 1e-9 and cand[0] >= cand[1]


def test_uniform_posterior_has_entropy_one_and_k_is_capped():
    kb = make_kb(num_classes=3, fusion={"w": 1.0, "tau": 1e6})
    fast = system1(kb, normed(torch.randn(2, 16)), k=10)
    assert fast.topk_ids.shape == (2, 3)
    assert torch.allclose(fast.entropy, torch.ones(2), atol=1e-4)


def test_best_exemplar_scatter_and_missing_class():
    sims = torch.tensor([[0.1, 0.9, 0.3, 0.2]])
    labels = torch.tensor([0, 0, 2, 2])
    out = best_exemplar_scores(sims, labels, 3)
    assert out[0, 0] == pytest.approx(0.9) and out[0, 2] == pytest.approx(0.3) and math.isinf(out[0, 1])


def test_wrong_dimension_is_refused():
    with pytest.raises(ValueError, match="dimension"):
        system1(make_kb(), torch.randn(2, 8))


def test_support_loo_excludes_the_query_itself():
    kb = make_kb(num_classes=5, shots=3, fusion={"w": 1.0, "tau": 0.1, "exemplar_weight": 1.0})
    fast, labels = support_loo(kb, k=5)
    # with exemplar_weight 1 and no LOO, every exemplar would match itself at cosine 1
    assert (fast.logits.max(1).values < 0.9999).all()
    # reference: remove exemplar i from the base and score it
    i = 4
    keep = torch.arange(len(labels)) != i
    ex = kb.exemplars[keep]
    lab = kb.exemplar_labels[keep]
    best = best_exemplar_scores(kb.exemplars[i:i + 1] @ ex.T, lab, 5)
    assert torch.allclose(fast.logits[i], best[0], atol=1e-6)
    # the own-class prototype is the mean without i
    kb.fusion["exemplar_weight"] = 0.0
    fast0, _ = support_loo(kb)
    c = int(labels[i])
    own = normed(kb.exemplars[keep][lab == c].sum(0))
    assert fast0.logits[i, c] == pytest.approx(float(kb.exemplars[i] @ own), abs=1e-6)


def test_support_loo_chunks_agree():
    kb = make_kb(num_classes=7, shots=2)
    a, _ = support_loo(kb, chunk=3)
    b, _ = support_loo(kb, chunk=1000)
    assert torch.allclose(a.probs, b.probs, atol=1e-6)
