"""Incremental bases: add images or classes, remove them, revert to an earlier version, without a rebuild.

    add_images("kb/", ["new/fox1.jpg", "new/fox2.jpg"], label="fox")   # `fgvr kb add kb new/ --label fox`
    remove_from_base("kb/", class_name="fox")                           # `fgvr kb remove kb --class fox`
    revert_base("kb/", 2)                                               # `fgvr kb revert kb 2`

Only the new images are encoded (with the base's own encoder, augmentations and size cap, read from its
manifest). Everything derived from the support set is then brought up to date exactly as a build makes it:
class means from the exemplars, the fusion (w, tau, exemplar weight) refitted on the leave-one-out scores
and the leave-one-out statistics under it (`fitting`). So a changed base answers as a base built from
scratch on the same images does. A new class gets its text prototype (encoders with a text tower) and, when
the base has VLM descriptions, its description (the base's VLM must be given); existing classes keep
theirs. Each change is one new version (`versions`): atomic, logged, with a new content digest, so runs
and caches bound to the old base refuse to resume on the new one. One writer at a time (`output_lock`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fgvr.data import IMAGE_SUFFIXES, ImageError, Sample, load_image
from fgvr.errors import KnowledgeBaseError
from fgvr.knowledge_base.build import _fit
from fgvr.knowledge_base.encoding import _config_hash, encode_support
from fgvr.knowledge_base.storage import KnowledgeBase, load_knowledge_base, support_files
from fgvr.knowledge_base.text import DEFAULT_TEMPLATES, DESCRIPTION_IMAGES, DESCRIPTION_WEIGHT, describe_classes, text_prototypes
from fgvr.knowledge_base.versions import VersionRecord, commit_version, load_version, recover
from fgvr.locks import output_lock

log = logging.getLogger(__name__)

RETIRED_FILE = "retired.json"  # experience rules taken out of use by `kb remove --class`, kept for the record


@dataclass
class ChangeSummary:
    """What one `kb add` / `kb remove` / `kb revert` did."""

    record: VersionRecord
    images_encoded: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        r = self.record
        lines = [f"version {r.version} ({r.change}): {r.classes} classes, {r.images} support images, "
                 f"digest {r.digest[:16]}"]
        if r.change == "add":
            lines.append(f"images encoded {self.images_encoded}")
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped]
        where = ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())
        lines.append(f"time           {self.seconds:.2f} s" + (f" ({where})" if where else ""))
        return "\n".join(lines)


def _image_files(images: Sequence[str | Path]) -> list[Path]:
    """The image files named, folders expanded (sorted); a missing path is an error naming it."""
    out: list[Path] = []
    for item in images:
        p = Path(item).absolute()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise KnowledgeBaseError(f"{item} does not exist: name image files or folders of images to add")
    if not out:
        raise KnowledgeBaseError(f"no image files in {', '.join(map(str, images))}: nothing to add")
    return out


def _encoder_spec(kb: KnowledgeBase, device: str) -> Any:
    from fgvr.models.spec import ModelSpec

    fields = dict(kb.encoder_spec)
    return ModelSpec.create(fields.pop("family"), fields.pop("source"), **{**fields, "device": device})


def _resolved(path: Path) -> str:
    return str(Path(path).resolve())


def _refit(kb: KnowledgeBase, exemplars: torch.Tensor, labels: torch.Tensor, support: list[dict]) -> None:
    """Put the support set (rows in any order) into `kb` as a build lays it out (grouped by class id, stable)
    and recompute everything derived from it: class means, manifest class list, fusion and statistics."""
    order = torch.argsort(labels, stable=True)
    kb.exemplars, kb.exemplar_labels = exemplars[order].contiguous(), labels[order].contiguous()
    sums = torch.zeros(kb.num_classes, kb.embed_dim).index_add_(0, kb.exemplar_labels, kb.exemplars)
    kb.prototypes = torch.nn.functional.normalize(sums, dim=1)
    counts = torch.bincount(kb.exemplar_labels, minlength=kb.num_classes)
    kb.manifest["support"] = [support[i] for i in order.tolist()]
    kb.manifest["classes"] = [{"id": i, "name": n, "support": int(counts[i])} for i, n in enumerate(kb.classes)]
    _fit(kb)


def _describe_new(kb: KnowledgeBase, vlm: Any, label: str, used: list[str], root: Path) -> str:
    """The new class's description when the base has descriptions ("" when it has none)."""
    if not kb.manifest.get("vlm"):
        return ""
    imgs = []
    for rel in used[:DESCRIPTION_IMAGES]:
        try:
            imgs.append(load_image(Path(rel) if Path(rel).is_absolute() else root / rel,
                                   max_side=kb.manifest.get("max_side")))
        except ImageError:
            continue
    got = describe_classes(vlm, [(label, imgs)], batch_size=1, progress=False) if imgs else {}
    return got.get(label, "")


