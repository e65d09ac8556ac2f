"""System 1: score a batch of query embeddings against every class at once.

One matrix product per modality over ALL classes (never a shortlist, so the posterior is over the whole
label set and its entropy means something):

    s_proto    = q @ P^T                      cosine to each L2-normalised class mean
    s_exemplar = max over the class's exemplars of q @ E^T   (one scatter-reduce, no Python loop over classes)
    s_img      = (1 - e) * s_proto + e * s_exemplar            e = kb.fusion["exemplar_weight"] (default 0.5)
    s_txt      = q @ T^T                      only when the base has text prototypes (CLIP / SigLIP)
    p          = softmax((w * s_img + (1 - w) * s_txt) / tau)  w, tau default to kb.fusion

Prototypes are robust to one odd support image; the best exemplar keeps multi-modal classes (a shirt
seen folded and worn) from being averaged into nothing. Both are cheap, so System 1 uses both. The image
scores and the leave-one-out come from `fgvr.scoring`, which the visual re-ranker shares.

`support_loo` runs the same scoring on the base's own exemplars leave-one-out (a support image is never
scored against a prototype or exemplar that contains it): the trigger calibrates a slow-path budget on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fgvr.defaults import DEFAULTS
from fgvr.scoring import Support, best_exemplar_scores, image_scores, mix  # noqa: F401 (best_exemplar_scores: re-exported)

DEFAULT_W = DEFAULTS.fusion_w
DEFAULT_TAU = DEFAULTS.tau
DEFAULT_EXEMPLAR_WEIGHT = DEFAULTS.exemplar_weight


@dataclass
class FastResult:
    """System 1's answer for a batch of B queries over C classes (all tensors float32 / int64, same device)."""

    probs: torch.Tensor  # (B, C) fused posterior over all classes
    logits: torch.Tensor  # (B, C) fused similarity before /tau (what the softmax saw, times tau)
    topk_ids: torch.Tensor  # (B, k) class ids, best first
    topk_probs: torch.Tensor  # (B, k)
    margin: torch.Tensor  # (B,) p1 - p2 (p1 when C == 1)
    entropy: torch.Tensor  # (B,) H(p) / log C, in [0, 1] (0 when C == 1)
    w: float
    tau: float

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def candidates_probs(self, i: int) -> list[float]:
        """System 1's posterior over sample i's top-k, renormalised to sum to 1 (what the decision combines)."""
        p = self.topk_probs[i].double()
        return (p / p.sum().clamp_min(1e-300)).tolist()

    def records(self, classes: list[str] | None = None) -> list[dict[str, Any]]:
        """Per-sample plain-Python records (JSON-ready): top-k ids, names, probs, margin, entropy."""
        ids = self.topk_ids.cpu().tolist()
        probs = self.topk_probs.cpu().tolist()
        margin = self.margin.cpu().tolist()
        entropy = self.entropy.cpu().tolist()
        out = []
        for i in range(len(ids)):
            rec: dict[str, Any] = {
                "topk_ids": ids[i],
                "topk_probs": probs[i],
                "margin": margin[i],
                "entropy": entropy[i],
            }
            if classes is not None:
                rec["topk_names"] = [classes[c] for c in ids[i]]
            out.append(rec)
        return out


def fusion_params(kb: Any, w: float | None = None, tau: float | None = None) -> tuple[float, float, float]:
    """(w, tau, exemplar_weight): explicit arguments win, then kb.fusion, then the module defaults.

    Without text prototypes w is forced to 1: there is nothing to mix with.
    """
    fusion = dict(getattr(kb, "fusion", None) or {})
    w = float(w if w is not None else fusion.get("w", DEFAULT_W))
    tau = float(tau if tau is not None else fusion.get("tau", DEFAULT_TAU))
    e = float(fusion.get("exemplar_weight", DEFAULT_EXEMPLAR_WEIGHT))
    if getattr(kb, "text_prototypes", None) is None:
        w = 1.0
    if not (0.0 <= w <= 1.0):
        raise ValueError(f"modality weight w must lie in [0, 1], got {w}")
    if not (0.0 <= e <= 1.0):
        raise ValueError(f"exemplar_weight must lie in [0, 1], got {e}")
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return w, tau, e


