"""The build: its state (resumed or started), the systems it runs, and `build_experience`."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fgvr.experience.heldout import PARTS, BuildSummary, Item, accuracy_per_part, held_out
from fgvr.experience.log import ExperienceLog
from fgvr.experience.loop import Build
from fgvr.experience.reflection import Reflector, VlmReflector
from fgvr.experience.scoring import Scorer
from fgvr.experience.similarity import TextSimilarity
from fgvr.io import atomic_write_bytes
from fgvr.run_dir import Checkpoint, identity_diff
from fgvr.rules import EXPERIENCE_DIR, FORMAT_VERSION, ExperienceError, ExperienceLibrary, Rule

if TYPE_CHECKING:
    from fgvr.backends import VlmBackend

log = logging.getLogger("fgvr.experience")

LOG_FILE = "log.jsonl"
PROGRESS_FILE = "progress.json"
EMBEDDINGS_FILE = "embeddings.safetensors"


def encode_items(kb: Any, items: list[Item], file: Path, summary: BuildSummary, device: str | None,
            show_progress: bool) -> tuple[list[Item], Any]:
    """Encode the held-out images once with the base's encoder (leased, and released before the VLM is),
    through the pipeline's `encode_paths`; unreadable ones are listed and dropped. Stored atomically."""
    from safetensors.torch import save
    from tqdm import tqdm

    from fgvr.models import registry
    from fgvr.models.spec import ModelSpec
    from fgvr.pipeline import DualSystem
    from fgvr.trigger import Trigger

    import torch

    spec = kb.encoder_spec if isinstance(kb.encoder_spec, ModelSpec) else ModelSpec(**kb.encoder_spec)
    if device is not None:
        spec = spec.replace(device=device)
    kept, chunks = [], []
    with registry.use(spec) as enc, tqdm(total=len(items), desc="encode", disable=not show_progress,
                                         file=sys.stderr) as bar:
        system = DualSystem(kb, enc, None, Trigger(threshold=-math.inf))
        for i in range(0, len(items), 32):
            chunk = items[i : i + 32]
            got = system.encode_paths([it.path for it in chunk], keep_images=False)
            summary.unreadable += [f"{r.path}: {r.error}" for r in got.errors if r is not None]
            kept += [chunk[j] for j in got.ok]
            chunks.append(got.embeddings)
            bar.update(len(chunk))
    emb = torch.cat(chunks) if chunks else torch.zeros(0, kb.prototypes.shape[1])
    atomic_write_bytes(file, save({"embeddings": emb.float().contiguous()}))
    return kept, emb


_EXPLAIN = {"classes": "the base's classes", "encoder": "the base's encoder", "k": "k (candidates per image)",
            "validation": "the held-out images or their parts", "format_version": "the progress file's format"}


def fingerprint_of(kb: Any, k: int, items: Sequence[Item]) -> dict:
    import hashlib

    h = hashlib.sha256("\n".join(f"{it.path}|{it.part}" for it in items).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return {"classes": list(kb.classes), "encoder": getattr(kb, "encoder_key", ""), "k": k, "validation": h}


def open_systems(kb: Any, vlm: "VlmBackend | None", slow: Any, reflector: Any, n_rules: int) -> tuple[Any, Any]:
    """System 2 and the reflector: the VLM reasoner and reflector on one open backend unless given (tests)."""
    if slow is not None and reflector is not None:
        return slow, reflector
    if vlm is None:
        raise ExperienceError("building the experience library needs a VLM: pass --vlm FOLDER "
                              "(a VLM folder saved with save_pretrained) or a served VLM's URL")
    from fgvr.slow_path import VlmReasoner

    backend = vlm  # one for both steps
    slow = slow or VlmReasoner(backend, kb.classes, getattr(kb, "descriptions", None) or {}, max_rules=n_rules)
    return slow, reflector or VlmReflector(backend)


def start_build(kb: Any, kb_path: Path, dataset: Any, k: int, max_per_class: int | None, fresh: bool,
           summary: BuildSummary, device: str | None, show_progress: bool) -> tuple[dict, Any]:
    """The build's state: resumed from progress.json (same base, data and k), or started: the held-out
    images split into parts and encoded once. Returns (state, embeddings aligned with state["items"])."""
    from safetensors.torch import load_file

    exp_dir = kb_path / EXPERIENCE_DIR
    progress, emb_file = Checkpoint(exp_dir / PROGRESS_FILE), exp_dir / EMBEDDINGS_FILE
    items = held_out(kb, dataset, max_per_class, summary)
    fingerprint = fingerprint_of(kb, k, items)
    if progress.exists() and not fresh:
        state = progress.load()
        diff = identity_diff({"format_version": state.get("format_version"), **(state.get("fingerprint") or {})},
                             {"format_version": FORMAT_VERSION, **fingerprint}, explain=_EXPLAIN)
        if diff:
            raise ExperienceError(
                f"{progress.path} belongs to another build ({'; '.join(diff)}); rerun with --fresh to "
                "start over (accepted rules in rules.json are kept)"
            )
        if emb_file.is_file():
            return state, load_file(str(emb_file))["embeddings"]
    exp_dir.mkdir(parents=True, exist_ok=True)
    items, emb = encode_items(kb, items, emb_file, summary, device, show_progress)
    lib0 = ExperienceLibrary.load(kb_path, kb.classes)
    state = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "finished_rounds": 0, "round": 1,
             "done": [], "rules": [r.to_json() for r in lib0.rules], "items": [asdict(it) for it in items],
             "unreadable": summary.unreadable, "accuracy_before": None}
    progress.save(state)
    return state, emb