def _open_vlm(kb: KnowledgeBase, vlm: Any, label: str, path: Path, device: str) -> Any:
    """The backend that describes a new class of a base with descriptions (None when nothing is to be
    written); refuses a missing VLM or another one than the base's."""
    want = kb.manifest.get("vlm")
    if not want or label in kb.classes:
        return None
    if vlm is None:
        raise KnowledgeBaseError(f"{path} has VLM-written class descriptions ({want.get('name')}): give --vlm "
                                 f"{want.get('name')} so the new class {label!r} gets one too")
    if not hasattr(vlm, "generate"):
        raise TypeError(f"add_images(vlm=...) takes an open backend (fgvr.backends.get_backend), not {vlm!r}")
    got = vlm.describe()["key"]
    if got != want.get("key"):
        raise KnowledgeBaseError(f"{path}'s descriptions were written by {want.get('name')} ({want.get('key')}), "
                                 f"not by the --vlm given ({got}): use the same VLM")
    return vlm


def _encode_new(kb: KnowledgeBase, path: Path, files: list[Path], label: str, *, device: str, batch_size: int,
                workers: int | None, progress: bool) -> tuple[Any, list[dict], Any, Any]:
    """(exemplars, skipped, encoder spec, per-class result) for the new images, encoded with the base's
    encoder. Resumable: a killed add reruns with the images it has already encoded (same key as a build)."""
    from fgvr.models import registry

    spec = _encoder_spec(kb, device)
    root = Path(kb.manifest["data"]["root"])
    augment = tuple(kb.manifest.get("augmentations") or ())
    work_dir = path.parent / f".{path.name}.add-partial" / _config_hash(spec.to_json(), augment,
                                                                          kb.manifest.get("max_side"))
    work_dir.mkdir(parents=True, exist_ok=True)
    with registry.use(spec) as enc:
        results, _, _ = encode_support(enc, [label], [Sample(f, label) for f in files], root=root,
                                       work_dir=work_dir, augment=augment, batch_size=batch_size,
                                       workers=workers, max_side=kb.manifest.get("max_side"), progress=progress)
    ex, used, skips = results[0]
    skipped = [{"path": p, "reason": r} for p, r in skips]
    if ex.shape[0] == 0:
        raise KnowledgeBaseError(f"none of the images to add could be read ({'; '.join(f'{p}: {r}' for p, r in skips)}): "
                                 f"{path} is unchanged")
    return ex.float(), skipped, spec, (used, work_dir)


