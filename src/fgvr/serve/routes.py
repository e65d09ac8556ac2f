"""The app: FastAPI routes (pages, classify, runs, metrics) behind the `Guard`."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from fgvr.data import ImageError
from fgvr.pipeline import DualSystem
from fgvr.serve.guard import Guard
from fgvr.serve import models as m
from fgvr.serve.metrics import model_memory_lines
from fgvr.serve.runs import RunBrowser, cell_item
from fgvr.serve.service import Service
from fgvr.serve.settings import ServeSettings, UploadError
from fgvr.serve.upload import read_images

STATIC = Path(__file__).resolve().parent.parent / "static"


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

    from fgvr import __version__

    # /openapi.json is FastAPI's; /docs is a page of our own that renders it (FastAPI's loads Swagger UI
    # from a CDN, which this server's pages never do).
    api = FastAPI(title="fgvr", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Training-free fine-grained recognition: System 1 (retrieval) and, where the "
                              "trigger doubts it, System 2. Records share the CLI's schema (see `schema`).")
    api.state.service = service
    api.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_page_routes(api, service, settings)
    _add_classify_routes(api, service, settings)
    _add_run_routes(api, service)
    from fgvr.serve.corrections import add_correction_routes

    add_correction_routes(api, service, settings)
    _add_metrics_route(api, service)

    app = Guard(api, service)
    app.state = api.state  # type: ignore[attr-defined]  # so tests and the CLI reach the service
    return app


_REFUSALS = {s: {"model": m.Refusal, "description": d} for s, d in (
    (400, "not an image, truncated, bad base64 or form"), (408, "the body did not arrive in time"),
    (413, "over a size, pixel or decoded-memory limit"), (415, "neither multipart nor JSON"),
    (421, "a Host this server does not answer to"), (503, "not ready, a queue full, or too many bodies held"))}


def _upload_body(field: str, many: bool) -> dict[str, Any]:
    """The request body as OpenAPI describes it: multipart file(s), or JSON with base64 image(s)."""
    b64 = {"type": "string", "description": "base64, optionally a data:image/...;base64, URL"}
    binary = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": [field], "properties": {
            field: {"type": "array", "items": binary} if many else binary}}},
        "application/json": {"schema": {"type": "object", "required": [field], "properties": {
            field: {"type": "array", "items": b64} if many else b64,
            **({"names": {"type": "array", "items": {"type": "string"}}} if many else {})}}}}}}


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

    @api.get("/docs", include_in_schema=False)
    async def docs_page() -> FileResponse:
        return FileResponse(STATIC / "docs.html", headers=page_headers)

    @api.get("/healthz", responses={200: {"model": m.Health}, 503: {"model": m.Health}})
    async def healthz() -> JSONResponse:
        body = {"status": "ready" if service.ready else ("failed" if service.error else "loading"),
                "auth": bool(settings.token), "uptime_s": round(time.time() - service.started, 1)}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @api.get("/v1/info", responses={200: {"model": m.Info}, 503: {"model": m.Refusal}})
    async def info() -> dict:
        return service.info()

    @api.get("/v1/classes", responses={200: {"model": m.Classes}, 503: {"model": m.Refusal}})
    async def classes() -> dict:
        kb = service.require_ready().kb
        return {"classes": [{"id": i, "name": n, "description": (kb.descriptions or {}).get(n) or None,
                             "support": [{"index": j, "url": f"/v1/support/{j}"}
                                         for j in service.support_by_class.get(i, [])]}
                            for i, n in enumerate(kb.classes)]}


def _add_classify_routes(api: FastAPI, service: Service, settings: ServeSettings) -> None:
    """/v1/classify, /v1/classify/batch and the support thumbnails."""

    @api.post("/v1/classify", responses={200: {"model": m.ClassifyResult}, **_REFUSALS},
              openapi_extra=_upload_body("image", many=False))
    async def classify(request: Request) -> JSONResponse:
        service.require_ready()
        [(data, name)] = await read_images(request, settings, "image", many=False)
        return JSONResponse(await service.classify(data, name))

    @api.post("/v1/classify/batch", responses={200: {"model": m.BatchResult}, **_REFUSALS},
              openapi_extra=_upload_body("images", many=True))
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


def _add_run_routes(api: FastAPI, service: Service) -> None:
    """The run browser: /v1/runs, one run, a confusion cell, a record's image (404 without --runs)."""

    def _runs() -> RunBrowser:
        if service.runs is None:
            raise UploadError(404, "this server was started without --runs")
        return service.runs

    @api.get("/v1/runs", responses={200: {"model": m.Runs}, 404: {"model": m.Refusal}})
    async def runs() -> dict:
        return _runs().overview()

    @api.get("/v1/runs/{name}")
    async def run(name: str) -> dict:
        s = _runs().summary(name)
        keep = ("n_images", "accuracy", "accuracy_system1_alone", "slow_rate", "paths", "trigger", "per_class",
                "confusion", "n_errors")
        return {"name": name, **{k: s.get(k) for k in keep}}

    @api.get("/v1/runs/{name}/cell")
    async def cell(name: str, true: int, pred: int, limit: int = 60) -> dict:
        recs = _runs().records(name)
        hits = [(i, r) for i, r in enumerate(recs) if r.label_id == true and r.prediction == pred]
        items = [cell_item(name, i, r) for i, r in hits[: max(0, min(limit, 200))]]
        return {"true": true, "pred": pred, "count": len(hits), "items": items}

    @api.get("/v1/runs/{name}/image/{n}")
    async def run_image(name: str, n: int) -> Response:
        recs = _runs().records(name)
        if not 0 <= n < len(recs):
            raise UploadError(404, f"run {name} has no record {n}")
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, service.thumbnail, f"run:{name}", n, recs[n].path)
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