def build_experience(
    kb_path: str | Path,
    data: Any,
    vlm: "VlmBackend | None" = None,
    rounds: int = 1,
    *,
    k: int = 5,
    weight: float | None = None,
    n_rules: int = 3,
    max_per_class: int | None = None,
    slow: Any = None,
    reflector: Reflector | None = None,
    similarity: TextSimilarity | None = None,
    device: str | None = None,
    fresh: bool = False,
    show_progress: bool = True,
) -> BuildSummary:
    """Learn rules from the dual system's mistakes on held-out labelled images (see the module docstring).

    Every validation image goes through System 2 here (whatever the trigger would do at inference): a rule
    can only be learned from, and measured on, images the VLM has seen. `slow` and `reflector` default to
    the VLM reasoner and reflector on the open backend `vlm` (`fgvr.backends.get_backend`); tests pass scripted ones. Resumes from
    experience/progress.json unless `fresh`.
    """
    from fgvr.data import Dataset, read_dataset
    from fgvr.decision import DEFAULT_WEIGHT
    from fgvr.knowledge_base import load_knowledge_base

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    kb_path = Path(kb_path)
    kb = load_knowledge_base(kb_path)
    slow, reflector = open_systems(kb, vlm, slow, reflector, n_rules)
    dataset = data if isinstance(data, Dataset) else read_dataset(Path(data))
    summary = BuildSummary()
    state, emb = start_build(kb, kb_path, dataset, k, max_per_class, fresh, summary, device, show_progress)
    items = [Item(**d) for d in state["items"]]
    summary.unreadable = list(state.get("unreadable", []))
    summary.images = len(items)
    summary.parts = {p: sum(it.part == p for it in items) for p in PARTS}
    exp_dir = kb_path / EXPERIENCE_DIR
    lib = ExperienceLibrary([Rule.from_json(r) for r in state["rules"]], kb.classes, exp_dir)
    # the images of the rules kept from an earlier build (`--fresh` keeps accepted rules) stay recorded too
    earlier = ExperienceLibrary.load(kb_path, kb.classes).images
    lib.images = {p: sorted({str(Path(it.path).resolve()) for it in items if it.part == p} | set(earlier.get(p, [])))
                  for p in set(PARTS) | set(earlier)}
    scorer = Scorer(kb, slow, emb, [it.path for it in items],
                     k=k, weight=DEFAULT_WEIGHT if weight is None else weight, n_rules=n_rules)
    ctx = Build(state, items, lib, scorer, reflector, similarity or TextSimilarity(), ExperienceLog(exp_dir / LOG_FILE),
                 summary, kb.classes, Checkpoint(exp_dir / PROGRESS_FILE))
    ctx.first_pass()
    ctx.run_rounds(rounds, show_progress)
    lib.save()
    summary.rules = len(lib.rules)
    summary.similarity = ctx.sim.method if summary.proposed else "unused"
    if summary.rounds_run or state.get("accuracy_after") is None:
        state["accuracy_after"] = accuracy_per_part(scorer.predict(lib, items), items)
        ctx.checkpoint()
    summary.accuracy_before, summary.accuracy_after = state["accuracy_before"], state["accuracy_after"]
    return summary
