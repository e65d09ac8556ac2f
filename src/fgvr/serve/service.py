"""The service: a loaded system, its queues, and how a `Result` becomes the API's JSON."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from fgvr.pipeline import PATH_UNAVAILABLE, DualSystem, Result
from fgvr.records import RECORD_SCHEMA
from fgvr.serve.batcher import MicroBatcher
from fgvr.serve.metrics import Metrics
from fgvr.serve.runs import RunBrowser
from fgvr.serve.settings import ServeSettings, UploadError
from fgvr.serve.upload import decode_upload, thumbnail_jpeg

log = logging.getLogger("fgvr.serve")

# The API answers with the record of `fgvr classify` and results.jsonl, of the same version
# (`fgvr.records.RECORD_SCHEMA`); it adds `score`, `support`, `why`, `system2` and `timings_ms`.


@dataclass
class _Query:
    image: Image.Image
    name: str
    decode_s: float
    base: "ServedBase | None" = None  # the base the request started on: it is answered on that one


@dataclass
class ServedBase:
    """One version of the base as served: the system over it (System 2 included), the same system without
    System 2 (what the encoder worker runs), and the support list the page's images are addressed by. A
    base swap builds a new one beside the old and switches `Service.base` in one assignment; requests in
    flight keep the one they started on. The encoder is shared by every version (the registry holds it)."""

    system: DualSystem
    fast: DualSystem
    support: list[dict[str, Any]]
    support_by_class: dict[int, list[int]]
    aligned: bool
    version: int


def served_base(system: DualSystem, encode_batch: int, version: int) -> ServedBase:
    kb = system.kb
    support = [{"index": i, "class_id": f.class_id, "file": str(f.path)} for i, f in enumerate(kb.support_files())]
    by_class: dict[int, list[int]] = {}
    for rec in support:
        by_class.setdefault(rec["class_id"], []).append(rec["index"])
    labels = getattr(kb, "exemplar_labels", None)
    aligned = (labels is not None and len(labels) == len(support)
               and all(int(labels[i]) == r["class_id"] for i, r in enumerate(support)))
    # The same trigger (threshold now fixed) without System 2: what the encoder worker runs.
    fast = DualSystem(kb, system.encoder, None, system.trigger, k=system.k, weight=system.weight,
                      w=system.w, tau=system.tau, encode_batch=encode_batch, open_set=system.open_set)
    return ServedBase(system, fast, support, by_class, aligned, version)


class Service:
    """Everything the routes share. `opener()` returns a context manager yielding a `DualSystem` (e.g.
    `open_system(kb, ...)`); it is entered on a background thread at start, so /healthz can say 'loading'."""

    def __init__(self, opener: Callable[[], AbstractContextManager[DualSystem]], settings: ServeSettings,
                 on_load_error: Callable[[BaseException], None] | None = None) -> None:
        self.opener, self.settings, self.on_load_error = opener, settings, on_load_error
        self.metrics = Metrics()
        self.base: ServedBase | None = None
        self.error: str | None = None
        self.started = time.time()
        self._stack = ExitStack()
        self._decoding = 0
        self._decode_sem: asyncio.Semaphore | None = None
        self.encoder_q: MicroBatcher | None = None
        self.slow_q: MicroBatcher | None = None
        self._thumbs: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self.runs = RunBrowser(settings.runs) if settings.runs is not None else None

    # --- life cycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._decode_sem = asyncio.Semaphore(max(1, s.decode_threads))
        self.encoder_q = MicroBatcher("encoder", self._fast_batch, s.encode_batch, s.encode_wait_ms / 1000,
                                      s.max_queue, pending=lambda: self._decoding,
                                      on_batch=lambda n: self.metrics.batch("encoder", n))
        self.slow_q = MicroBatcher("system2", self._slow_batch, s.slow_batch, 0.0, s.max_queue,
                                   on_batch=lambda n: self.metrics.batch("system2", n))
        self.encoder_q.start()
        self.slow_q.start()
        asyncio.get_running_loop().run_in_executor(None, self._load)

    def _load(self) -> None:
        try:
            system = self._stack.enter_context(self.opener())
            kb = system.kb
            self.base = served_base(system, self.settings.encode_batch, base_version(kb))
            log.info("ready: %d classes, System 2 %s, trigger threshold %.4f", len(kb.classes),
                     getattr(system.slow, "name", None), system.trigger.threshold)
        except BaseException as e:  # noqa: BLE001 - reported by /healthz and to the CLI, never swallowed
            self.error = f"{type(e).__name__}: {e}"
            if self.on_load_error is not None:
                self.on_load_error(e)  # the caller reports it (the CLI: one line, the error's exit code)
            else:
                log.error("could not load the models: %s", self.error)

    async def stop(self) -> None:
        for q in (self.encoder_q, self.slow_q):
            if q is not None:
                await q.stop()
        self._stack.close()

    @property
    def ready(self) -> bool:
        return self.base is not None

    @property
    def system(self) -> DualSystem | None:
        return self.base.system if self.base is not None else None

    @property
    def fast(self) -> DualSystem | None:
        return self.base.fast if self.base is not None else None

    @property
    def support(self) -> list[dict[str, Any]]:
        return self.base.support if self.base is not None else []

    @property
    def support_by_class(self) -> dict[int, list[int]]:
        return self.base.support_by_class if self.base is not None else {}

    def swap(self, kb: Any) -> ServedBase:
        """Serve `kb` (a new version of the same base) from now on: its system is built beside the one
        served now, reusing the loaded encoder and System 2's model, and switched in by one assignment.
        Requests already in flight finish on the version they started on. Call from a worker thread."""
        old = self.base
        if old is None:
            raise UploadError(503, "not ready: the models are still loading")
        new = served_base(rebased(old.system, kb), self.settings.encode_batch, base_version(kb))
        self.base = new
        log.info("serving base version %d: %d classes (was version %d)", new.version, len(kb.classes), old.version)
        return new

    def require_ready(self) -> DualSystem:
        if self.system is None:
            raise UploadError(503, f"not ready: {self.error or 'the models are still loading'}")
        return self.system

    # --- the two batch functions (run on the queues' worker threads) ---------------------------------
    def _fast_batch(self, queries: list[_Query]) -> list[tuple[Result, torch.Tensor]]:
        assert self.base is not None
        t = time.perf_counter()
        with torch.inference_mode():  # every version shares the encoder: one batch whatever their bases
            emb = self.base.fast.encoder.encode_images([q.image for q in queries], batch_size=self.settings.encode_batch)
        enc_s = (time.perf_counter() - t) / len(queries)
        results = []
        for q, e in zip(queries, emb):  # System 1 per image: a matmul, and per-image decode time stays exact
            fast = (q.base or self.base).fast  # on the version the request started on
            results += fast.classify_embeddings(e[None], [q.name], [q.image], {"decode": q.decode_s, "encode": enc_s})
        return list(zip(results, emb))

    def _slow_batch(self, items: list[tuple[_Query, torch.Tensor, Result]]) -> list[Result]:
        assert self.base is not None
        res: list[Result | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (q, _, _) in enumerate(items):
            groups.setdefault(id(q.base or self.base), []).append(i)
        for idx in groups.values():  # one System 2 call per base version in the batch (almost always one)
            base = items[idx[0]][0].base or self.base
            for i, r in zip(idx, self._slow_on(base.system, [items[i] for i in idx])):
                res[i] = r
        return res  # type: ignore[return-value]

    def _slow_on(self, system: DualSystem, items: list[tuple[_Query, torch.Tensor, Result]]) -> list[Result]:
        out = []
        for (q, e, fast) in items:
            keep = {k: fast.timings[k] for k in ("decode", "encode") if k in fast.timings}
            out.append((q, e, keep))
        emb = torch.stack([e for _, e, _ in out])
        res = system.classify_embeddings(emb, [q.name for q, _, _ in out], [q.image for q, _, _ in out])
        for r, (_, _, keep) in zip(res, out):
            r.timings.update(keep)
            r.timings["total"] = sum(v for k, v in r.timings.items() if k != "total")
        return res

    # --- one image -----------------------------------------------------------------------------------
    async def decode(self, data: bytes) -> tuple[Image.Image, float]:
        assert self._decode_sem is not None
        self._decoding += 1
        try:
            async with self._decode_sem:
                t = time.perf_counter()
                im = await asyncio.get_running_loop().run_in_executor(None, decode_upload, data, self.settings.max_pixels)
                return im, time.perf_counter() - t
        finally:
            self._decoding -= 1

    async def classify(self, data: bytes, name: str) -> dict[str, Any]:
        self.require_ready()
        base = self.base  # the request is answered on this version, even if a swap happens meanwhile
        assert base is not None and self.encoder_q is not None and self.slow_q is not None
        system = base.system
        t0 = time.perf_counter()
        image, decode_s = await self.decode(data)
        q = _Query(image, name, decode_s, base)
        (result, emb), wait_fast = await self.encoder_q.submit(q)
        wait_slow = 0.0
        if result.path_taken == PATH_UNAVAILABLE and system.slow is not None:
            result, wait_slow = await self.slow_q.submit((q, emb, result))
        self.metrics.result(result)
        return self.respond(result, emb, {"queue": wait_fast + wait_slow, "request": time.perf_counter() - t0}, base)

    # --- the JSON ------------------------------------------------------------------------------------
    def respond(self, r: Result, emb: torch.Tensor, extra_s: dict[str, float],
                base: ServedBase | None = None) -> dict[str, Any]:
        self.require_ready()
        base = base or self.base
        assert base is not None
        system = base.system
        kb = system.kb
        trig = r.trigger or {}
        cands = []
        for c in r.candidates:
            score = c.final if c.final is not None else c.fast
            cands.append({"id": c.id, "name": c.name, "score": score, "fast": c.fast, "slow": c.slow,
                          "support": self.support_for(c.id, emb, base)})
        cands.sort(key=lambda c: -c["score"])
        threshold, score = trig.get("threshold"), trig.get("score")
        out: dict[str, Any] = {
            "schema": RECORD_SCHEMA, "prediction": r.prediction, "prediction_name": r.prediction_name,
            "confidence": r.confidence,
            "path_taken": r.path_taken,
            "why": why(r, getattr(system.slow, "name", None)) + (
                "; answered unknown: not one of this base's classes (open set)" if r.unknown else ""),
            "trigger": {"score": score, "threshold": threshold, "go_slow": trig.get("go_slow"),
                        "inputs": {k: trig.get(k) for k in ("top1_prob", "margin", "entropy", "precision_lb",
                                                              "precision_correct", "precision_total")},
                        "terms": trig.get("u")},
            "candidates": cands,
            "system2": None,
            "fast_prediction": r.fast_prediction,
            "fast_prediction_name": kb.classes[r.fast_prediction] if r.fast_prediction is not None else None,
            "timings_ms": {k: round(v * 1000, 3) for k, v in {**r.timings, **extra_s}.items()},
            "error": r.error,
            "base_version": base.version,
            # open set (fgvr.open_set): true when the answer is "not a class of this base" (prediction None)
            "unknown": r.unknown, "unknown_score": r.unknown_score,
        }
        if r.slow_ran or r.path_taken != "fast" and system.slow is not None:
            out["system2"] = {"name": getattr(system.slow, "name", type(system.slow).__name__),
                              "ran": r.slow_ran,
                              "question": self.question(r, system),
                              "answer": own_pick(r),
                              "decision": kb.classes[r.slow_prediction] if r.slow_prediction is not None else None,
                              "rationale": r.rationale, "rules_used": r.rules_used,
                              "tokens_in": r.slow_tokens_in, "tokens_out": r.slow_tokens_out, "error": r.error}
        return out

    def question(self, r: Result, system: DualSystem | None = None) -> str:
        """What System 2 was asked: the VLM's exact question where it has one, else what the re-ranker does."""
        system = system or self.require_ready()
        ids = [c.id for c in r.candidates]
        ask = getattr(system.slow, "question", None)
        if callable(ask):
            from fgvr.slow_path import SlowQuery

            rules = system._rules(ids)
            try:
                return ask(SlowQuery(image=None, candidates=ids, rules=rules))[0]
            except Exception:  # noqa: BLE001 - the question is shown for information only
                pass
        names = ", ".join(system.kb.classes[i] for i in ids)
        return f"Which of these is it: {names}? (compared again, more closely, with each candidate's support images)"

    def support_for(self, class_id: int, emb: torch.Tensor, base: ServedBase | None = None) -> list[dict[str, Any]]:
        """The candidate's support images, nearest to the query first where the base's exemplars line up
        with its support list (they do for every base fgvr builds)."""
        self.require_ready()
        base = base or self.base
        assert base is not None
        idx = base.support_by_class.get(class_id, [])
        n = self.settings.support_per_candidate
        if not idx:
            return []
        if base.aligned:
            ex = base.system.kb.exemplars[idx].float()
            sims = (ex @ emb.float().reshape(-1)).tolist()
            order = sorted(range(len(idx)), key=lambda j: -sims[j])[:n]
            return [{"index": idx[j], "url": f"/v1/support/{idx[j]}", "similarity": sims[j]} for j in order]
        return [{"index": i, "url": f"/v1/support/{i}", "similarity": None} for i in idx[:n]]

    def thumbnail(self, kind: str, index: int, file: str) -> bytes:
        """A small JPEG of `file`, cached by the file's identity (path, size, modification time) as well as
        by what it is shown for: a run rewritten, or a file replaced, is decoded afresh."""
        import os

        try:
            st = os.stat(file)
            ident: tuple[Any, ...] = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            ident = ()
        key = (kind, index, file, *ident)
        if key in self._thumbs:
            self._thumbs.move_to_end(key)
            return self._thumbs[key]
        data = thumbnail_jpeg(file)
        self._thumbs[key] = data
        while len(self._thumbs) > 512:
            self._thumbs.popitem(last=False)
        return data

    def info(self) -> dict[str, Any]:
        system = self.require_ready()
        kb = system.kb
        return {"classes": len(kb.classes), "system2": getattr(system.slow, "name", None),
                "threshold": system.trigger.threshold, "budget": system.trigger.budget, "top_k": system.k,
                "encoder": getattr(getattr(system.encoder, "spec", None), "name", None),
                "knowledge_base": str(getattr(kb, "path", "") or ""), "runs": self.runs is not None,
                "base_version": self.base.version if self.base is not None else None,
                "corrections": True, "admin": bool(self.settings.admin_token)}


