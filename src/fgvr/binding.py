"""What a resumable run is bound to besides its own folder: digests of the knowledge base, the data list
and the experience rules, and every setting of a system that changes its answers. `fgvr evaluate` and
`fgvr classify --out` declare these as their run identity (`fgvr.run_dir.RunDir.bind`); a restart with any
of `MUST_MATCH` different is refused, naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fgvr.data import Dataset
from fgvr.pipeline import DualSystem


def digest(obj: Any) -> str:
    import hashlib

    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, default=str).encode() + b"\0")

    feed(obj)
    return h.hexdigest()[:32]


def knowledge_base_digest(kb: Any) -> str:
    """The content of a base as System 1, the trigger and System 2 see it: tensors, classes, fusion,
    statistics, descriptions, encoder and the support list (what the re-ranker matches against). Not its
    path or build time: the same content at another path is the same base."""
    stats = getattr(kb, "stats", None)
    manifest = getattr(kb, "manifest", None) or {}
    return digest({
        "classes": list(kb.classes), "encoder": getattr(kb, "encoder_key", None),
        "prototypes": kb.prototypes, "exemplars": getattr(kb, "exemplars", None),
        "exemplar_labels": getattr(kb, "exemplar_labels", None), "text": getattr(kb, "text_prototypes", None),
        "stats": stats.tensors() if stats is not None and hasattr(stats, "tensors") else None,
        "fusion": getattr(kb, "fusion", None), "descriptions": getattr(kb, "descriptions", None),
        "support": manifest.get("support"), "data_root": (manifest.get("data") or {}).get("root"),
    })


def data_digest(dataset: Dataset) -> str:
    """The data list: every (resolved path, label) pair and the class list, order-free."""
    return digest({"classes": sorted(dataset.classes),
                    "samples": sorted((str(Path(s.path).resolve()), s.label) for s in dataset.samples)})


def experience_digest(system: Any) -> str | None:
    lib = getattr(system, "experience", None)
    rules = getattr(lib, "rules", None)
    if not rules:
        return None
    return digest([r.to_json() if hasattr(r, "to_json") else str(r) for r in rules])



def system_binding(system: DualSystem) -> dict[str, Any]:
    """Every setting of a system that changes its answers, with digests of its base and experience rules:
    what a resumable run (`fgvr evaluate`, `fgvr classify --out`) is bound to besides its data."""
    from fgvr.data import max_decoded_pixels

    from fgvr.slow_path import system2_identity

    return {"threshold": None if system.trigger.budget is not None else system.trigger.threshold,
            "budget": system.trigger.budget, "top_k": system.k, "weight": system.weight,
            "slow_all": system.slow_all, "system2": getattr(system.slow, "name", None) if system.slow else None,
            # an in-process model's spec key, or the backend's own identity (a served model's URL, model, cap)
            "system2_spec": system2_identity(system.slow),
            "n_rules": system.n_rules,
            "rationale": bool(getattr(system.slow, "rationale", False)),
            "kb_digest": knowledge_base_digest(system.kb), "experience_digest": experience_digest(system),
            "max_image_pixels": max_decoded_pixels(),
            # open set: the threshold answers are rejected below (None: closed set), and its calibration
            "unknown_threshold": system.open_set.threshold if getattr(system, "open_set", None) else None,
            "unknown_rate": system.open_set.rate if getattr(system, "open_set", None) else None}



# What a record depends on; a restart must match them ("limit" too when the run calibrates on itself).
MUST_MATCH = ("kb_digest", "data_digest", "experience_digest", "encoder", "system2", "system2_spec", "threshold",
               "budget", "calibrate", "top_k", "weight", "slow_all", "n_rules", "rationale", "max_image_pixels",
               "unknown_threshold")
EXPLAIN = {"kb_digest": "the knowledge base's content (rebuilt or changed since)",
         "data_digest": "the data list (images or labels added, removed or relabelled)",
         "experience_digest": "the experience rules of the base",
         "system2_spec": "System 2's model (a served one: its URL, model name, VLM family and pixel cap)",
         "limit": "--limit (the threshold was "
         "calibrated on the first run's images)"}
