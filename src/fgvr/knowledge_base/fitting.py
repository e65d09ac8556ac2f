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
  log-likelihood, so the posterior System 1 reports is calibrated on data it never saw.
"""

from __future__ import annotations

import torch

from fgvr.knowledge_base.storage import KnowledgeBase, RetrievalStats
from fgvr.scoring import TEMPERATURES, fit_temperature

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
    best: tuple[float, dict] | None = None
    for w in (W_GRID if has_text else (1.0,)):
        for e in EXEMPLAR_WEIGHT_GRID:
            logits = (1 - e) * s_proto + e * s_ex
            if s_txt is not None:
                logits = w * logits + (1 - w) * s_txt
            tau, nll = fit_temperature(logits, y, TAU_GRID)
            if best is None or nll < best[0] - 1e-12:
                best = (nll, {"w": w, "tau": tau, "exemplar_weight": e})
    nll, chosen = best
    return {**chosen, "source": "leave-one-out NLL on the support set", "loo_nll": round(nll, 6),
            "images": int(mask.sum())}


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