def _kb_tensor(t: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=ref.device, dtype=torch.float32)


def _posterior(logits: torch.Tensor, tau: float, k: int, w: float) -> FastResult:
    num_classes = logits.shape[1]
    probs = torch.softmax(logits / tau, dim=1)
    k = max(1, min(k, num_classes))
    top = torch.topk(probs, k=min(max(k, 2), num_classes), dim=1)
    p1 = top.values[:, 0]
    p2 = top.values[:, 1] if num_classes > 1 else torch.zeros_like(p1)
    # 0 * log 0 = 0: xlogy does that without a NaN.
    h = -torch.special.xlogy(probs, probs).sum(dim=1)
    entropy = h / math.log(num_classes) if num_classes > 1 else torch.zeros_like(h)
    return FastResult(
        probs=probs,
        logits=logits,
        topk_ids=top.indices[:, :k].contiguous(),
        topk_probs=top.values[:, :k].contiguous(),
        margin=p1 - p2,
        entropy=entropy.clamp(0.0, 1.0) + 0.0,  # + 0.0 turns -0.0 into 0.0
        w=w,
        tau=tau,
    )


def system1(
    kb: Any,
    query_embeddings: torch.Tensor,
    *,
    w: float | None = None,
    tau: float | None = None,
    k: int = DEFAULTS.top_k,
) -> FastResult:
    """Fused posterior over all of kb's classes for (B, D) L2-normalised query embeddings.

    Runs on the queries' device in float32, whatever dtype the base was stored in.
    """
    q = query_embeddings.to(torch.float32)
    if q.ndim != 2:
        raise ValueError(f"query embeddings must be (B, D), got shape {tuple(q.shape)}")
    protos = _kb_tensor(kb.prototypes, q)
    if q.shape[1] != protos.shape[1]:
        raise ValueError(
            f"query embeddings have dimension {q.shape[1]} but the knowledge base has {protos.shape[1]}: "
            "encode with the encoder the base was built with"
        )
    w, tau, e = fusion_params(kb, w, tau)

    exemplars = _kb_tensor(getattr(kb, "exemplars", None), q)
    s_img = image_scores(q, protos, exemplars, getattr(kb, "exemplar_labels", None), e)
    logits = s_img
    texts = _kb_tensor(getattr(kb, "text_prototypes", None), q)
    if texts is not None and w < 1.0:
        logits = w * s_img + (1 - w) * (q @ texts.T)
    return _posterior(logits, tau, k, w)


def support_loo(kb: Any, *, w: float | None = None, tau: float | None = None, k: int = DEFAULTS.top_k,
                chunk: int = 2048) -> tuple[FastResult, torch.Tensor]:
    """System 1 on the base's own exemplars, leave-one-out; returns (FastResult, true labels).

    Exemplar i of class c is scored against c's mean WITHOUT i (re-normalised) and against every exemplar
    but itself. A class whose only exemplar is i has no image evidence left: its image score is -1, the
    lowest cosine. Rows are processed in chunks so 10,000 classes x 5 shots stay within memory.
    """
    ex = kb.exemplars.to(torch.float32)
    w, tau, e = fusion_params(kb, w, tau)
    support = Support(ex, kb.exemplar_labels, kb.prototypes.shape[0])
    texts = getattr(kb, "text_prototypes", None)
    texts = None if texts is None else texts.to(device=ex.device, dtype=torch.float32)
    results = []
    for start in range(0, ex.shape[0], chunk):
        s_proto, s_ex = support.loo_parts(start, start + chunk, exemplar=e > 0)
        s_img = s_proto if s_ex is None else mix(s_proto, s_ex, e)
        q = ex[start:start + chunk]
        logits = s_img if texts is None or w >= 1.0 else w * s_img + (1 - w) * (q @ texts.T)
        results.append(logits)
    return _posterior(torch.cat(results), tau, k, w), support.labels
