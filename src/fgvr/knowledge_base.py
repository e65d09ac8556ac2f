"""The knowledge base: everything System 1 knows, built once from k labelled images per class.

    kb = build_knowledge_base("photos/", "kb/", shots=5, seed=0)        # or `fgvr build-kb`
    kb = load_knowledge_base("kb/", encoder=spec)                         # refuses another encoder's base

What is in it, and why it is built this way:

* **Visual prototypes.** Each support image is decoded once (decode threads work ahead while the model
  runs, where a core is free: see `default_workers`) and encoded once, in batches that span classes, under
  inference mode. Optional
  augmentations (flip, corner crops) are encoded with it and averaged into one exemplar per image. We keep
  the L2-normalised exemplars and the re-normalised class means.
* **Text prototypes** (encoders with a text tower): prompt templates with the class name, mixed with one
  VLM-written description per class when a VLM is given. Long descriptions are chunked by
  `Encoder.encode_texts`, never truncated.
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

Storage: a directory with `manifest.json` (format version, encoder, classes, k, seed, augmentations,
support files, skipped files with reasons, sha256 checksums, fgvr version, time), `tensors.safetensors`
and `descriptions.json`. It is written into a temporary sibling directory and renamed into place; a
rebuild replaces the old base wholesale, never merges with it.

Resume: per-class results go to `<out>.partial/<config hash>/` as each class finishes (atomic files), so a
build killed at any point restarts with the classes it has not finished. Each class file is keyed by the
class's support files (path, size, mtime), so a changed class is re-encoded and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from fgvr import __version__
from fgvr.data import DEFAULT_MAX_SIDE, Dataset, ImageError, Sample, load_image, read_dataset, split_k_shot
from fgvr.errors import KnowledgeBaseError
from fgvr.kb_integrity import check_manifest, check_tensors, load_descriptions, load_tensors, seal_manifest
from fgvr.io import atomic_write_bytes, atomic_write_json, read_json

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
DESCRIPTIONS_FILE = "descriptions.json"

AUGMENTATIONS = ("flip", "crop")
CROP_FRACTION = 0.8  # "crop": the four corner crops covering 80% of each side

# CLIP-style prompt templates (a subset of the ensemble CLIP's authors use for ImageNet): several phrasings
# average out the quirks of any one of them.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
)
DESCRIPTION_WEIGHT = 0.5  # share of the VLM description in a class's text prototype (templates: the rest)
DESCRIPTION_IMAGES = 3
DESCRIPTION_MAX_NEW_TOKENS = 60
DESCRIPTION_PROMPT = (
    "These photos show examples of the class \"{name}\". In one or two sentences, describe the visible "
    "features that distinguish a {name} from similar-looking classes. Answer with the description only."
)

# Fusion grid (see `choose_fusion`).
W_GRID = tuple(i / 10 for i in range(11))
EXEMPLAR_WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TAU_GRID = tuple(10 ** (-3 + 3 * i / 40) for i in range(41))  # 0.001 .. 1, log-spaced


# ----------------------------------------------------------------------------------------------------------
# records


@dataclass
class RetrievalStats:
    """Leave-one-out counts on the support set, per class id (int64 tensors of shape (C,)).

    pred_total[c]  = n: support images System 1 predicted as c;  pred_correct[c] = m: of those, truly c.
    true_total[c]  = support images of class c that were scored; true_correct[c]: of those, predicted c.
    confusion[t, p]: images of true class t predicted as p. `excluded`: images left out (single-image class).
    """

    pred_correct: torch.Tensor
    pred_total: torch.Tensor
    true_correct: torch.Tensor
    true_total: torch.Tensor
    confusion: torch.Tensor
    excluded: int = 0

    @classmethod
    def from_predictions(cls, pred: torch.Tensor, true: torch.Tensor, num_classes: int,
                         excluded: int = 0) -> "RetrievalStats":
        pred, true = pred.long().cpu(), true.long().cpu()
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        confusion.index_put_((true, pred), torch.ones_like(true), accumulate=True)
        diag = confusion.diagonal().clone()
        return cls(pred_correct=diag, pred_total=confusion.sum(0), true_correct=diag.clone(),
                   true_total=confusion.sum(1), confusion=confusion, excluded=int(excluded))

    def precision(self) -> torch.Tensor:
        """m / n per predicted class (NaN where a class was never predicted)."""
        return self.pred_correct.double() / self.pred_total.double()

    def recall(self) -> torch.Tensor:
        return self.true_correct.double() / self.true_total.double()

    @property
    def accuracy(self) -> float:
        n = int(self.true_total.sum())
        return float(self.true_correct.sum()) / n if n else float("nan")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "stats.pred_correct": self.pred_correct, "stats.pred_total": self.pred_total,
            "stats.true_correct": self.true_correct, "stats.true_total": self.true_total,
            "stats.confusion": self.confusion,
        }


@dataclass
class KnowledgeBase:
    """What System 1 and the trigger read. Class id = index into `classes`."""

    classes: list[str]
    encoder_spec: dict
    encoder_key: str
    embed_dim: int
    prototypes: torch.Tensor  # (C, D) float32, L2-normalised class means
    exemplars: torch.Tensor  # (N, D) float32, L2-normalised
    exemplar_labels: torch.Tensor  # (N,) int64
    text_prototypes: torch.Tensor | None = None  # (C, D) float32
    descriptions: dict[str, str] = field(default_factory=dict)
    stats: RetrievalStats | None = None
    fusion: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def k(self) -> int | None:
        return self.manifest.get("k")

    @property
    def seed(self) -> int | None:
        return self.manifest.get("seed")

    @property
    def support_paths(self) -> list[str]:
        """The support images as stored in the manifest (relative to the data root where possible); an
        evaluation on the same folder must leave these out."""
        return [s["path"] for s in self.manifest.get("support", [])]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {
            "prototypes": self.prototypes.float().contiguous(),
            "exemplars": self.exemplars.float().contiguous(),
            "exemplar_labels": self.exemplar_labels.long().contiguous(),
        }
        if self.text_prototypes is not None:
            t["text_prototypes"] = self.text_prototypes.float().contiguous()
        if self.stats is not None:
            t.update(self.stats.tensors())
        return t


@dataclass
class BuildSummary:
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


# ----------------------------------------------------------------------------------------------------------
# encoder identity


_IDENTITY_FIELDS = ("family", "source", "revision", "quantization", "max_pixels", "min_pixels")


def _spec_json(encoder: Any) -> tuple[dict, int | None]:
    """(spec as JSON, effective image size or None) from a ModelSpec, an Encoder, a spec string or dict."""
    if encoder is None:
        raise TypeError("no encoder")
    if isinstance(encoder, dict):
        return dict(encoder), None
    if isinstance(encoder, str):
        from fgvr.models.spec import parse_spec

        encoder = parse_spec(encoder)
    if hasattr(encoder, "to_json") and hasattr(encoder, "key"):  # ModelSpec
        return encoder.to_json(), None
    if hasattr(encoder, "spec"):  # a loaded Encoder
        return encoder.spec.to_json(), getattr(encoder, "image_size", None)
    raise TypeError(f"cannot read an encoder spec from {type(encoder).__name__}")


def check_encoder(manifest: dict, encoder: Any, where: Path | str = "the knowledge base") -> None:
    """Refuse a query encoder whose embeddings are not comparable with the base's.

    Compared: family, source, revision (weights), quantisation, pixel caps, and the input size (when both
    sides state one). Ignored: the device (the same weights on cuda and cpu give the same features up to
    float noise). A different dtype is allowed with a warning: fp16 and fp32 features of the same weights
    agree to ~1e-3, which is below what separates classes, but scores shift slightly.
    """
    got, got_size = _spec_json(encoder)
    want = manifest["encoder"]["spec"]
    diff = [f for f in _IDENTITY_FIELDS if (got.get(f) or None) != (want.get(f) or None)]
    want_size = manifest["encoder"].get("image_size")  # the size the base's encoder really used
    have_size = got_size or got.get("image_size")
    if have_size is None and want.get("image_size") is None:
        have_size = want_size  # neither side chose a size: both use the family default
    if want_size != have_size:
        diff.append("image_size")
    if diff:
        details = ", ".join(f"{f}: base {want.get(f) if f != 'image_size' else want_size!r} vs query "
                            f"{got.get(f) if f != 'image_size' else have_size!r}" for f in diff)
        raise KnowledgeBaseError(
            f"{where} was built with encoder {manifest['encoder']['key']} but the query encoder differs "
            f"({details}); embeddings of different encoders are not comparable: use --encoder "
            f"{manifest['encoder'].get('name', want.get('source'))} or rebuild the base with fgvr build-kb"
        )
    if (got.get("dtype") or "float32") != (want.get("dtype") or "float32"):
        warnings.warn(
            f"{where} was built in {want.get('dtype')} and the query encoder runs in {got.get('dtype')}: "
            "allowed, but scores shift slightly", stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------
# loading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_knowledge_base(path: str | Path, encoder: Any = None, verify: bool = True) -> KnowledgeBase:
    """Read a base written by `build_knowledge_base`.

    `encoder` (a ModelSpec, loaded Encoder or spec string) is the encoder queries will be embedded with;
    a base built with other weights is refused (see `check_encoder`). `verify` checks the sha256 of every
    file against the manifest, so a truncated copy fails here rather than as odd scores later.
    """
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        hint = ""
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if leftovers and not path.exists():
            hint = f" (a rebuild was interrupted while swapping directories; the previous base is {leftovers[-1]})"
        raise KnowledgeBaseError(
            f"{path} is not a knowledge base (no {MANIFEST_FILE}){hint}: build one with "
            f"`fgvr build-kb DATA --out {path}`"
        )
    try:
        manifest = read_json(mf)
    except (OSError, ValueError) as e:
        raise KnowledgeBaseError(f"{mf} cannot be read ({e}): rebuild the base with fgvr build-kb") from None
    if not isinstance(manifest, dict):
        check_manifest(manifest, mf)  # names what is wrong
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise KnowledgeBaseError(
            f"{path} has knowledge-base format version {version!r} (written by fgvr "
            f"{manifest.get('fgvr_version', '?')}); this fgvr {__version__} reads version {FORMAT_VERSION}: "
            "rebuild it with fgvr build-kb"
        )
    check_manifest(manifest, mf)
    if verify:
        for name, digest in manifest.get("checksums", {}).items():
            f = path / name
            if not f.is_file():
                raise KnowledgeBaseError(f"{f} is missing: the base is incomplete, rebuild it with fgvr build-kb")
            if _sha256(f) != digest:
                raise KnowledgeBaseError(f"{f} does not match its checksum in {mf}: the file is damaged, "
                                         "rebuild the base with fgvr build-kb")
    if encoder is not None:
        check_encoder(manifest, encoder, path)
    t = load_tensors(path / TENSORS_FILE)
    check_tensors(t, manifest, path / TENSORS_FILE)
    stats = None
    if "stats.confusion" in t:
        stats = RetrievalStats(
            pred_correct=t["stats.pred_correct"], pred_total=t["stats.pred_total"],
            true_correct=t["stats.true_correct"], true_total=t["stats.true_total"],
            confusion=t["stats.confusion"], excluded=int(manifest.get("stats", {}).get("excluded", 0)),
        )
    classes = [c["name"] for c in sorted(manifest["classes"], key=lambda c: c["id"])]
    descriptions = load_descriptions(path / DESCRIPTIONS_FILE, classes)
    return KnowledgeBase(
        classes=classes,
        encoder_spec=manifest["encoder"]["spec"],
        encoder_key=manifest["encoder"]["key"],
        embed_dim=int(manifest["encoder"]["embed_dim"]),
        prototypes=t["prototypes"],
        exemplars=t["exemplars"],
        exemplar_labels=t["exemplar_labels"],
        text_prototypes=t.get("text_prototypes"),
        descriptions=descriptions,
        stats=stats,
        fusion=dict(manifest.get("fusion", {})),
        manifest=manifest,
        path=path,
    )


# ----------------------------------------------------------------------------------------------------------
# saving


def save_knowledge_base(kb: KnowledgeBase, out: str | Path) -> Path:
    """Write `kb` to `out` atomically: a temporary sibling directory, fsynced, then renamed into place.

    An existing base at `out` is replaced wholesale (moved aside, the new one renamed in, the old one
    deleted), so nothing of the old copy can leak into the new one. A directory that is not a knowledge
    base is never replaced.
    """
    from safetensors.torch import save

    out = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {TENSORS_FILE: save(kb.tensors()),
             DESCRIPTIONS_FILE: (json.dumps(kb.descriptions, indent=2, ensure_ascii=False) + "\n").encode()}
    manifest = dict(kb.manifest)
    manifest["checksums"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest["fusion"] = kb.fusion
    seal_manifest(manifest)
    files[MANIFEST_FILE] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a base is meant to be shared
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(out, old)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the old base, and any left by a save killed between its two renames
    for leftover in ([old] if old is not None else []) + list(out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    kb.manifest, kb.path = manifest, out
    return out


def _check_out(out: str | Path) -> Path:
    """`out` may be new, empty, or an existing knowledge base; anything else is never overwritten."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise KnowledgeBaseError(f"{out} exists and is a file: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise KnowledgeBaseError(f"{out} exists and is not a knowledge base (no {MANIFEST_FILE}); refusing to "
                                 "replace it: choose another --out")
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# building: images -> exemplars


