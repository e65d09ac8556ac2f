"""The defaults every step shares, in one place: a CLI option, a library argument and a demo that mean the
same setting read the same value from here.

    from fgvr.defaults import DEFAULTS
    DualSystem(kb, enc, slow, trigger, k=DEFAULTS.top_k, weight=DEFAULTS.decision_weight)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    """Why each value: see the module that uses it (named in the comment)."""

    shots: int = 5  # support images per class (build-kb, demo)
    encoder: str = "efficientnet-lite0"  # System 1's encoder: the real image weights packaged offline (build-kb, bench)
    slow_budget: float = 0.3  # fraction of images sent to System 2 (trigger; cli, demo)
    top_k: int = 5  # System 1 candidates handed to System 2 (fast_path, pipeline)
    decision_weight: float = 0.5  # System 2's share in the final distribution (decision)
    rules: int = 3  # experience rules per System 2 prompt (pipeline, slow_path)
    fusion_w: float = 1.0  # image vs text weight before the support set chooses (fast_path)
    tau: float = 0.05  # System 1 temperature before the support set chooses (fast_path)
    exemplar_weight: float = 0.5  # best exemplar vs prototype before the support set chooses (fast_path)
    reranker_temperature: float = 0.05  # re-ranker temperature where one shot per class leaves nothing to fit


DEFAULTS = Defaults()
