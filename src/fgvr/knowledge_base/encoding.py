"""Knowledge-base encoding: support images -> one L2-normalised exemplar per image, resumable per class.

Each support image is decoded once (decode threads work ahead while the model runs, where a core is free:
see `default_workers`) and encoded once, in batches that span classes, under inference mode. Optional
augmentations (flip, corner crops) are encoded with it and averaged into one exemplar per image.

Resume: per-class results go to `<out>.partial/<config hash>/` as each class finishes (atomic files), so a
build killed at any point restarts with the classes it has not finished. Each class file is keyed by the
class's support files (path, size, mtime), so a changed class is re-encoded and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from fgvr.data import DEFAULT_MAX_SIDE, ImageError, Sample, load_image
from fgvr.io import atomic_write_bytes, json_dumps
from fgvr.knowledge_base.storage import FORMAT_VERSION, KnowledgeBaseError
from fgvr.run_dir import identity_key

AUGMENTATIONS = ("flip", "crop")
CROP_FRACTION = 0.8  # "crop": the four corner crops covering 80% of each side

ClassExemplars = tuple[torch.Tensor, list[str], list[list[str]]]  # (exemplars (n,D), used paths, skips)


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
    h = hashlib.sha256(name.encode("utf-8", "surrogateescape"))
    for s in samples:
        try:
            st = s.path.stat()
            h.update(f"\0{s.path}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"\0{s.path}\0missing".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def _config_hash(spec_json: dict, augment: tuple[str, ...], max_side: int | None) -> str:
    """What makes two builds' exemplars interchangeable. The device is left out: a build started on one
    device may finish on another (float noise only)."""
    identity = {k: v for k, v in spec_json.items() if k != "device"}
    return identity_key({"format": FORMAT_VERSION, "encoder": identity, "augment": list(augment), "max_side": max_side})


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
        "used": json_dumps([_display_path(work.samples[i].path, root) for i in order]),
        "skipped": json_dumps([[_display_path(work.samples[i].path, root), r] for i, r in work.skipped]),
    }
    atomic_write_bytes(work_dir / f"class-{work.key}.safetensors", save({"exemplars": ex.contiguous()}, metadata=meta))


def _load_class(work_dir: Path, key: str) -> ClassExemplars | None:
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
) -> tuple[dict[int, ClassExemplars], int, int]:
    """Exemplars per class id: {cid: (exemplars (n,D), used paths, [[path, reason], ...])}.

    Classes already finished in `work_dir` are read back; the rest are encoded in batches that span
    classes, and each class is written to `work_dir` the moment its last image is encoded.
    Returns (per-class results, images encoded now, classes reused).
    """
    done, todo = _plan_classes(classes, support, work_dir)
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

    workers = default_workers(encoder) if workers is None else workers
    run = _EncodingRun(encoder, work_dir, root, done, total=len(items), progress=progress)
    try:
        with torch.inference_mode():
            rows = 0
            window = max(2 * batch_size // _views_per_image(augment), 4)  # about two batches decoded ahead
            for work, i, pixels, reason in _prefetch(items, decode, workers, window):
                if pixels is None:
                    run.skip(work, i, reason)
                    continue
                run.batch.append((work, i, pixels))
                rows += pixels.shape[0]
                if rows >= batch_size:
                    run.flush()
                    rows = 0
            run.flush()
    finally:
        run.close()
    return done, run.encoded, reused


def _plan_classes(classes: list[str], support: list[Sample],
                  work_dir: Path) -> tuple[dict[int, ClassExemplars], list[_ClassWork]]:
    """Classes finished by an earlier run (read back from `work_dir`) and the work left for the others."""
    by_class: dict[str, list[Sample]] = {c: [] for c in classes}
    for s in support:
        by_class[s.label].append(s)
    done: dict[int, ClassExemplars] = {}
    todo: list[_ClassWork] = []
    for cid, name in enumerate(classes):
        key = _class_key(name, by_class[name])
        cached = _load_class(work_dir, key)
        if cached is not None:
            done[cid] = cached
        else:
            todo.append(_ClassWork(cid, name, by_class[name], key, remaining=len(by_class[name])))
    return done, todo


class _EncodingRun:
    """The state of one `encode_support` pass: the pending batch, the progress bar, and the classes done.

    A class is committed (written to `work_dir`) the moment its last image is encoded or skipped.
    """

    def __init__(self, encoder: Any, work_dir: Path, root: Path, done: dict[int, ClassExemplars], *,
                 total: int, progress: bool) -> None:
        from tqdm import tqdm

        self.encoder, self.work_dir, self.root, self.done = encoder, work_dir, root, done
        self.batch: list[tuple[_ClassWork, int, torch.Tensor]] = []
        self.encoded = 0
        self.bar = tqdm(total=total, desc="encoding support images", unit="img", file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)

    def commit(self, work: _ClassWork) -> None:
        dim = self.encoder.embed_dim
        _save_class(self.work_dir, work, self.root, dim)
        self.done[work.cid] = _load_class(self.work_dir, work.key) or (torch.zeros(0, dim), [], [])

    def skip(self, work: _ClassWork, i: int, reason: str | None) -> None:
        work.skipped.append((i, reason))
        work.remaining -= 1
        self.bar.update(1)
        if work.remaining == 0:  # its last image failed; the others are all encoded
            self.commit(work)

    def flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        pixels = torch.cat([p for _, _, p in batch])
        feats = self.encoder.encode_pixels(pixels).float()
        start = 0
        for work, i, p in batch:
            views = feats[start:start + p.shape[0]]
            start += p.shape[0]
            work.rows[i] = torch.nn.functional.normalize(views.mean(0), dim=0)
            work.remaining -= 1
        self.encoded += len(batch)
        self.bar.update(len(batch))
        finished = {id(w): w for w, _, _ in batch if w.remaining == 0}
        for work in finished.values():
            self.commit(work)

    def close(self) -> None:
        self.bar.close()
