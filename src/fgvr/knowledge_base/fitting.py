"""Knowledge-base fitting: leave-one-out retrieval statistics and the fusion defaults System 1 uses.

* **Retrieval statistics**, leave-one-out: every support image is scored by `fast_path.support_loo`, which
  removes the image from its own class mean ((sum - x) re-normalised) and from the exemplars. Raw counts
  per predicted class (precision m of n) and per true class (recall) are kept so the trigger can form a
  Beta posterior. Images of a class with a single support image are *excluded*: without them the class
  has no image evidence at all, so the "prediction" would say nothing about how the fast path behaves at
  query time, where that class does have its prototype; counting them as misses would make every other
  class look worse than it is. `RetrievalStats.excluded` says how many were left out. One known limit:
  a VLM description is written from up to 3 support images, and leave-one-out cannot take an image back
  out of a sentence, so with descriptions the text part of the score has seen those images.
* **Fusion defaults** (w: image vs text weight, tau: temperature, exemplar_weight: prototype vs best
  exemplar) are chosen on the same leave-one-out scores by grid search minimising the negative
  log-likelihood, so the posterior System 1 reports is calibrated on data it never saw. The exemplar
  weight then follows the one-standard-error rule: the smallest weight whose leave-one-out NLL is within
  one standard error (paired, over the support images) of the best. With 5 shots the NLL of 50 images
  cannot tell a small exemplar weight from none, so the simpler plain prototype is kept. On Fashion-MNIST
  train-split validation (benchmarks/exemplar_weight.py: 500 images, seeds 0-2) the minimum alone picked
  0.25 on two of three 5-shot bases; the rule's accuracy is the same (+0.1 points [-0.8, +0.9]), and at
  10 and 20 shots the two choose alike.
"""

from __future__ import annotations

import torch

from fgvr.knowledge_base.storage import KnowledgeBase, RetrievalStats
from fgvr.scoring import TEMPERATURES, fit_temperature, nll_per_row

# Fusion grid (see `choose_fusion`); the temperatures are the one grid of `fgvr.scoring`.
W_GRID = tuple(i / 10 for i in range(11))
EXEMPLAR_WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TAU_GRID = TEMPERATURES  # 0.001 .. 1, log-spaced


class _Scoring:
    """The minimal view of a base `fast_path.support_loo` reads, with a given fusion."""

    def __init__(self, kb: KnowledgeBase, fusion: dict) -> None:
        self.prototypes, self.exemplars, self.exemplar_labels = kb.prototypes, kb.exemplars, kb.exemplar_labels
        self.text_prototypes, self.fusion, self.stats = kb.text_prototypes, fusion, None


def choose_fusion(kb: KnowledgeBase) -> dict:
    """(w, tau, exemplar_weight) minimising the leave-one-out negative log-likelihood of the support set.

    System 1's logits are linear in the fusion weights: w * ((1-e) * s_proto + e * s_exemplar) + (1-w) * s_text.
    So three leave-one-out passes (prototype only, exemplar only, text only) give every grid point by
    mixing, and tau is searched on the log grid per (w, e) (`fgvr.scoring.fit_temperature`). w is searched
    only with text prototypes.
    """
    from fgvr.fast_path import DEFAULT_EXEMPLAR_WEIGHT, DEFAULT_TAU, DEFAULT_W, support_loo

    labels = kb.exemplar_labels.long()
    counts = torch.bincount(labels, minlength=kb.num_classes)
    mask = counts[labels] > 1
    has_text = kb.text_prototypes is not None
    default = {"w": DEFAULT_W if has_text else 1.0, "tau": DEFAULT_TAU,
               "exemplar_weight": DEFAULT_EXEMPLAR_WEIGHT}
    if int(mask.sum()) == 0 or kb.num_classes < 2:
        return {**default, "source": "default: no class has two support images, nothing to fit on"}

    def loo_logits(w: float, e: float) -> torch.Tensor:
        fast, _ = support_loo(_Scoring(kb, {"w": w, "tau": 1.0, "exemplar_weight": e}), k=1)
        return fast.logits[mask].double()

    s_proto, s_ex = loo_logits(1.0, 0.0), loo_logits(1.0, 1.0)
    s_txt = loo_logits(0.0, 0.0) if has_text else None
    y = labels[mask]

    def logits_at(w: float, e: float) -> torch.Tensor:
        logits = (1 - e) * s_proto + e * s_ex
        return logits if s_txt is None else w * logits + (1 - w) * s_txt

    fits = {(w, e): fit_temperature(logits_at(w, e), y, TAU_GRID)
            for w in (W_GRID if has_text else (1.0,)) for e in EXEMPLAR_WEIGHT_GRID}
    best = min(fits, key=lambda we: (fits[we][1], we[::-1]))  # ties: the smaller exemplar weight
    chosen = _one_standard_error(best, fits, logits_at, y)
    tau, nll = fits[chosen]
    return {"w": chosen[0], "tau": tau, "exemplar_weight": chosen[1],
            "source": "leave-one-out NLL on the support set", "loo_nll": round(nll, 6),
            "images": int(mask.sum()), "exemplar_rule": "one standard error",
            "best_exemplar_weight": best[1], "best_loo_nll": round(fits[best][1], 6)}


def _one_standard_error(best: tuple[float, float], fits: dict, logits_at, y: torch.Tensor) -> tuple[float, float]:
    """The smallest exemplar weight, at the best w, whose per-image NLL exceeds the best's by at most one
    standard error of the paired difference (see the module docstring)."""
    w, _ = best
    ref = nll_per_row(logits_at(*best), y, fits[best][0])
    for e in sorted(e for (w2, e) in fits if w2 == w and e <= best[1]):
        diff = nll_per_row(logits_at(w, e), y, fits[w, e][0]) - ref
        se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
        if float(diff.mean()) <= se:
            return (w, e)
    return best


def retrieval_stats(kb: KnowledgeBase, fusion: dict) -> RetrievalStats:
    """Leave-one-out counts with the fusion System 1 will use (single-image classes excluded, see above)."""
    from fgvr.fast_path import support_loo

    labels = kb.exemplar_labels.long()
    counts = torch.bincount(labels, minlength=kb.num_classes)
    mask = counts[labels] > 1
    if int(mask.sum()) == 0:
        z = torch.zeros(0, dtype=torch.int64)
        return RetrievalStats.from_predictions(z, z, kb.num_classes, excluded=len(labels))
    fast, true = support_loo(_Scoring(kb, fusion), k=1)
    pred = fast.topk_ids[:, 0]
    return RetrievalStats.from_predictions(pred[mask], true[mask], kb.num_classes, excluded=int((~mask).sum()))