def add_images(kb_path: str | Path, images: Sequence[str | Path], label: str, *, device: str = "cpu",
               batch_size: int = 32, workers: int | None = None, vlm: Any = None,
               progress: bool = False) -> ChangeSummary:
    """Add `images` (files or folders) as support images of class `label` (existing or new) to the base at
    `kb_path`, as a new version. Images already in the base are skipped; a new class gets a text prototype
    and description (`vlm`: a spec, a served VLM's URL or an open backend; see the module docstring)."""
    t0 = time.perf_counter()
    path = Path(kb_path).absolute()
    label = label.strip()
    if not label:
        raise KnowledgeBaseError("--label must name a class")
    with output_lock(path, "kb add"):
        recover(path)
        kb = load_knowledge_base(path)
        vlm = _open_vlm(kb, vlm, label, path, device)
        have = {_resolved(s.path) for s in kb.support_files()}
        files = _image_files(images)
        dup = [{"path": str(f), "reason": "already a support image of the base"} for f in files if _resolved(f) in have]
        files = [f for f in files if _resolved(f) not in have]
        if not files:
            raise KnowledgeBaseError(f"every image given is already in {path}: nothing to add")
        phases = {"load": time.perf_counter() - t0}
        t = time.perf_counter()
        ex, skipped, spec, (used, work_dir) = _encode_new(kb, path, files, label, device=device,
                                                          batch_size=batch_size, workers=workers, progress=progress)
        phases["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        new_class = label not in kb.classes
        if new_class:
            _append_class(kb, label, spec, vlm, used)
        phases["text"] = time.perf_counter() - t
        t = time.perf_counter()
        cid = kb.classes.index(label)
        support = list(kb.manifest.get("support", [])) + [{"path": p, "class_id": cid} for p in used]
        labels = torch.cat([kb.exemplar_labels.long(), torch.full((ex.shape[0],), cid, dtype=torch.int64)])
        kb.manifest["skipped"] = list(kb.manifest.get("skipped", [])) + skipped
        _refit(kb, torch.cat([kb.exemplars.float(), ex]), labels, support)
        phases["stats"] = time.perf_counter() - t
        t = time.perf_counter()
        record = commit_version(path, kb, "add", {"label": label, "new_class": new_class, "images": len(used)})
        shutil.rmtree(work_dir.parent, ignore_errors=True)
        phases["save"] = time.perf_counter() - t
    return ChangeSummary(record, images_encoded=len(used), skipped=dup + skipped,
                         seconds=time.perf_counter() - t0, phases=phases)


def _append_class(kb: KnowledgeBase, label: str, spec: Any, vlm: Any, used: list[str]) -> None:
    """A new class id at the end: its description (bases with descriptions) and text prototype (bases
    with a text tower), made the way a build makes them."""
    from fgvr.models import registry

    kb.classes.append(label)
    description = _describe_new(kb, vlm, label, used, Path(kb.manifest["data"]["root"]))
    if kb.manifest.get("vlm"):
        kb.descriptions[label] = description
    if kb.text_prototypes is not None:
        text = kb.manifest.get("text") or {}
        with registry.use(spec) as enc:
            row = text_prototypes(enc, [label], {label: description}, tuple(text.get("templates") or DEFAULT_TEMPLATES),
                                  float(text.get("description_weight", DESCRIPTION_WEIGHT)))
        kb.text_prototypes = torch.cat([kb.text_prototypes.float(), row.float()])


def remove_from_base(kb_path: str | Path, *, class_name: str | None = None,
                     image: str | Path | None = None) -> ChangeSummary:
    """Remove a whole class (`class_name`: later class ids move down by one) or one support image
    (`image`) from the base at `kb_path`, as a new version. The last image of a class is removed with the
    class (`class_name`), never on its own: a class without support images cannot be scored."""
    t0 = time.perf_counter()
    if (class_name is None) == (image is None):
        raise KnowledgeBaseError("name exactly one of --class NAME or --image PATH to remove")
    path = Path(kb_path).absolute()
    with output_lock(path, "kb remove"):
        recover(path)
        kb = load_knowledge_base(path)
        support = list(kb.manifest.get("support", []))
        labels = kb.exemplar_labels.long()
        if class_name is not None:
            keep, detail = _drop_class(kb, class_name, path)
            labels = labels - (labels > keep.removed_class).long()  # later class ids move down by one
        else:
            keep, detail = _drop_image(kb, image, path)
        rows = torch.nonzero(keep.mask).flatten()
        _refit(kb, kb.exemplars.float()[rows], labels[rows],
               [{**support[i], "class_id": int(labels[i])} for i in rows.tolist()])
        retire = None if class_name is None else (lambda stage: detail.update(retire_rules(stage, class_name)))
        record = commit_version(path, kb, "remove", detail, edit_stage=retire)
    return ChangeSummary(record, seconds=time.perf_counter() - t0)


@dataclass
class _Keep:
    mask: torch.Tensor  # (N,) bool: support rows that stay
    removed_class: int | None = None


def _drop_class(kb: KnowledgeBase, name: str, path: Path) -> tuple[_Keep, dict]:
    if name not in kb.classes:
        raise KnowledgeBaseError(f"{path} has no class {name!r} (see `fgvr kb show {path}`)")
    if kb.num_classes == 1:
        raise KnowledgeBaseError(f"{name!r} is the only class of {path}: a base needs at least one class")
    cid = kb.classes.index(name)
    kb.classes.pop(cid)
    kb.descriptions.pop(name, None)
    if kb.text_prototypes is not None:
        kb.text_prototypes = torch.cat([kb.text_prototypes[:cid], kb.text_prototypes[cid + 1:]])
    return _Keep(kb.exemplar_labels.long() != cid, cid), {"class": name, "images": int((kb.exemplar_labels == cid).sum())}


def _drop_image(kb: KnowledgeBase, image: str | Path, path: Path) -> tuple[_Keep, dict]:
    want = _resolved(Path(image).absolute())
    hits = [i for i, s in enumerate(support_files(kb.manifest)) if _resolved(s.path) == want]
    if not hits:
        raise KnowledgeBaseError(f"{image} is not a support image of {path} (see the support list in its manifest)")
    cid = int(kb.exemplar_labels[hits[0]])
    if int((kb.exemplar_labels == cid).sum()) == len(hits):
        raise KnowledgeBaseError(f"{image} is the last support image of class {kb.classes[cid]!r}: remove the "
                                 f"class with --class {kb.classes[cid]!r} instead")
    mask = torch.ones(kb.exemplars.shape[0], dtype=torch.bool)
    mask[hits] = False
    return _Keep(mask), {"image": kb.manifest["support"][hits[0]]["path"], "class": kb.classes[cid]}


def retire_rules(kb_dir: Path, class_name: str) -> dict:
    """Move the experience rules of the base at `kb_dir` that name `class_name` out of use, into
    `experience/retired.json` (with the class and time), so no prompt cites a class the base no longer has.
    Returns {"rules_retired": n} (empty when there is nothing to retire)."""
    from fgvr.io import atomic_write_json, read_json
    from fgvr.rules import EXPERIENCE_DIR, ExperienceLibrary, normalise_name

    lib = ExperienceLibrary.load(kb_dir)
    gone = normalise_name(class_name)
    retired = [r for r in lib.rules if gone in {normalise_name(c) for c in r.classes}]
    if not retired:
        return {}
    lib.rules = [r for r in lib.rules if r not in retired]
    lib.save()
    f = kb_dir / EXPERIENCE_DIR / RETIRED_FILE
    kept = read_json(f) if f.is_file() else []
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(f, kept + [{"rule": r.to_json(), "reason": f"class {class_name!r} removed", "when": when}
                                 for r in retired])
    log.info("retired %d experience rule(s) naming %r", len(retired), class_name)
    return {"rules_retired": len(retired)}


def revert_base(kb_path: str | Path, version: int) -> ChangeSummary:
    """Make version `version` of the base at `kb_path` the current one again, as a new version (the log
    keeps every version in between). The restored base has that version's content digest."""
    t0 = time.perf_counter()
    path = Path(kb_path).absolute()
    with output_lock(path, "kb revert"):
        recover(path)
        kb = load_version(path, version)
        record = commit_version(path, kb, "revert", {"to": version})
    return ChangeSummary(record, seconds=time.perf_counter() - t0)
