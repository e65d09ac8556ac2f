"""`fgvr serve`: the dual system behind an HTTP JSON API and a page that shows why it answered as it did.

    POST /v1/classify        one image (multipart field `image`, or JSON {"image": "<base64>"})
    POST /v1/classify/batch  several (multipart fields `images`, or JSON {"images": [...]}), one result each
    GET  /v1/classes         the base's classes with their support images (by index)
    GET  /v1/support/{i}     support image i of the base's own list, re-encoded as a small JPEG
    GET  /v1/runs...         with --runs: evaluation runs, their confusion matrix, the images of one cell
    GET  /healthz            200 once the models are loaded (503 while loading)
    GET  /metrics            Prometheus text: requests, latency histogram, paths taken, model memory
    GET  /  and /runs        the pages (plain HTML + JS from fgvr/static, nothing fetched from elsewhere)

How a request flows: the body is read under a size limit and a deadline (a slow client gets 408, a large one
413, before anything is decoded); the image header is checked for its pixel count before a pixel is decoded
(a decompression bomb costs a few bytes of header, never its decoded size); decoding runs in worker threads,
bounded. The encoder sees *micro-batches*: requests queue, and one worker thread takes up to `encode_batch` of
them at a time (waiting at most `encode_wait_ms` for more, and only while other requests are still decoding,
so a lone client pays no wait). System 1, the trigger and the decision run on that batch too. Images the
trigger sends slow go to a second queue whose worker runs System 2 on up to `slow_batch` images at a time,
one batch in flight: System 2 calls are bounded however many clients there are. Both queues are bounded;
a full queue answers 503 with Retry-After rather than letting memory grow.

The trigger's threshold is fixed at start: `--threshold`, or a slow-path budget calibrated on the base's
support set (leave-one-out), as `fgvr classify` does; a single request has no run to take a quantile over.

Safe by default: binds to 127.0.0.1; with `--token` (or FGVR_TOKEN) every /v1 route and /metrics need
`Authorization: Bearer <token>`; binding beyond loopback without a token warns loudly. Files are served only
from lists the server holds (the base's support list, a run's own results), addressed by index, and always
decoded and re-encoded: a path never comes from the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from fgvr.data import ImageError, load_image
from fgvr.pipeline import PATH_UNAVAILABLE, DualSystem, Result

log = logging.getLogger("fgvr.serve")
STATIC = Path(__file__).with_name("static")
TOKEN_ENV = "FGVR_TOKEN"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServeSettings:
    """Limits and batching of one server. The defaults suit a 2-core CPU machine and phone photos."""

    max_upload_bytes: int = 10 * 2**20  # request body of /v1/classify, and each image of a batch
    max_pixels: int = 40_000_000  # width x height from the header; more is refused before decoding
    max_batch_images: int = 16  # images in one /v1/classify/batch request
    read_timeout_s: float = 30.0  # a request body must arrive within this (slow client: 408)
    encode_batch: int = 4  # encoder micro-batch (CPU: bigger did not lower the cost per image, and costs memory)
    encode_wait_ms: float = 5.0  # longest wait for a micro-batch to fill
    slow_batch: int = 4  # System 2 images per call; one call in flight
    max_queue: int = 256  # images waiting for a model; more is answered 503
    decode_threads: int = 2  # images decoded at once (each may take max_pixels x 4 bytes for a moment)
    support_per_candidate: int = 3  # support images shown per candidate (nearest first)
    token: str | None = None
    runs: Path | None = None

    @property
    def max_batch_body(self) -> int:
        return 4 * self.max_upload_bytes


class UploadError(Exception):
    """A request the server refuses: HTTP status and a reason a person can act on."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; a name or 0.0.0.0 is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------
# decoding an upload