def augmented_views(image: Image.Image, augment: Sequence[str]) -> list[Image.Image]:
    """The image plus its augmentations: 'crop' adds the four 80% corner crops, 'flip' mirrors every view.

    The encoder centre-crops each view itself, so the original view already is the centre crop.
    """
    views = [image]
    if "crop" in augment:
        w, h = image.size
        cw, ch = max(1, round(w * CROP_FRACTION)), max(1, round(h * CROP_FRACTION))
        views += [image.crop(b) for b in ((0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h))]
    if "flip" in augment:
        views += [v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for v in views]
    return views


def parse_augment(augment: str | Iterable[str] | None) -> tuple[str, ...]:
    if augment is None:
        return ()
    items = augment.split(",") if isinstance(augment, str) else list(augment)
    items = [a.strip().lower() for a in items if a and a.strip()]
    unknown = sorted(set(items) - set(AUGMENTATIONS))
    if unknown:
        raise KnowledgeBaseError(f"unknown augmentation(s) {unknown}; known: {', '.join(AUGMENTATIONS)}")
    return tuple(a for a in AUGMENTATIONS if a in items)  # canonical order: the result must not depend on it


def _prefetch(items: Sequence[Any], fn: Callable[[Any], Any], workers: int, window: int) -> Iterator[Any]:
    """fn over items, in order, computed up to `window` items ahead by `workers` threads.

    Decoding and resizing release the GIL, so they overlap the model's forward pass; the window bounds how
    many decoded images wait in memory.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fgvr-decode") as pool:
        it = iter(items)
        pending = deque(pool.submit(fn, x) for x in itertools.islice(it, window))
        while pending:
            result = pending.popleft().result()
            for x in itertools.islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result


def default_workers(encoder: Any) -> int:
    """Decode threads that help rather than compete. With a GPU doing the forward, the CPU is free: decode
    ahead on up to 4 threads. On CPU the forward already keeps every core busy, so one thread decodes
    ahead, filling the forward's serial stretches without taking more than one core from it (on a shared
    2-core machine 0, 1, 2 and 4 threads measured within the run-to-run noise; see benchmarks/kb_build.py)."""
    if str(getattr(encoder, "device", "cpu")).startswith("cuda"):
        return min(4, os.cpu_count() or 1)
    return 1


def _display_path(path: Path, root: Path) -> str:
    """Relative to the data root when inside it (a base stays meaningful if the folder moves), else absolute."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(Path(path).absolute()) if rel.startswith("..") else rel


