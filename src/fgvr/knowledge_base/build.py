"""Knowledge-base build: k labelled images per class -> a saved `KnowledgeBase`, step by step.

    kb, summary = build_knowledge_base("photos/", "kb/", shots=5, seed=0)      # or `fgvr build-kb`

The steps, each in its own module: encode the support images (`encoding`), write class descriptions and
text prototypes (`text`), fit the fusion and leave-one-out statistics (`fitting`), save atomically
(`storage`). A killed build resumes from `<out>.partial/` (see `encoding`).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from fgvr import __version__
from fgvr.data import DEFAULT_MAX_SIDE, Dataset, OneClassWarning, read_dataset, split_k_shot
from fgvr.defaults import DEFAULTS
from fgvr.knowledge_base.encoding import (ClassExemplars, _config_hash, _display_path, encode_support,
                                          parse_augment)
from fgvr.knowledge_base.fitting import choose_fusion, retrieval_stats
from fgvr.knowledge_base.integrity import encoder_fingerprint
from fgvr.knowledge_base.storage import (FORMAT_VERSION, KnowledgeBase, KnowledgeBaseError, _check_out,
                                         save_knowledge_base)
from fgvr.knowledge_base.text import (DEFAULT_TEMPLATES, DESCRIPTION_IMAGES, DESCRIPTION_MAX_NEW_TOKENS,
                                      DESCRIPTION_PROMPT, DESCRIPTION_WEIGHT, text_prototypes, write_descriptions)

if TYPE_CHECKING:
    from fgvr.backends import VlmBackend
    from fgvr.models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class KnowledgeBaseBuildSummary:
    classes: int
    images_used: int
    images_encoded: int  # this run (a resumed build reuses finished classes)
    classes_reused: int
    skipped: list[dict]
    seconds: float
    descriptions: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per build step (where time goes)

    @property
    def images_per_second(self) -> float:
        return self.images_used / self.seconds if self.seconds > 0 else float("nan")

    def format(self) -> str:
        lines = [
            f"classes        {self.classes}",
            f"images used    {self.images_used}"
            + (f" ({self.images_encoded} encoded now, {self.classes_reused} classes resumed)" if self.classes_reused else ""),
            f"skipped files  {len(self.skipped)}",
        ]
        lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more (see manifest.json)")
        if self.descriptions:
            lines.append(f"descriptions   {self.descriptions}")
        lines.append(f"time           {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)")
        return "\n".join(lines)


def _warn_one_class(ds: Dataset) -> None:
    if len(ds.classes) == 1:
        warnings.warn(f"{ds.root} holds one class only ({ds.classes[0]!r}): a base of one class gives that answer "
                      "for every image, and `fgvr evaluate` refuses it; check the layout (root/<class>/<image>)",
                      OneClassWarning, stacklevel=3)


def build_knowledge_base(
    data: str | Path | Dataset,
    out: str | Path,
    *,
    shots: int,
    seed: int = 0,
    encoder: "str | ModelSpec" = DEFAULTS.encoder,
    vlm: "VlmBackend | None" = None,
    device: str = "cpu",
    batch_size: int = 32,
    augment: str | Iterable[str] | None = None,
    classes_file: str | Path | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    workers: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    vlm_batch_size: int = 4,
    progress: bool = True,
) -> tuple[KnowledgeBase, KnowledgeBaseBuildSummary]:
    """Build a knowledge base from k images per class of `data` and write it atomically to `out`.

    `encoder`: a spec string or a ModelSpec; `vlm`: an open backend (`fgvr.backends.get_backend`) that writes
    one description per class, or None. Resumable: see `fgvr.knowledge_base.encoding`. Bad image files are skipped and listed; a class left with no usable
    support image is an error naming it and its files (the other classes' work is kept for the rerun).
    """
    from fgvr.models import registry

    t0 = time.perf_counter()
    out = _check_out(out)  # before any work: refusing at the end would waste the whole build
    augment = parse_augment(augment)
    if batch_size < 1:
        raise KnowledgeBaseError(f"batch size must be at least 1, got {batch_size}")
    ds = data if isinstance(data, Dataset) else read_dataset(Path(data), classes_file)
    _warn_one_class(ds)
    support, _ = split_k_shot(ds, shots, seed)
    spec = _encoder_spec(encoder, vlm, device)
    partial_root = out.parent / f"{out.name}.partial"
    work_dir = _work_dir(out, partial_root, _config_hash(spec.to_json(), augment, max_side))

    phases = {"read": time.perf_counter() - t0}
    t = time.perf_counter()
    with registry.use(spec) as enc:
        results, encoded, reused = encode_support(
            enc, ds.classes, support, root=ds.root, work_dir=work_dir, augment=augment,
            batch_size=batch_size, workers=workers, max_side=max_side, progress=progress,
        )
        embed_dim, has_text, image_size, fp = enc.embed_dim, enc.has_text, enc.image_size, encoder_fingerprint(enc)
    skipped = _check_classes(ds, results, shots, partial_root)
    exemplars, labels, prototypes = _stack(results, len(ds.classes), embed_dim)

    phases["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    descriptions = {} if vlm is None else write_descriptions(
        vlm, ds, results, work_dir, max_side=max_side, batch_size=vlm_batch_size, progress=progress)
    text = None
    if has_text:
        with registry.use(spec) as enc:
            text = text_prototypes(enc, ds.classes, descriptions, templates)

    manifest = _manifest(data, ds, spec, vlm, results, labels, skipped, shots=shots, seed=seed,
                         augment=augment, max_side=max_side, classes_file=classes_file, templates=templates,
                         embed_dim=embed_dim, image_size=image_size, has_text=has_text, fingerprint=fp)
    kb = KnowledgeBase(classes=list(ds.classes), encoder_spec=spec.to_json(), encoder_key=spec.key,
                       embed_dim=embed_dim, prototypes=prototypes, exemplars=exemplars, exemplar_labels=labels,
                       text_prototypes=text, descriptions=descriptions, manifest=manifest)
    phases["text"] = time.perf_counter() - t
    t = time.perf_counter()
    _fit(kb)
    seconds = time.perf_counter() - t0
    phases["stats"] = time.perf_counter() - t
    manifest["build"] = {"seconds": round(seconds, 3), "images_encoded": encoded, "classes_reused": reused,
                         "phases": {k: round(v, 3) for k, v in phases.items()}}
    log.debug("build of %s: %s", out, ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
    t = time.perf_counter()
    save_knowledge_base(kb, out)
    shutil.rmtree(partial_root, ignore_errors=True)
    summary = KnowledgeBaseBuildSummary(
        classes=len(ds.classes), images_used=int(exemplars.shape[0]), images_encoded=encoded, classes_reused=reused,
        skipped=skipped, seconds=time.perf_counter() - t0, descriptions=sum(bool(d) for d in descriptions.values()),
        phases={**phases, "save": time.perf_counter() - t})
    return kb, summary


def _fit(kb: KnowledgeBase) -> None:
    """The fusion System 1 will use, then the leave-one-out statistics under it (recorded in the manifest),
    and the leave-one-out distribution of the open-set score (`fgvr.open_set`)."""
    kb.fusion = choose_fusion(kb)
    kb.stats = retrieval_stats(kb, kb.fusion)
    kb.manifest["stats"] = {"excluded": kb.stats.excluded, "loo_accuracy": kb.stats.accuracy,
                            "rule": "leave-one-out; images of single-image classes excluded"}
    from fgvr.open_set import MANIFEST_KEY, calibration_record

    kb.__dict__.pop("_open_set_calibration", None)
    kb.manifest[MANIFEST_KEY] = calibration_record(kb)  # the open-set threshold's calibration (fgvr.open_set)


def _encoder_spec(encoder: "str | ModelSpec", vlm: "VlmBackend | None", device: str) -> "ModelSpec":
    """The encoder's spec from what the caller gave (a spec string or a ModelSpec); `vlm` must be an open
    backend or None."""
    from fgvr.models.spec import ModelSpec, parse_spec

    if vlm is not None and not hasattr(vlm, "generate"):
        raise TypeError(f"build_knowledge_base(vlm=...) takes an open backend (fgvr.backends.get_backend), not {vlm!r}")
    return encoder if isinstance(encoder, ModelSpec) else parse_spec(str(encoder), device=device, role="image-encoder")


def _work_dir(out: Path, partial_root: Path, config_hash: str) -> Path:
    """This configuration's resume folder; another configuration's work and killed saves are removed."""
    work_dir = partial_root / config_hash
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in partial_root.iterdir():  # work of another configuration can never be reused
        if stale.is_dir() and stale != work_dir:
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a save killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    return work_dir


def _check_classes(ds: Dataset, results: dict[int, ClassExemplars], shots: int, partial_root: Path) -> list[dict]:
    """The skipped files (dataset-level and per class); an error naming every class left with no image."""
    skipped = [{"path": _display_path(p, ds.root), "reason": r} for p, r in ds.ignored]
    empty = []
    for cid, name in enumerate(ds.classes):
        ex, used, skips = results[cid]
        skipped += [{"path": p, "reason": r} for p, r in skips]
        if ex.shape[0] == 0:
            empty.append(f"{name!r} ({'; '.join(f'{p}: {r}' for p, r in skips)})")
        elif ex.shape[0] < min(shots, len(used) + len(skips)):  # (too few files: split_k_shot warned)
            warnings.warn(f"class {name!r} has {ex.shape[0]} usable support image(s), fewer than k={shots}, "
                          f"after skipping {len(skips)} bad file(s)", stacklevel=3)
    if empty:
        raise KnowledgeBaseError(
            f"no usable support image for class(es) {', '.join(empty)}: replace or remove the bad files and "
            f"rerun (finished classes are kept in {partial_root})"
        )
    return skipped


def _stack(results: dict[int, ClassExemplars], num_classes: int,
           embed_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exemplars (N,D), labels (N,), prototypes (C,D)): class means re-normalised."""
    exemplars = torch.cat([results[c][0] for c in range(num_classes)]).float()
    labels = torch.cat([torch.full((results[c][0].shape[0],), c, dtype=torch.int64) for c in range(num_classes)])
    sums = torch.zeros(num_classes, embed_dim).index_add_(0, labels, exemplars)
    return exemplars, labels, torch.nn.functional.normalize(sums, dim=1)


def _manifest(data: Any, ds: Dataset, spec: "ModelSpec", vlm: "VlmBackend | None", results: dict[int, ClassExemplars],
              labels: torch.Tensor, skipped: list[dict], *, shots: int, seed: int, augment: tuple[str, ...],
              max_side: int | None, classes_file: Any, templates: Sequence[str], embed_dim: int,
              image_size: int, has_text: bool, fingerprint: dict) -> dict:
    """What the base records about how it was built (the stats and timings are added after fitting)."""
    support_records = []
    for cid in range(len(ds.classes)):
        support_records += [{"path": p, "class_id": cid} for p in results[cid][1]]
    return {
        "format_version": FORMAT_VERSION,
        "fgvr_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoder": {"key": spec.key, "name": spec.name, "spec": spec.to_json(), "embed_dim": embed_dim,
                    "image_size": image_size, "has_text": has_text, "fingerprint": fingerprint},
        "data": {"source": str(Path(data).absolute()) if not isinstance(data, Dataset) else str(ds.root),
                 "root": str(ds.root.absolute()),
                 "classes_file": str(Path(classes_file).absolute()) if classes_file else None},
        "classes": [{"id": i, "name": n, "support": int((labels == i).sum())} for i, n in enumerate(ds.classes)],
        "k": shots,
        "seed": seed,
        "augmentations": list(augment),
        "max_side": max_side,
        "support": support_records,
        "skipped": skipped,
        "text": ({"templates": list(templates), "description_weight": DESCRIPTION_WEIGHT} if has_text else None),
        "vlm": _vlm_record(vlm),
    }


def _vlm_record(vlm: "VlmBackend | None") -> dict | None:
    """What the manifest keeps of the backend that wrote the descriptions: its own identity."""
    if vlm is None:
        return None
    who = vlm.describe()
    return {"key": who["key"], "name": who.get("model", who["key"]), "backend": who.get("backend", vlm.name),
            "prompt": DESCRIPTION_PROMPT, "images_per_class": DESCRIPTION_IMAGES,
            "max_new_tokens": DESCRIPTION_MAX_NEW_TOKENS}
