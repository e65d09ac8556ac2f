"""The CPU System 2: a visual re-ranker. It looks again, more carefully, at the few candidates System 1 proposed.

It is named for what it is: a second, stronger *visual* comparison, not reasoning. Where a VLM would read
lettered options, this re-ranker

1. encodes the query with a bigger encoder (EfficientNet-Lite2 by default) under test-time augmentation:
   the image and its mirror image, features averaged (the mirror's feature map is flipped back first, so
   spatial cells line up);
2. keeps coarse *spatial* layout as well as the pooled vector: the feature map average-pooled to a
   `grid`x`grid` layout. System 1's pooled embedding throws away where things are, and for fine-grained
   classes that differ in where a part sits (sleeve length, collar, heel) the layout is the evidence;
3. matches against the candidates' support exemplars, encoded the same way once and cached: a score
   mixing the best exemplar (nearest neighbour) with the class mean (prototype);
4. returns a softmax over the candidates only. How much the layout counts against the pooled vector, how
   much the class mean counts against the best exemplar, and the temperature are chosen together on the
   support set (leave-one-out negative log-likelihood), never on test images, so the probabilities
   combine sensibly with System 1's.

It meets `fgvr.slow_path.SlowPath` (name 'visual-reranker') and gets its encoder only through the
registry. Its feature pipeline is exposed (`features`, `scores_from_features`) so a benchmark can cache
query features once and reuse them; `rank` is the same computation end to end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from fgvr import scoring
from fgvr.defaults import DEFAULTS
from fgvr.errors import KnowledgeBaseError as _KBError
from fgvr.slow_path import SlowAnswer, SlowQuery

DEFAULT_ENCODER = "efficientnet-lite2"
DEFAULT_IMAGE_SIZE = 260  # Lite2's native resolution, for photos that carry that much detail
SMALL_SOURCE_SIZE = 224  # where every support image is smaller than this: see `image_size_for`
DEFAULT_VIEWS = ("identity", "flip")
DEFAULT_GRID = 3
DEFAULT_TEMPERATURE = DEFAULTS.reranker_temperature  # used only when the support set cannot tell (one shot per class)
TEMPERATURES = scoring.TEMPERATURES  # the one temperature grid (System 1's fusion fit uses it too)
PROTO_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAYOUT_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
DEFAULT_PROTO_WEIGHT = 0.5
DEFAULT_LAYOUT_WEIGHT = 0.5


class CacheWarning(UserWarning):
    """A derived cache that failed its check (rebuilt) or could not be written (kept in memory)."""


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()


class RerankerError(_KBError):
    """A re-ranker that cannot be built as asked (no support images, mismatched labels); says what to do."""


def _view(pixels: torch.Tensor, view: str) -> torch.Tensor:
    if view == "identity":
        return pixels
    if view == "flip":
        return pixels.flip(-1)
    if view.startswith("crop"):  # "crop90": central 90% crop, resized back to the input size
        frac = int(view[4:]) / 100.0
        h, w = pixels.shape[-2:]
        ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = pixels[..., top : top + ch, left : left + cw]
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
    raise RerankerError(f"unknown test-time view {view!r}: use identity, flip or cropNN (e.g. crop90)")


def tta_descriptors(encoder: Any, pixels: torch.Tensor, views: Sequence[str], grid: int) -> torch.Tensor:
    """(N,3,H,W) preprocessed pixels -> (N,D') L2-normalised descriptors, averaged over the TTA views.

    The descriptor is [pooled, grid layout], each part L2-normalised and weighted equally, so a dot product
    is the mean of the two cosines. Encoders that expose no feature map (`.feature_map`) give the
    pooled embedding only.
    """
    fmap_fn = getattr(encoder, "feature_map", None)  # the encoder's runtime (ONNX Runtime or torch) runs it
    if grid <= 0 or fmap_fn is None:
        pooled = torch.stack([encoder.encode_pixels(_view(pixels, v)).float().cpu() for v in views]).mean(0)
        return F.normalize(pooled, dim=-1)
    pooled, layout = [], []
    for view in views:
        with torch.inference_mode():
            fmap = fmap_fn(_view(pixels, view)).float().cpu()
        if view == "flip":
            fmap = fmap.flip(-1)  # put the mirror image's cells back where the original's are
        pooled.append(F.normalize(fmap.mean(dim=(2, 3)), dim=-1))
        layout.append(F.normalize(F.adaptive_avg_pool2d(fmap, grid).flatten(1), dim=-1))
    pooled_mean = F.normalize(torch.stack(pooled).mean(0), dim=-1)
    layout_mean = F.normalize(torch.stack(layout).mean(0), dim=-1)
    return torch.cat([pooled_mean, layout_mean], dim=1) / math.sqrt(2)


def weight_parts(descriptors: torch.Tensor, grid: int, layout_weight: float) -> torch.Tensor:
    """Re-weight a [pooled, layout] descriptor so a dot product is (1-w)*cos(pooled) + w*cos(layout).

    `tta_descriptors` gives each part norm 1/sqrt(2) (w = 0.5); how much the layout should count is a property of
    the data (aligned product photos: a lot; free-form photos: less), so it is chosen on the support set.
    """
    if grid <= 0:
        return descriptors
    pooled = descriptors.shape[1] // (grid * grid + 1)
    return torch.cat([descriptors[:, :pooled] * math.sqrt(2 * (1 - layout_weight)),
                      descriptors[:, pooled:] * math.sqrt(2 * layout_weight)], dim=1)


def match_scores(
    queries: torch.Tensor,
    exemplars: torch.Tensor,
    exemplar_labels: torch.Tensor,
    num_classes: int,
    proto_weight: float,
) -> torch.Tensor:
    """(B,D') query descriptors -> (B,C) scores: proto_weight * prototype cosine + (1 - it) * best exemplar."""
    support = scoring.Support(exemplars, exemplar_labels, num_classes)
    return scoring.image_scores(queries, support.prototypes, exemplars, support.labels, 1 - proto_weight)


def candidate_softmax(scores: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,C) scores and (B,k) candidate ids -> (B,k) probabilities over the candidates, same order."""
    return torch.softmax(scores.gather(1, candidates.long()) / temperature, dim=1)


def support_loo_scores(
    exemplars: torch.Tensor, labels: torch.Tensor, num_classes: int, proto_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each support descriptor scored against the support set without itself: (N,C) scores, (N,) usable.

    An image whose class has no other exemplar cannot be scored fairly for its own class, so it is marked
    unusable (it would only teach the temperature that the right answer scores -inf).
    """
    support = scoring.Support(exemplars, labels, num_classes)
    s_proto, s_ex = support.loo_parts()
    return scoring.mix(s_proto, s_ex, 1 - proto_weight), support.usable


def fit_on_support(
    exemplars: torch.Tensor, labels: torch.Tensor, num_classes: int, grid: int = 0
) -> dict[str, Any]:
    """proto_weight, layout_weight and temperature chosen by leave-one-out on the support set, never on test data.

    Every (proto_weight, layout_weight) pair is scored leave-one-out over all classes, each at its best
    temperature; the triple with the lowest negative log-likelihood wins. NLL rather than accuracy: with
    a few dozen support images accuracy ties often and jumps in steps, NLL separates the choices smoothly
    and also sets the temperature the probabilities are combined with. One shot per class leaves nothing
    to hold out: the defaults are returned and the log says so.
    """
    labels = labels.long()
    layouts = LAYOUT_WEIGHTS if grid > 0 else (0.0,)
    default = {"proto_weight": DEFAULT_PROTO_WEIGHT, "layout_weight": DEFAULT_LAYOUT_WEIGHT if grid > 0 else 0.0,
               "temperature": DEFAULT_TEMPERATURE}
    best = None
    for b in layouts:
        support = scoring.Support(weight_parts(exemplars, grid, b), labels, num_classes)
        usable = support.usable
        if not bool(usable.any()):
            return default | {"fitted": False, "reason": "one support image per class"}
        s_proto, s_ex = support.loo_parts()  # one leave-one-out pass; each proto_weight is a mix of it
        for a in PROTO_WEIGHTS:
            s, y = scoring.mix(s_proto, s_ex, 1 - a)[usable], labels[usable]
            t, nll = scoring.fit_temperature(s, y, TEMPERATURES)
            if best is None or nll < best["loo_nll"]:
                best = {"proto_weight": a, "layout_weight": b, "temperature": t, "loo_nll": nll,
                        "loo_accuracy": float((s.argmax(1) == y).float().mean()), "n": int(usable.sum())}
    return best | {"fitted": True}


def image_size_for(paths: Sequence[str | os.PathLike]) -> int:
    """The re-ranker's input size for a base's support images: one rule, so every way in gives one answer.

    Lite2's native 260 where any support image is at least 224 on its short side; 224 (System 1's size) where
    all of them are smaller, since they are enlarged either way and the extra pixels carry no detail. On
    Fashion-MNIST's 28-px images (train-split validation, 500 images, 5 shots, seeds 0-2) the dual system
    reached 0.741 at 224 and 0.742 at 260, for 1.7 times the encoding time. Only image headers are read; an
    unreadable file counts as large (the re-ranker reports it by name when it encodes it).
    """
    for p in paths:
        try:
            with Image.open(p) as im:
                if min(im.size) >= SMALL_SOURCE_SIZE:
                    return DEFAULT_IMAGE_SIZE
        except (OSError, ValueError, Image.DecompressionBombError):
            return DEFAULT_IMAGE_SIZE
    return SMALL_SOURCE_SIZE


class VisualReranker:
    """System 2 on CPU: re-rank System 1's candidates by matching a TTA'd Lite2 view against their exemplars.

    `support_paths[i]` has class id `support_labels[i]` (ids index the knowledge base's classes). The
    support descriptors are computed once, on first use, and cached in memory and, with `cache_dir`, on
    disk (keyed by encoder, views, grid and the files' names, sizes and modification times).
    """

    name = "visual-reranker"

    def __init__(
        self,
        support_paths: Sequence[str | os.PathLike],
        support_labels: Sequence[int],
        num_classes: int,
        *,
        encoder: str = DEFAULT_ENCODER,
        image_size: int | None = DEFAULT_IMAGE_SIZE,
        device: str = "cpu",
        views: Sequence[str] = DEFAULT_VIEWS,
        grid: int = DEFAULT_GRID,
        proto_weight: float | None = None,
        layout_weight: float | None = None,
        temperature: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        from fgvr.models import parse_spec

        if len(support_paths) == 0:
            raise RerankerError("the visual re-ranker needs support images to compare against; the base has none")
        if len(support_paths) != len(support_labels):
            raise RerankerError(f"{len(support_paths)} support paths but {len(support_labels)} labels")
        for v in views:
            _view(torch.zeros(1, 3, 4, 4), v)  # unknown view names fail here, not mid-run
        self.support_paths = [Path(p) for p in support_paths]
        self.support_labels = torch.as_tensor(list(support_labels), dtype=torch.long)
        self.num_classes = int(num_classes)
        if int(self.support_labels.max()) >= self.num_classes or int(self.support_labels.min()) < 0:
            raise RerankerError(f"support labels must lie in 0..{self.num_classes - 1}")
        self.spec = parse_spec(encoder, device=device, image_size=image_size)
        self.views = tuple(views)
        self.grid = int(grid)
        self.proto_weight = proto_weight
        self.layout_weight = layout_weight if self.grid > 0 else 0.0
        self.temperature = temperature
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.progress = progress
        self.fit_log: dict[str, Any] = {}
        self._support: torch.Tensor | None = None

    @classmethod
    def from_knowledge_base(cls, kb: Any, **kwargs: Any) -> "VisualReranker":
        """Built from a knowledge base's manifest: its support files (relative to the data root) and class ids.

        Without `image_size`, the size follows the support images (`image_size_for`), so the demo, `fgvr
        classify`, `fgvr serve` and `fgvr evaluate` give the same answers on the same base.
        """
        records = kb.support_files()
        if not records:
            raise RerankerError(
                f"knowledge base {getattr(kb, 'path', '') or ''} lists no support image paths; "
                "rebuild it with `fgvr build-kb` so the visual re-ranker can find the exemplars"
            )
        paths = [r.path for r in records]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise RerankerError(
                f"{len(missing)} support image(s) of the knowledge base are gone (first: {missing[0]}); the "
                "visual re-ranker compares against them: restore the folder or rebuild the base"
            )
        if getattr(kb, "path", None) is not None and "cache_dir" not in kwargs:
            kwargs["cache_dir"] = Path(kb.path) / "reranker-cache"  # goes with the base when it is rebuilt
        if kwargs.get("image_size") is None:
            kwargs["image_size"] = image_size_for(paths)
        return cls(paths, [r.class_id for r in records], len(kb.classes), **kwargs)

    # --- features --------------------------------------------------------------------------------------
    def features(self, images: Sequence[Image.Image], progress: bool = False) -> torch.Tensor:
        """(N,D') TTA descriptors of PIL images, in batches, through a registry lease."""
        from fgvr.models import registry

        out = []
        steps = range(0, len(images), self.batch_size)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"re-ranker ({self.spec.name})", unit="batch", file=sys.stderr)
        with registry.use(self.spec) as enc:
            for i in steps:
                out.append(tta_descriptors(enc, enc.preprocess(images[i : i + self.batch_size]), self.views, self.grid))
        if not out:
            raise RerankerError("no images to describe")
        return torch.cat(out)

    def _cache_key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.spec.key, list(self.views), self.grid]).encode())
        for p, y in zip(self.support_paths, self.support_labels.tolist()):
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{y}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:20]

    def support_features(self) -> torch.Tensor:
        """The exemplars' descriptors: computed once (per process, and per cache_dir on disk)."""
        if self._support is not None:
            return self._support
        from fgvr.data import load_image

        cache = None
        if self.cache_dir is not None:
            cache = self.cache_dir / f"support-{self._cache_key()}.safetensors"
            if cache.is_file():
                cached = self._read_cache(cache)
                if cached is not None:
                    self._support = cached
                    return cached
        images = [load_image(p) for p in self.support_paths]  # ImageError names the file
        feats = self.features(images, progress=self.progress)
        if cache is not None:
            from safetensors.torch import save

            from fgvr.io import atomic_write_bytes

            data = save({"descriptors": feats.contiguous()}, metadata={"sha256": _tensor_sha256(feats)})
            try:
                atomic_write_bytes(cache, data)
            except OSError as e:
                warnings.warn(f"cannot write the re-ranker cache {cache} ({e.strerror or e}); keeping it in memory "
                              "for this run (the next run computes it again)", CacheWarning, stacklevel=2)
        self._support = feats
        return feats

    def _read_cache(self, cache: Path) -> torch.Tensor | None:
        """The cached descriptors, or None (with a warning: the cache is then rebuilt) when the file fails its
        checksum, does not parse, or does not fit the support set."""
        from safetensors import safe_open

        try:
            with safe_open(str(cache), framework="pt") as sf:
                digest = (sf.metadata() or {}).get("sha256")
                feats = sf.get_tensor("descriptors")
            if digest is None:
                raise ValueError("it carries no checksum")
            if _tensor_sha256(feats) != digest:
                raise ValueError("its content does not match its checksum")
            if feats.ndim != 2 or feats.shape[0] != len(self.support_paths):
                raise ValueError(f"it has shape {tuple(feats.shape)} for {len(self.support_paths)} support images")
        except Exception as e:  # noqa: BLE001 - a derived file: any failure means "compute it again"
            warnings.warn(f"the re-ranker cache {cache} is damaged ({e}); rebuilding it", CacheWarning, stacklevel=3)
            return None
        return feats

    def calibrate(self) -> None:
        """Choose proto_weight, layout_weight and temperature on the support set (leave-one-out) unless given."""
        if None not in (self.proto_weight, self.layout_weight, self.temperature):
            return
        fit = fit_on_support(self.support_features(), self.support_labels, self.num_classes, self.grid)
        for name in ("proto_weight", "layout_weight", "temperature"):
            if getattr(self, name) is None:
                setattr(self, name, fit[name])
        self.fit_log = fit | {n: getattr(self, n) for n in ("proto_weight", "layout_weight", "temperature")}

    def scores_from_features(self, query_features: torch.Tensor) -> torch.Tensor:
        """(B,D') query descriptors -> (B,C) match scores against every class."""
        self.calibrate()
        w = float(self.layout_weight)
        return match_scores(weight_parts(query_features, self.grid, w),
                            weight_parts(self.support_features(), self.grid, w),
                            self.support_labels, self.num_classes, float(self.proto_weight))

    def probs_from_features(self, query_features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B,D') descriptors and (B,k) candidate ids -> (B,k) probabilities over each row's candidates."""
        return candidate_softmax(self.scores_from_features(query_features), candidates, float(self.temperature))

    # --- the SlowPath interface ------------------------------------------------------------------------
    def rank(self, queries: Sequence[SlowQuery]) -> list[SlowAnswer]:
        """One batch of queries: a distribution over each query's candidates (variable lengths allowed)."""
        if not queries:
            return []
        t0 = time.perf_counter()
        for q in queries:
            if not q.candidates:
                raise RerankerError(f"query {q.path or ''} has no candidates to re-rank")
            bad = [c for c in q.candidates if not 0 <= int(c) < self.num_classes]
            if bad:
                raise RerankerError(f"query {q.path or ''}: candidate ids {bad} outside 0..{self.num_classes - 1}")
        self.calibrate()
        feats = self.features([q.image for q in queries])
        scores = self.scores_from_features(feats)
        per = (time.perf_counter() - t0) / len(queries)
        answers = []
        for i, q in enumerate(queries):
            cand = torch.as_tensor([int(c) for c in q.candidates]).unsqueeze(0)
            probs = candidate_softmax(scores[i : i + 1], cand, float(self.temperature))[0]
            answers.append(SlowAnswer(probs=probs.double().tolist(), rationale=None, seconds=per))
        return answers