def _views_per_image(augment: Sequence[str]) -> int:
    return (5 if "crop" in augment else 1) * (2 if "flip" in augment else 1)


def _class_key(name: str, samples: Sequence[Sample]) -> str:
    """Identity of one class's work: its name and support files (path, size, mtime), in support order."""
    h = hashlib.sha256(name.encode())
    for s in samples:
        try:
            st = s.path.stat()
            h.update(f"\0{s.path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"\0{s.path}\0missing".encode())
    return h.hexdigest()[:24]


def _config_hash(spec_json: dict, augment: tuple[str, ...], max_side: int | None) -> str:
    """What makes two builds' exemplars interchangeable. The device is left out: a build started on one
    device may finish on another (float noise only)."""
    identity = {k: v for k, v in spec_json.items() if k != "device"}
    blob = json.dumps({"format": FORMAT_VERSION, "encoder": identity, "augment": augment,
                       "max_side": max_side}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _test_pause() -> None:
    """Test hook: FGVR_TEST_SLEEP_PER_CLASS=<seconds> pauses after each committed class, so the resume test
    can kill a build at a known point. Unset in normal use."""
    delay = os.environ.get("FGVR_TEST_SLEEP_PER_CLASS")
    if delay:
        time.sleep(float(delay))


@dataclass
class _ClassWork:
    cid: int
    name: str
    samples: list[Sample]
    key: str
    remaining: int
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position in support -> exemplar
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def _save_class(work_dir: Path, work: _ClassWork, root: Path, dim: int) -> None:
    from safetensors.torch import save

    order = sorted(work.rows)
    ex = torch.stack([work.rows[i] for i in order]) if order else torch.zeros(0, dim)
    meta = {
        "class": work.name,
        "used": json.dumps([_display_path(work.samples[i].path, root) for i in order], ensure_ascii=False),
        "skipped": json.dumps([[_display_path(work.samples[i].path, root), r] for i, r in work.skipped],
                              ensure_ascii=False),
    }
    atomic_write_bytes(work_dir / f"class-{work.key}.safetensors", save({"exemplars": ex.contiguous()}, metadata=meta))


def _load_class(work_dir: Path, key: str) -> tuple[torch.Tensor, list[str], list[list[str]]] | None:
    from safetensors import safe_open

    f = work_dir / f"class-{key}.safetensors"
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            ex = sf.get_tensor("exemplars")
        return ex, json.loads(meta["used"]), json.loads(meta["skipped"])
    except Exception:  # a damaged partial file is just work to redo
        f.unlink(missing_ok=True)
        return None


def encode_support(
    encoder: Any,
    classes: list[str],
    support: list[Sample],
    *,
    root: Path,
    work_dir: Path,
    augment: tuple[str, ...] = (),
    batch_size: int = 32,
    workers: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    progress: bool = True,
) -> tuple[dict[int, tuple[torch.Tensor, list[str], list[list[str]]]], int, int]:
    """Exemplars per class id: {cid: (exemplars (n,D), used paths, [[path, reason], ...])}.

    Classes already finished in `work_dir` are read back; the rest are encoded in batches that span
    classes, and each class is written to `work_dir` the moment its last image is encoded. Every image
    about to be encoded is appended to `work_dir/encoded.log` (what the resume test counts).
    Returns (per-class results, images encoded now, classes reused).
    """
    from tqdm import tqdm

    by_class: dict[str, list[Sample]] = {c: [] for c in classes}
    for s in support:
        by_class[s.label].append(s)
    done: dict[int, tuple[torch.Tensor, list[str], list[list[str]]]] = {}
    todo: list[_ClassWork] = []
    for cid, name in enumerate(classes):
        key = _class_key(name, by_class[name])
        cached = _load_class(work_dir, key)
        if cached is not None:
            done[cid] = cached
        else:
            todo.append(_ClassWork(cid, name, by_class[name], key, remaining=len(by_class[name])))
    reused = len(done)
    items = [(w, i) for w in todo for i in range(len(w.samples))]
    if not items:
        return done, 0, reused

    def decode(item: tuple[_ClassWork, int]) -> tuple[_ClassWork, int, torch.Tensor | None, str | None]:
        work, i = item
        try:
            image = load_image(work.samples[i].path, max_side=max_side)
        except ImageError as e:
            return work, i, None, e.reason
        return work, i, encoder.preprocess(augmented_views(image, augment)), None

    def commit(work: _ClassWork) -> None:
        _save_class(work_dir, work, root, encoder.embed_dim)
        done[work.cid] = _load_class(work_dir, work.key) or (torch.zeros(0, encoder.embed_dim), [], [])
        _test_pause()

    workers = default_workers(encoder) if workers is None else workers
    log = open(work_dir / "encoded.log", "a", encoding="utf-8")
    bar = tqdm(total=len(items), desc="encoding support images", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    encoded = 0
    batch: list[tuple[_ClassWork, int, torch.Tensor]] = []

    def flush() -> None:
        nonlocal encoded, batch
        if not batch:
            return
        log.write("".join(f"{w.samples[i].path}\n" for w, i, _ in batch))
        log.flush()
        pixels = torch.cat([p for _, _, p in batch])
        feats = encoder.encode_pixels(pixels).float()
        start = 0
        for work, i, p in batch:
            views = feats[start:start + p.shape[0]]
            start += p.shape[0]
            work.rows[i] = torch.nn.functional.normalize(views.mean(0), dim=0)
            work.remaining -= 1
        encoded += len(batch)
        bar.update(len(batch))
        finished = {id(w): w for w, _, _ in batch if w.remaining == 0}
        batch = []
        for work in finished.values():
            commit(work)

    try:
        with torch.inference_mode():
            rows = 0
            window = max(2 * batch_size // _views_per_image(augment), 4)  # about two batches decoded ahead
            for work, i, pixels, reason in _prefetch(items, decode, workers, window):
                if pixels is None:
                    work.skipped.append((i, reason))
                    work.remaining -= 1
                    bar.update(1)
                    if work.remaining == 0:  # its last image failed; the others are all encoded
                        commit(work)
                    continue
                batch.append((work, i, pixels))
                rows += pixels.shape[0]
                if rows >= batch_size:
                    flush()
                    rows = 0
            flush()
    finally:
        bar.close()
        log.close()
    return done, encoded, reused


# ----------------------------------------------------------------------------------------------------------
# building: text prototypes and descriptions


def describe_classes(vlm: Any, class_images: list[tuple[str, list[Image.Image]]], *, batch_size: int = 4,
                     max_new_tokens: int = DESCRIPTION_MAX_NEW_TOKENS, progress: bool = True,
                     on_batch: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """One description per class of its discriminative visible features, written by a Qwen2.5-VL.

    Each prompt shows up to 3 support images and asks for the features that tell the class apart; classes
    are generated in batches (left padding), greedy, at most `max_new_tokens` new tokens. `on_batch` gets
    each batch's results (the build saves them so a killed build does not regenerate them).
    """
    from tqdm import tqdm

    proc, tok, model = vlm.processor, vlm.tokenizer, vlm.model
    device = next(model.parameters()).device
    out: dict[str, str] = {}
    old_side = getattr(tok, "padding_side", "right")
    tok.padding_side = "left"  # generation continues from the last position: pad on the left
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    try:
        steps = range(0, len(class_images), batch_size)
        for b in tqdm(steps, desc="describing classes", unit="batch", file=sys.stderr, disable=not progress):
            chunk = class_images[b:b + batch_size]
            texts, images = [], []
            for name, imgs in chunk:
                content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": DESCRIPTION_PROMPT.format(name=name)}]
                texts.append(proc.apply_chat_template([{"role": "user", "content": content}],
                                                      tokenize=False, add_generation_prompt=True))
                images += imgs
            inputs = proc(text=texts, images=images or None, padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id)
            new = gen[:, inputs["input_ids"].shape[1]:]
            got = {name: " ".join(t.split()) for (name, _), t in
                   zip(chunk, tok.batch_decode(new, skip_special_tokens=True))}
            out.update(got)
            if on_batch is not None:
                on_batch(got)
    finally:
        tok.padding_side = old_side
    return out


def text_prototypes(encoder: Any, classes: list[str], descriptions: dict[str, str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES,
                    description_weight: float = DESCRIPTION_WEIGHT) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its template embeddings, mixed with its description's
    embedding (weight `description_weight`) where it has a non-empty one, re-normalised."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = encoder.encode_texts(prompts).float().reshape(len(classes), len(templates), -1)
    protos = torch.nn.functional.normalize(emb.mean(1), dim=1)
    have = [i for i, c in enumerate(classes) if descriptions.get(c, "").strip()]
    if have:
        d = encoder.encode_texts([descriptions[classes[i]] for i in have]).float()
        idx = torch.tensor(have)
        protos[idx] = (1 - description_weight) * protos[idx] + description_weight * torch.nn.functional.normalize(d, dim=1)
    return torch.nn.functional.normalize(protos, dim=1)


# ----------------------------------------------------------------------------------------------------------
# building: statistics and fusion


class _Scoring:
    """The minimal view of a base `fast_path.support_loo` reads, with a given fusion."""

    def __init__(self, kb: KnowledgeBase, fusion: dict) -> None:
        self.prototypes, self.exemplars, self.exemplar_labels = kb.prototypes, kb.exemplars, kb.exemplar_labels
        self.text_prototypes, self.fusion, self.stats = kb.text_prototypes, fusion, None


def choose_fusion(kb: KnowledgeBase) -> dict:
    """(w, tau, exemplar_weight) minimising the leave-one-out negative log-likelihood of the support set.

    System 1's logits are linear in the fusion weights: w * ((1-e) * s_proto + e * s_exemplar) + (1-w) * s_text.
    So three leave-one-out passes (prototype only, exemplar only, text only) give every grid point by
    mixing, and tau is searched on a log grid per (w, e). w is searched only with text prototypes.
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
    y = labels[mask].view(-1, 1)
    best: tuple[float, dict] | None = None
    for w in (W_GRID if has_text else (1.0,)):
        for e in EXEMPLAR_WEIGHT_GRID:
            logits = (1 - e) * s_proto + e * s_ex
            if s_txt is not None:
                logits = w * logits + (1 - w) * s_txt
            own = logits.gather(1, y).squeeze(1)
            for tau in TAU_GRID:
                nll = float((torch.logsumexp(logits / tau, dim=1) - own / tau).mean())
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


# ----------------------------------------------------------------------------------------------------------
# the build


def build_knowledge_base(
    data: str | Path | Dataset,
    out: str | Path,
    *,
    shots: int,
    seed: int = 0,
    encoder: Any = "efficientnet-lite0",
    vlm: Any = None,
    device: str = "cpu",
    batch_size: int = 32,
    augment: str | Iterable[str] | None = None,
    classes_file: str | Path | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    workers: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    vlm_batch_size: int = 4,
    progress: bool = True,
) -> tuple[KnowledgeBase, BuildSummary]:
    """Build a knowledge base from k images per class of `data` and write it atomically to `out`.

    `encoder`/`vlm`: a spec string (`efficientnet-lite0`, a model folder) or a ModelSpec. Resumable: see
    the module docstring. Bad image files are skipped and listed; a class left with no usable support
    image is an error naming it and its files (the other classes' work is kept for the rerun).
    """
    from fgvr.models import registry
    from fgvr.models.spec import ModelSpec, parse_spec

    t0 = time.perf_counter()
    out = _check_out(out)  # before any work: refusing at the end would waste the whole build
    augment = parse_augment(augment)
    if batch_size < 1:
        raise KnowledgeBaseError(f"batch size must be at least 1, got {batch_size}")
    ds = data if isinstance(data, Dataset) else read_dataset(Path(data), classes_file)
    support, _ = split_k_shot(ds, shots, seed)
    spec = encoder if isinstance(encoder, ModelSpec) else parse_spec(str(encoder), device=device)
    vlm_spec = None
    if vlm is not None:
        vlm_spec = vlm if isinstance(vlm, ModelSpec) else parse_spec(str(vlm), device=device)
        if vlm_spec.family != "qwen2_5_vl":
            raise KnowledgeBaseError(f"--vlm must be a Qwen2.5-VL folder; {vlm} is a {vlm_spec.family} model")

    partial_root = out.parent / f"{out.name}.partial"
    work_dir = partial_root / _config_hash(spec.to_json(), augment, max_side)
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in partial_root.iterdir():  # work of another configuration can never be reused
        if stale.is_dir() and stale != work_dir:
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a save killed before its rename
        shutil.rmtree(stale, ignore_errors=True)

    phases = {"read": time.perf_counter() - t0}
    t = time.perf_counter()
    with registry.use(spec) as enc:
        results, encoded, reused = encode_support(
            enc, ds.classes, support, root=ds.root, work_dir=work_dir, augment=augment,
            batch_size=batch_size, workers=workers, max_side=max_side, progress=progress,
        )
        embed_dim, has_text, image_size = enc.embed_dim, enc.has_text, enc.image_size

    skipped = [{"path": _display_path(p, ds.root), "reason": r} for p, r in ds.ignored]
    empty = []
    for cid, name in enumerate(ds.classes):
        ex, used, skips = results[cid]
        skipped += [{"path": p, "reason": r} for p, r in skips]
        if ex.shape[0] == 0:
            empty.append(f"{name!r} ({'; '.join(f'{p}: {r}' for p, r in skips)})")
        elif ex.shape[0] < min(shots, len(used) + len(skips)):  # (too few files: split_k_shot warned)
            warnings.warn(f"class {name!r} has {ex.shape[0]} usable support image(s), fewer than k={shots}, "
                          f"after skipping {len(skips)} bad file(s)", stacklevel=2)
    if empty:
        raise KnowledgeBaseError(
            f"no usable support image for class(es) {', '.join(empty)}: replace or remove the bad files and "
            f"rerun (finished classes are kept in {partial_root})"
        )

    exemplars = torch.cat([results[c][0] for c in range(len(ds.classes))]).float()
    labels = torch.cat([torch.full((results[c][0].shape[0],), c, dtype=torch.int64) for c in range(len(ds.classes))])
    sums = torch.zeros(len(ds.classes), embed_dim).index_add_(0, labels, exemplars)
    prototypes = torch.nn.functional.normalize(sums, dim=1)

    phases["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    descriptions: dict[str, str] = {}
    if vlm_spec is not None:
        desc_file = work_dir / f"descriptions-{hashlib.sha256(vlm_spec.key.encode()).hexdigest()[:12]}.json"
        descriptions = read_json(desc_file) if desc_file.is_file() else {}
        pending = []
        for cid, name in enumerate(ds.classes):
            if name in descriptions:
                continue
            imgs = []
            for rel in results[cid][1]:
                if len(imgs) == DESCRIPTION_IMAGES:
                    break
                try:  # re-read: keeping every decoded image for this step would not bound memory
                    imgs.append(load_image(Path(rel) if Path(rel).is_absolute() else ds.root / rel, max_side=max_side))
                except ImageError:  # changed on disk since it was encoded: describe from the others
                    continue
            if imgs:
                pending.append((name, imgs))
        if pending:
            def save_batch(got: dict[str, str]) -> None:
                descriptions.update(got)
                atomic_write_json(desc_file, descriptions)

            with registry.use(vlm_spec) as vl:
                describe_classes(vl, pending, batch_size=vlm_batch_size, progress=progress, on_batch=save_batch)
        descriptions = {c: descriptions.get(c, "") for c in ds.classes}

    text = None
    if has_text:
        with registry.use(spec) as enc:
            text = text_prototypes(enc, ds.classes, descriptions, templates)

    support_records = []
    for cid in range(len(ds.classes)):
        support_records += [{"path": p, "class_id": cid} for p in results[cid][1]]
    manifest = {
        "format_version": FORMAT_VERSION,
        "fgvr_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoder": {"key": spec.key, "name": spec.name, "spec": spec.to_json(), "embed_dim": embed_dim,
                    "image_size": image_size, "has_text": has_text},
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
        "vlm": ({"key": vlm_spec.key, "name": vlm_spec.name, "prompt": DESCRIPTION_PROMPT,
                 "images_per_class": DESCRIPTION_IMAGES, "max_new_tokens": DESCRIPTION_MAX_NEW_TOKENS}
                if vlm_spec is not None else None),
    }
    kb = KnowledgeBase(classes=list(ds.classes), encoder_spec=spec.to_json(), encoder_key=spec.key,
                       embed_dim=embed_dim, prototypes=prototypes, exemplars=exemplars, exemplar_labels=labels,
                       text_prototypes=text, descriptions=descriptions, manifest=manifest)
    phases["text"] = time.perf_counter() - t
    t = time.perf_counter()
    kb.fusion = choose_fusion(kb)
    kb.stats = retrieval_stats(kb, kb.fusion)
    seconds = time.perf_counter() - t0
    manifest["stats"] = {"excluded": kb.stats.excluded, "loo_accuracy": kb.stats.accuracy,
                         "rule": "leave-one-out; images of single-image classes excluded"}
    phases["stats"] = time.perf_counter() - t
    manifest["build"] = {"seconds": round(seconds, 3), "images_encoded": encoded, "classes_reused": reused,
                         "phases": {k: round(v, 3) for k, v in phases.items()}}
    t = time.perf_counter()
    save_knowledge_base(kb, out)
    shutil.rmtree(partial_root, ignore_errors=True)
    summary = BuildSummary(classes=len(ds.classes), images_used=int(exemplars.shape[0]), images_encoded=encoded,
                           classes_reused=reused, skipped=skipped, seconds=time.perf_counter() - t0,
                           descriptions=sum(bool(d) for d in descriptions.values()),
                           phases={**phases, "save": time.perf_counter() - t})
    return kb, summary


# ----------------------------------------------------------------------------------------------------------
# showing


def describe(kb: KnowledgeBase, max_classes: int = 50) -> str:
    """A readable account of what a base holds (`fgvr kb show`)."""
    m = kb.manifest
    lines = [f"knowledge base {kb.path}", f"  format v{m.get('format_version')}, fgvr {m.get('fgvr_version')}, "
             f"created {m.get('created')}"]
    enc = m.get("encoder", {})
    lines.append(f"  encoder {enc.get('name')} ({enc.get('embed_dim')}-d, input {enc.get('image_size')}px, "
                 f"{'image+text' if enc.get('has_text') else 'image only'}), key {enc.get('key')}")
    lines.append(f"  {kb.num_classes} classes, k={m.get('k')}, seed={m.get('seed')}, "
                 f"augmentations: {', '.join(m.get('augmentations') or []) or 'none'}")
    sizes = ""
    if kb.path is not None:
        sizes = ", ".join(f"{f.name} {f.stat().st_size:,} B" for f in sorted(kb.path.iterdir()) if f.is_file())
    lines.append(f"  exemplars {tuple(kb.exemplars.shape)}, prototypes {tuple(kb.prototypes.shape)}, text prototypes "
                 f"{tuple(kb.text_prototypes.shape) if kb.text_prototypes is not None else 'none'}")
    if sizes:
        lines.append(f"  files: {sizes}")
    f = kb.fusion
    lines.append(f"  fusion: w={f.get('w')}, tau={f.get('tau'):.4g}, exemplar_weight={f.get('exemplar_weight')} "
                 f"({f.get('source', '')})" if f.get("tau") is not None else f"  fusion: {f}")
    if kb.stats is not None:
        s = kb.stats
        lines.append(f"  leave-one-out accuracy on the support set: {s.accuracy:.3f} over {int(s.true_total.sum())} "
                     f"images ({s.excluded} excluded: single-image classes)")
    lines.append("")
    lines.append(f"  {'id':>4}  {'class':<32} {'support':>7}  {'recall m/n':>10}  {'precision m/n':>13}")
    support = {c["id"]: c.get("support") for c in m.get("classes", [])}
    for i, name in enumerate(kb.classes[:max_classes]):
        rec = prec = "-"
        if kb.stats is not None:
            rec = f"{int(kb.stats.true_correct[i])}/{int(kb.stats.true_total[i])}"
            prec = f"{int(kb.stats.pred_correct[i])}/{int(kb.stats.pred_total[i])}"
        lines.append(f"  {i:>4}  {name[:32]:<32} {support.get(i, '?'):>7}  {rec:>10}  {prec:>13}")
    if kb.num_classes > max_classes:
        lines.append(f"  ... {kb.num_classes - max_classes} more classes")
    skipped = m.get("skipped", [])
    lines.append("")
    lines.append(f"  skipped files: {len(skipped)}")
    lines += [f"    {s['path']}: {s['reason']}" for s in skipped[:max_classes]]
    if kb.descriptions:
        lines.append("")
        lines.append(f"  descriptions ({(m.get('vlm') or {}).get('name', '?')}):")
        for name in kb.classes[:max_classes]:
            if name in kb.descriptions:
                lines.append(f"    {name}: {kb.descriptions[name]}")
    return "\n".join(lines)