_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def check_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) from its header alone; refuses what is not an image or would decode to
    more than `max_pixels` pixels. PIL's open reads only the header: nothing is decoded here."""
    if not data:
        raise UploadError(400, "empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.UnidentifiedImageError:
        raise UploadError(400, "not an image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(413, f"refused as a decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - a header PIL cannot parse is a bad image, whatever the exception
        raise UploadError(400, f"cannot read the image header: {e or type(e).__name__}") from None
    if w * h > max_pixels:
        raise UploadError(413, f"image is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                               f"{max_pixels:,} (a decompression bomb, or a photo to shrink first)")
    return w, h


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Header check, then the same decoder `fgvr classify` uses on files (`fgvr.data.load_image`: EXIF
    orientation, reduced-scale JPEG decoding, transparency, 16-bit data, truncation). The bytes go through
    a temporary file (in /dev/shm where there is one) so that files and uploads share one decoder."""
    check_header(data, max_pixels)
    with tempfile.NamedTemporaryFile(prefix="fgvr-upload-", dir=_TMP) as f:
        f.write(data)
        f.flush()
        try:
            return load_image(f.name)
        except ImageError as e:
            raise UploadError(400, e.reason) from None


def b64decode(text: Any) -> bytes:
    """Standard base64, with or without a `data:image/...;base64,` prefix; anything else is a 400."""
    if not isinstance(text, str):
        raise UploadError(400, "expected the image as a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, "the image is not valid base64") from None


def thumbnail_jpeg(path: str | Path, side: int = 256) -> bytes:
    """A small JPEG of an image file (decoded by load_image, so a non-image path yields ImageError)."""
    im = load_image(path, max_side=side)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """Counters and histograms in Prometheus text format, kept by hand (no client library needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, list[float]] = {}  # route -> bucket counts (+Inf last), then sum
        self.images: dict[str, int] = {}
        self.slow_ran = 0
        self.batches = {"encoder": [0, 0], "system2": [0, 0]}  # batches, images

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 2))
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[len(LATENCY_BUCKETS)] += 1
            h[-1] += seconds

    def result(self, r: Result) -> None:
        with self._lock:
            self.images[r.path_taken] = self.images.get(r.path_taken, 0) + 1
            self.slow_ran += bool(r.slow_ran)

    def batch(self, queue: str, n: int) -> None:
        with self._lock:
            self.batches[queue][0] += 1
            self.batches[queue][1] += n

    def render(self, extra: list[str]) -> str:
        out = ["# HELP fgvr_requests_total HTTP requests answered, by method, route and status.",
               "# TYPE fgvr_requests_total counter"]
        with self._lock:
            for (m, route, status), n in sorted(self.requests.items()):
                out.append(f'fgvr_requests_total{{method="{m}",route="{route}",status="{status}"}} {n}')
            out += ["# HELP fgvr_request_duration_seconds Time from request to response, by route.",
                    "# TYPE fgvr_request_duration_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                for b, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], h[:-1]):
                    out.append(f'fgvr_request_duration_seconds_bucket{{route="{route}",le="{b}"}} {n}')
                out.append(f'fgvr_request_duration_seconds_sum{{route="{route}"}} {h[-1]:.6f}')
                out.append(f'fgvr_request_duration_seconds_count{{route="{route}"}} {h[len(LATENCY_BUCKETS)]}')
            out += ["# HELP fgvr_images_total Images classified, by the path they took.",
                    "# TYPE fgvr_images_total counter"]
            out += [f'fgvr_images_total{{path="{p}"}} {n}' for p, n in sorted(self.images.items())]
            out += ["# HELP fgvr_slow_path_total Images System 2 looked at.", "# TYPE fgvr_slow_path_total counter",
                    f"fgvr_slow_path_total {self.slow_ran}",
                    "# HELP fgvr_batches_total Model calls made by each queue's worker.",
                    "# TYPE fgvr_batches_total counter"]
            out += [f'fgvr_batches_total{{queue="{q}"}} {b}' for q, (b, _) in self.batches.items()]
            out += ["# HELP fgvr_batched_images_total Images those calls carried (divide for the mean batch size).",
                    "# TYPE fgvr_batched_images_total counter"]
            out += [f'fgvr_batched_images_total{{queue="{q}"}} {n}' for q, (_, n) in self.batches.items()]
        return "\n".join(out + extra) + "\n"


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def model_memory_lines() -> list[str]:
    """The registry's ledger as gauges: bytes per loaded model and per device."""
    from fgvr.models import registry

    rep = registry.report()
    out = ["# HELP fgvr_model_bytes Memory of each model the registry holds (measured, else estimated).",
           "# TYPE fgvr_model_bytes gauge"]
    for m in rep.models:
        b = m.measured_bytes if m.measured_bytes is not None else (m.estimated_bytes or 0)
        out.append(f'fgvr_model_bytes{{model="{_label(m.name)}",family="{m.family}",device="{m.device}",'
                   f'state="{m.state}"}} {b}')
    out += ["# HELP fgvr_device_model_bytes Bytes on the registry's ledger per device.",
            "# TYPE fgvr_device_model_bytes gauge"]
    out += [f'fgvr_device_model_bytes{{device="{d.device}"}} {d.current}' for d in rep.devices]
    rss = resident_bytes()
    if rss is not None:
        out += ["# HELP fgvr_process_resident_bytes Resident memory of the server process.",
                "# TYPE fgvr_process_resident_bytes gauge", f"fgvr_process_resident_bytes {rss}"]
    return out


# ----------------------------------------------------------------------------------------------------------
# micro-batching


@dataclass
class _Item:
    payload: Any
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """A bounded queue in front of a batch function run on one worker thread.

    `fn(payloads) -> outputs` (same length, same order) sees up to `max_batch` items. After the first item
    the worker takes whatever else is queued and, while `pending()` says more items are on their way (e.g.
    still being decoded), waits up to `max_wait_s` for them; a lone request is never held back. One batch
    runs at a time, so the model behind `fn` is never called concurrently from here.
    """

    def __init__(self, name: str, fn: Callable[[list[Any]], list[Any]], max_batch: int, max_wait_s: float,
                 max_queue: int, pending: Callable[[], int] = lambda: 0,
                 on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.name, self.fn, self.max_batch, self.max_wait_s = name, fn, max(1, max_batch), max(0.0, max_wait_s)
        self.max_queue, self.pending, self.on_batch = max_queue, pending, on_batch
        self.queue: asyncio.Queue[_Item] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fgvr-{name}")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"fgvr-{self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, payload: Any) -> tuple[Any, float]:
        """The item's output and the seconds it waited in the queue; 503 when the queue is full."""
        assert self.queue is not None, "MicroBatcher.start() was not called"
        if self.queue.qsize() >= self.max_queue:
            raise UploadError(503, f"the {self.name} queue is full ({self.max_queue} images waiting); retry shortly")
        item = _Item(payload, asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or self.pending() <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [it for it in batch if not it.future.done()]  # a client that went away
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self.executor, self.fn, [it.payload for it in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"{self.name} returned {len(outputs)} outputs for {len(batch)} inputs")
            except Exception as e:  # noqa: BLE001 - the worker must outlive a failing batch
                log.exception("%s batch of %d failed", self.name, len(batch))
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(UploadError(500, f"{self.name} failed: {type(e).__name__}: {e}"))
                continue
            self.on_batch(len(batch))
            for it, out in zip(batch, outputs):
                if not it.future.done():
                    it.future.set_result((out, started - it.queued))


# ----------------------------------------------------------------------------------------------------------
# the service: a loaded system, its queues, and how a Result becomes the API's JSON


@dataclass
class _Query:
    image: Image.Image
    name: str
    decode_s: float


class Service:
    """Everything the routes share. `opener()` returns a context manager yielding a `DualSystem` (e.g.
    `open_system(kb, ...)`); it is entered on a background thread at start, so /healthz can say 'loading'."""

    def __init__(self, opener: Callable[[], AbstractContextManager[DualSystem]], settings: ServeSettings,
                 on_load_error: Callable[[BaseException], None] | None = None) -> None:
        self.opener, self.settings, self.on_load_error = opener, settings, on_load_error
        self.metrics = Metrics()
        self.system: DualSystem | None = None
        self.fast: DualSystem | None = None
        self.error: str | None = None
        self.started = time.time()
        self._stack = ExitStack()
        self._decoding = 0
        self._decode_sem: asyncio.Semaphore | None = None
        self.encoder_q: MicroBatcher | None = None
        self.slow_q: MicroBatcher | None = None
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.support: list[dict[str, Any]] = []
        self.support_by_class: dict[int, list[int]] = {}
        self._aligned = False
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
            self.support = [{"index": i, "class_id": f.class_id, "file": str(f.path)}
                            for i, f in enumerate(kb.support_files())]
            for rec in self.support:
                self.support_by_class.setdefault(rec["class_id"], []).append(rec["index"])
            labels = getattr(kb, "exemplar_labels", None)
            self._aligned = (labels is not None and len(labels) == len(self.support)
                             and all(int(labels[i]) == r["class_id"] for i, r in enumerate(self.support)))
            # The same trigger (threshold now fixed) without System 2: what the encoder worker runs.
            self.fast = DualSystem(kb, system.encoder, None, system.trigger, k=system.k, weight=system.weight,
                                   w=system.w, tau=system.tau, encode_batch=self.settings.encode_batch)
            self.system = system
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
        return self.system is not None

    def require_ready(self) -> DualSystem:
        if self.system is None:
            raise UploadError(503, f"not ready: {self.error or 'the models are still loading'}")
        return self.system

    # --- the two batch functions (run on the queues' worker threads) ---------------------------------
    def _fast_batch(self, queries: list[_Query]) -> list[tuple[Result, torch.Tensor]]:
        assert self.fast is not None
        t = time.perf_counter()
        with torch.inference_mode():
            emb = self.fast.encoder.encode_images([q.image for q in queries], batch_size=self.settings.encode_batch)
        enc_s = (time.perf_counter() - t) / len(queries)
        results = []
        for q, e in zip(queries, emb):  # System 1 per image: a matmul, and per-image decode time stays exact
            results += self.fast.classify_embeddings(e[None], [q.name], [q.image], {"decode": q.decode_s, "encode": enc_s})
        return list(zip(results, emb))

    def _slow_batch(self, items: list[tuple[_Query, torch.Tensor, Result]]) -> list[Result]:
        assert self.system is not None
        out = []
        for (q, e, fast) in items:
            keep = {k: fast.timings[k] for k in ("decode", "encode") if k in fast.timings}
            out.append((q, e, keep))
        emb = torch.stack([e for _, e, _ in out])
        res = self.system.classify_embeddings(emb, [q.name for q, _, _ in out], [q.image for q, _, _ in out])
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
        system = self.require_ready()
        assert self.encoder_q is not None and self.slow_q is not None
        t0 = time.perf_counter()
        image, decode_s = await self.decode(data)
        q = _Query(image, name, decode_s)
        (result, emb), wait_fast = await self.encoder_q.submit(q)
        wait_slow = 0.0
        if result.path_taken == PATH_UNAVAILABLE and system.slow is not None:
            result, wait_slow = await self.slow_q.submit((q, emb, result))
        self.metrics.result(result)
        return self.respond(result, emb, {"queue": wait_fast + wait_slow, "request": time.perf_counter() - t0})

    # --- the JSON ------------------------------------------------------------------------------------
    def respond(self, r: Result, emb: torch.Tensor, extra_s: dict[str, float]) -> dict[str, Any]:
        system = self.require_ready()
        kb = system.kb
        trig = r.trigger or {}
        cands = []
        for c in r.candidates:
            score = c.final if c.final is not None else c.fast
            cands.append({"label": c.name, "score": score, "id": c.id, "fast": c.fast, "slow": c.slow,
                          "support": self.support_for(c.id, emb)})
        cands.sort(key=lambda c: -c["score"])
        threshold, score = trig.get("threshold"), trig.get("score")
        out: dict[str, Any] = {
            "prediction": r.prediction_name, "prediction_id": r.prediction, "confidence": r.confidence,
            "path_taken": r.path_taken,
            "why": why(r, getattr(system.slow, "name", None)),
            "trigger": {"score": score, "threshold": threshold, "go_slow": trig.get("go_slow"),
                        "inputs": {k: trig.get(k) for k in ("top1_prob", "margin", "entropy", "precision_lb",
                                                              "precision_correct", "precision_total")},
                        "terms": trig.get("u")},
            "candidates": cands,
            "system2": None,
            "fast_prediction": kb.classes[r.fast_prediction] if r.fast_prediction is not None else None,
            "timings_ms": {k: round(v * 1000, 3) for k, v in {**r.timings, **extra_s}.items()},
            "error": r.error,
        }
        if r.slow_ran or r.path_taken != "fast" and system.slow is not None:
            out["system2"] = {"name": getattr(system.slow, "name", type(system.slow).__name__),
                              "ran": r.slow_ran,
                              "question": self.question(r),
                              "answer": kb.classes[r.slow_prediction] if r.slow_prediction is not None else None,
                              "rationale": r.rationale, "rules_used": r.rules_used,
                              "tokens_in": r.slow_tokens_in, "tokens_out": r.slow_tokens_out, "error": r.error}
        return out

    def question(self, r: Result) -> str:
        """What System 2 was asked: the VLM's exact question where it has one, else what the re-ranker does."""
        system = self.require_ready()
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

    def support_for(self, class_id: int, emb: torch.Tensor) -> list[dict[str, Any]]:
        """The candidate's support images, nearest to the query first where the base's exemplars line up
        with its support list (they do for every base fgvr builds)."""
        idx = self.support_by_class.get(class_id, [])
        n = self.settings.support_per_candidate
        if not idx:
            return []
        if self._aligned:
            ex = self.require_ready().kb.exemplars[idx].float()
            sims = (ex @ emb.float().reshape(-1)).tolist()
            order = sorted(range(len(idx)), key=lambda j: -sims[j])[:n]
            return [{"index": idx[j], "url": f"/v1/support/{idx[j]}", "similarity": sims[j]} for j in order]
        return [{"index": i, "url": f"/v1/support/{i}", "similarity": None} for i in idx[:n]]

    def thumbnail(self, kind: str, index: int, file: str) -> bytes:
        key = (kind, index)
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
                "knowledge_base": str(getattr(kb, "path", "") or ""), "runs": self.runs is not None}


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


# ----------------------------------------------------------------------------------------------------------
# evaluation runs (--runs)


class RunBrowser:
    """Evaluation runs under a folder (or the folder itself if it is one run), addressed by folder name.
    Files are read from the names listed here, never from a name the request makes up."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    def list(self) -> dict[str, Path]:
        if (self.folder / "summary.json").is_file():
            return {self.folder.resolve().name: self.folder}
        if not self.folder.is_dir():
            return {}
        return {p.name: p for p in sorted(self.folder.iterdir()) if (p / "summary.json").is_file()}

    def get(self, name: str) -> Path:
        runs = self.list()
        if name not in runs:
            raise UploadError(404, f"no evaluation run named {name!r}")
        return runs[name]

    def summary(self, name: str) -> dict[str, Any]:
        return json.loads((self.get(name) / "summary.json").read_text())

    def records(self, name: str) -> list[dict[str, Any]]:
        from fgvr.evaluate import RESULTS, read_results

        f = self.get(name) / RESULTS
        mtime = f.stat().st_mtime if f.is_file() else 0.0
        hit = self._cache.get(name)
        if hit is None or hit[0] != mtime:
            hit = (mtime, read_results(f, repair=False))  # never modify a run from here
            self._cache[name] = hit
        return hit[1]


# ----------------------------------------------------------------------------------------------------------
# the ASGI guard: token, body size and read deadline, metrics


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


async def _send_json(send: Callable, status: int, obj: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = _json_bytes(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Before any route runs: the bearer token (where one is set), then the whole body read under a size
    limit and a deadline; the route gets the body replayed. Every answer is counted in the metrics."""

    OPEN = ("/healthz", "/", "/runs")  # and /static/*: the pages and their scripts hold no data

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    def _open(self, path: str) -> bool:
        return path in self.OPEN or path.startswith("/static/")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_counted(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self._handle(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("static" if scope["path"].startswith("/static/") else "other")
            self.service.metrics.request(scope["method"], label, status[0] or 500, time.perf_counter() - t0)

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        s = self.service.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if s.token and not self._open(scope["path"]):
            got = headers.get("authorization", "")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), s.token.encode())):
                return await _send_json(send, 401, {"detail": "a bearer token is required: send "
                                                              "'Authorization: Bearer <token>'"},
                                        [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = s.max_batch_body if scope["path"].rstrip("/").endswith("/batch") else s.max_upload_bytes
        too_big = {"detail": f"request body over this server's limit of {limit:,} bytes"}
        close = [(b"connection", b"close")]
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _send_json(send, 400, {"detail": "bad Content-Length header"}, close)
        if declared > limit:
            return await _send_json(send, 413, too_big, close)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.read_timeout_s
        chunks, n = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _send_json(send, 408, {"detail": f"the request body did not arrive within "
                                                              f"{s.read_timeout_s:g} s"}, close)
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            n += len(body)
            if n > limit:
                return await _send_json(send, 413, too_big, close)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        whole = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------------------
# the app


def create_app(opener: Callable[[], AbstractContextManager[DualSystem]], settings: ServeSettings | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> Any:
    """The ASGI app: FastAPI routes behind the `Guard`. `app.state.service` is the shared `Service`."""
    from contextlib import asynccontextmanager

    settings = settings or ServeSettings()
    service = Service(opener, settings, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    api = FastAPI(title="fgvr", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.service = service
    api.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_page_routes(api, service, settings)
    _add_classify_routes(api, service, settings)
    _add_run_routes(api, service)
    _add_metrics_route(api, service)

    app = Guard(api, service)
    app.state = api.state  # type: ignore[attr-defined]  # so tests and the CLI reach the service
    return app


def _add_page_routes(api: FastAPI, service: Service, settings: ServeSettings) -> None:
    """The refusal handler, the two HTML pages, /healthz, /v1/info and /v1/classes."""

    @api.exception_handler(UploadError)
    async def refused(request: Request, e: UploadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"detail": e.reason}, status_code=e.status, headers=headers)

    page_headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                               "style-src 'self'; script-src 'self'; connect-src 'self'",
                    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @api.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=page_headers)

    @api.get("/runs", include_in_schema=False)
    async def runs_page() -> FileResponse:
        return FileResponse(STATIC / "runs.html", headers=page_headers)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        body = {"status": "ready" if service.ready else ("failed" if service.error else "loading"),
                "auth": bool(settings.token), "uptime_s": round(time.time() - service.started, 1)}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @api.get("/v1/info")
    async def info() -> dict:
        return service.info()

    @api.get("/v1/classes")
    async def classes() -> dict:
        kb = service.require_ready().kb
        return {"classes": [{"id": i, "name": n, "description": (kb.descriptions or {}).get(n) or None,
                             "support": [{"index": j, "url": f"/v1/support/{j}"}
                                         for j in service.support_by_class.get(i, [])]}
                            for i, n in enumerate(kb.classes)]}


async def read_images(request: Request, settings: ServeSettings, field: str,
                      many: bool) -> list[tuple[bytes, str]]:
    """The uploaded images of a request (multipart or base64 JSON) as (bytes, name), checked against the
    limits in `settings`; `UploadError` for anything the client got wrong."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            # the parser's own file cap sits well above ours, so too many images gets our 413, not its 400
            form = await request.form(max_files=4 * settings.max_batch_images + 16, max_fields=64)
        except Exception as e:  # noqa: BLE001 - the multipart parser's own errors are the client's
            raise UploadError(400, f"cannot parse the multipart form: {e}") from None
        files = [f for key in dict.fromkeys((field, "image", "images")) for f in form.getlist(key)
                 if hasattr(f, "read")]
        out = [(await f.read(), f.filename or f"upload-{i}") for i, f in enumerate(files)]
        await form.close()
    elif ctype.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise UploadError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise UploadError(400, f'expected a JSON object {{"{field}": ...}}')
        raw = body.get(field) if many else body.get("image")
        if raw is None:
            raise UploadError(400, f'the JSON object has no "{field if many else "image"}" field')
        items = raw if many else [raw]
        if many and not isinstance(raw, list):
            raise UploadError(400, f'"{field}" must be a list of base64 strings')
        names = body.get("names") if isinstance(body.get("names"), list) else []
        out = [(b64decode(x), str(names[i]) if i < len(names) else f"upload-{i}") for i, x in enumerate(items)]
    else:
        raise UploadError(415, "send multipart/form-data (field 'image') or application/json "
                               '({"image": "<base64>"})')
    if not out:
        raise UploadError(400, f"no image in the request (multipart field '{field}')")
    if many and len(out) > settings.max_batch_images:
        raise UploadError(413, f"{len(out)} images in one request, over this server's limit of "
                               f"{settings.max_batch_images}")
    if not many and len(out) > 1:
        raise UploadError(400, "one image per /v1/classify request; use /v1/classify/batch for several")
    for data, name in out:
        if len(data) > settings.max_upload_bytes:
            raise UploadError(413, f"image {name} is {len(data):,} bytes, over the limit of "
                                   f"{settings.max_upload_bytes:,}")
    return out


def _add_classify_routes(api: FastAPI, service: Service, settings: ServeSettings) -> None:
    """/v1/classify, /v1/classify/batch and the support thumbnails."""

    @api.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        service.require_ready()
        [(data, name)] = await read_images(request, settings, "image", many=False)
        return JSONResponse(await service.classify(data, name))

    @api.post("/v1/classify/batch")
    async def classify_batch(request: Request) -> JSONResponse:
        service.require_ready()
        images = await read_images(request, settings, "images", many=True)

        async def one(data: bytes, name: str) -> dict[str, Any]:
            try:
                return {"name": name, **(await service.classify(data, name))}
            except UploadError as e:  # one bad image of a batch is its own error, the others are answered
                return {"name": name, "error": e.reason, "status": e.status}

        return JSONResponse({"results": list(await asyncio.gather(*(one(d, n) for d, n in images)))})

    @api.get("/v1/support/{index}")
    async def support(index: int) -> Response:
        service.require_ready()
        if not 0 <= index < len(service.support):
            raise UploadError(404, f"no support image {index} (the base has {len(service.support)})")
        rec = service.support[index]
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, service.thumbnail, "support", index, rec["file"])
        except ImageError as e:
            raise UploadError(404, f"support image {index} cannot be read now: {e.reason}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _cell_item(name: str, i: int, r: dict[str, Any]) -> dict[str, Any]:
    """One record of a run as the confusion-cell view shows it (candidates best first)."""
    cands = sorted(r.get("candidates") or [], key=lambda c: -(c.get("final") if c.get("final") is not None
                                                                else c.get("fast") or 0))
    t = r.get("trigger") or {}
    return {"n": i, "file": Path(r["path"]).name, "label": r.get("label"),
            "prediction": r.get("prediction_name"), "path_taken": r.get("path_taken"),
            "confidence": r.get("confidence"), "image": f"/v1/runs/{name}/image/{i}",
            "trigger": {"score": t.get("score"), "threshold": t.get("threshold")},
            "candidates": [{"label": c.get("name"), "score": c.get("final") if c.get("final") is not None
                            else c.get("fast"), "fast": c.get("fast"), "slow": c.get("slow")}
                           for c in cands]}


def _add_run_routes(api: FastAPI, service: Service) -> None:
    """The run browser: /v1/runs, one run, a confusion cell, a record's image (404 without --runs)."""

    def _runs() -> RunBrowser:
        if service.runs is None:
            raise UploadError(404, "this server was started without --runs")
        return service.runs

    @api.get("/v1/runs")
    async def runs() -> dict:
        out = []
        for name in _runs().list():
            s = _runs().summary(name)
            out.append({"name": name, "n_images": s.get("n_images"), "accuracy": s.get("accuracy"),
                        "slow_rate": s.get("slow_rate")})
        return {"runs": out}

    @api.get("/v1/runs/{name}")
    async def run(name: str) -> dict:
        s = _runs().summary(name)
        keep = ("n_images", "accuracy", "accuracy_system1_alone", "slow_rate", "paths", "trigger", "per_class",
                "confusion", "n_errors")
        return {"name": name, **{k: s.get(k) for k in keep}}

    @api.get("/v1/runs/{name}/cell")
    async def cell(name: str, true: int, pred: int, limit: int = 60) -> dict:
        recs = _runs().records(name)
        hits = [(i, r) for i, r in enumerate(recs) if r.get("label_id") == true and r.get("prediction") == pred]
        items = [_cell_item(name, i, r) for i, r in hits[: max(0, min(limit, 200))]]
        return {"true": true, "pred": pred, "count": len(hits), "items": items}

    @api.get("/v1/runs/{name}/image/{n}")
    async def run_image(name: str, n: int) -> Response:
        recs = _runs().records(name)
        if not 0 <= n < len(recs):
            raise UploadError(404, f"run {name} has no record {n}")
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, service.thumbnail, f"run:{name}", n, recs[n]["path"])
        except ImageError as e:
            raise UploadError(404, f"image of record {n} cannot be read now: {e.reason}") from None
        return Response(data, media_type="image/jpeg")


def _add_metrics_route(api: FastAPI, service: Service) -> None:
    """/metrics in the Prometheus text format."""

    @api.get("/metrics")
    async def metrics() -> PlainTextResponse:
        extra = ["# HELP fgvr_ready 1 once the models are loaded.", "# TYPE fgvr_ready gauge",
                 f"fgvr_ready {int(service.ready)}",
                 "# HELP fgvr_queue_depth Images waiting in each queue.", "# TYPE fgvr_queue_depth gauge"]
        extra += [f'fgvr_queue_depth{{queue="{q.name}"}} {q.depth()}' for q in (service.encoder_q, service.slow_q) if q]
        extra += model_memory_lines()
        return PlainTextResponse(service.metrics.render(extra), media_type="text/plain; version=0.0.4")


def loud_warning(host: str, token: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a token (None when there is none)."""
    if is_loopback(host) or token:
        return None
    bar = "!" * 78
    return (f"{bar}\nWARNING: fgvr serve is listening on {host}, reachable from other machines, WITHOUT a token.\n"
            f"Anyone who can reach it can classify images and read this knowledge base's support images.\n"
            f"Set --token (or {TOKEN_ENV}), or bind to 127.0.0.1.\n{bar}")


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for the request head: a connection that has not sent complete
    headers within `seconds` of opening is closed (uvicorn itself only times out idle keep-alive
    connections, so a client trickling its headers would hold a connection forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # noqa: ANN401
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_overdue)

        def _head_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in %.1f s", seconds)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeadDeadlineProtocol


def serve(opener: Callable[[], AbstractContextManager[DualSystem]], host: str, port: int,
          settings: ServeSettings) -> int:
    """Run the server until interrupted (0). When the models cannot be loaded, the server stops and the load
    error is raised here, so the CLI shows it as one line with its family's exit code (4: not a knowledge
    base, 5: a model or server that is not there) instead of a generic failure."""
    import sys

    import uvicorn

    warning = loud_warning(host, settings.token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load_failed(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(opener, settings, on_load_error=load_failed)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            http=header_deadline_protocol(settings.read_timeout_s), timeout_keep_alive=5,
                            limit_concurrency=512, lifespan="on")
    server = uvicorn.Server(config)
    print(f"fgvr serve: http://{host if ':' not in host else f'[{host}]'}:{port}/ (loading the models; "
          f"/healthz says when ready)", file=sys.stderr, flush=True)
    server.run()
    if failed:
        raise failed[0]
    return 0