def base_version(kb: Any) -> int:
    """The version number of a loaded base (1 for a base never changed since its build)."""
    v = (getattr(kb, "manifest", None) or {}).get("version") or {}
    try:
        return int(v.get("number", 1))
    except (TypeError, ValueError):
        return 1


def rebased(system: DualSystem, kb: Any) -> DualSystem:
    """`system` over another version `kb` of its base: the same loaded encoder, trigger (its threshold was
    fixed at start) and System 2 model; System 2's class list and descriptions and the experience rules
    follow the new version. A shallow copy: the system served now is left as it is."""
    import copy

    new = copy.copy(system)
    new.kb = kb
    new.slow = slow_for(system.slow, kb)
    if getattr(system, "open_set", None) is not None and system.open_set.rate is not None:
        from fgvr.open_set import OpenSet  # --unknown-rate: its threshold from the new version's support set

        new.open_set = OpenSet.from_options(kb, rate=system.open_set.rate)
    if system.slow is not None and getattr(kb, "path", None) is not None:
        from fgvr.rules import ExperienceLibrary

        lib = ExperienceLibrary.load(kb.path, classes=kb.classes)
        new.experience = lib if lib.rules else None
    return new


def slow_for(slow: Any, kb: Any) -> Any:
    """System 2 for a new version of the base, its model reused: a VLM reasoner gets the new class list and
    descriptions (a debiasing wrapper is kept around it)."""
    import copy

    if slow is None:
        return None
    if hasattr(slow, "inner") and hasattr(slow, "mode"):  # fgvr.debias.DebiasedSlowPath
        new = copy.copy(slow)
        new.inner = slow_for(slow.inner, kb)
        return new
    if hasattr(slow, "class_names"):  # fgvr.slow_path.VlmReasoner
        new = copy.copy(slow)
        new.class_names = list(kb.classes)
        new.descriptions = dict(kb.descriptions or {})
        return new
    raise UploadError(409, f"System 2 ({getattr(slow, 'name', type(slow).__name__)}) holds the base's support "
                           "set itself and cannot follow a new version while serving: the new version is saved; "
                           "restart fgvr serve to serve it")


def own_pick(r: Result) -> str | None:
    """System 2's own answer: the candidate it gave the most probability (not the decision, which combines
    it with System 1's); None where it gave none."""
    scored = [c for c in r.candidates if c.slow is not None]
    return max(scored, key=lambda c: c.slow).name if scored else None


def why(r: Result, slow_name: str | None) -> str:
    """One sentence: which way the image went and why (the trigger's score against its threshold)."""
    t = r.trigger or {}
    score, thr = t.get("score"), t.get("threshold")
    cmp = (f"doubt score {score:.3f} {'>=' if t.get('go_slow') else '<'} threshold {float(thr):.3f}"
           if isinstance(score, (int, float)) and isinstance(thr, (int, float)) else "trigger")
    if r.path_taken == "fast":
        return f"fast: {cmp}, System 1 is sure enough"
    if r.path_taken == "slow":
        return f"slow: {cmp}, so System 2 ({slow_name}) looked again"
    if r.path_taken == PATH_UNAVAILABLE:
        return f"{cmp}: System 2 would have looked again, but none is configured (start with --reranker or --vlm)"
    if r.path_taken == "escalated-failed":
        return f"{cmp}: System 2 failed, System 1's answer stands ({r.error})"
    return r.path_taken
