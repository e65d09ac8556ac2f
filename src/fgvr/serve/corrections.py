"""The corrections routes: a person marks an answer wrong on the page; the operator accepts, rejects or undoes.

    POST /v1/corrections              the image + the right class (class_id of the base, or label: a new name)
    GET  /v1/corrections?state=...    the queue (operator)
    POST /v1/corrections/{id}/accept  `kb add` of its image under its class: a new base version, served at once
    POST /v1/corrections/{id}/reject
    POST /v1/corrections/{id}/undo    an accepted one: its image removed again (a new version); a rejected one: pending

The operator routes need the operator token (`--admin-token` or FGVR_ADMIN_TOKEN) and are refused (403)
on a server started without one. Accept and undo run on a worker thread, one at a time; the new version is
then loaded beside the one served and switched in (`Service.swap`), reusing the loaded encoder.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from fastapi import FastAPI, Request

from fgvr.errors import FgvrError, LockedError
from fgvr.knowledge_base.corrections import STATES, CorrectionError, CorrectionQueue, rule_report
from fgvr.serve.service import Service
from fgvr.serve.settings import ADMIN_TOKEN_ENV, ServeSettings, UploadError
from fgvr.serve.upload import b64decode, check_header


def _bearer(request: Request) -> str:
    got = request.headers.get("authorization", "")
    return got[7:].strip() if got.startswith("Bearer ") else ""


def _is(token: str, want: str | None) -> bool:
    return bool(want) and bool(token) and hmac.compare_digest(token.encode(), want.encode())  # type: ignore[union-attr]


def _operator(request: Request, settings: ServeSettings) -> None:
    if not settings.admin_token:
        raise UploadError(403, f"this server has no operator token: start it with --admin-token (or "
                               f"{ADMIN_TOKEN_ENV}) to review corrections, or use `fgvr kb corrections KB`")
    if not _is(_bearer(request), settings.admin_token):
        raise UploadError(403, "reviewing corrections needs the operator token: send 'Authorization: Bearer "
                               "<admin token>'")


def _queue(service: Service) -> CorrectionQueue:
    kb = service.require_ready().kb
    if getattr(kb, "path", None) is None:
        raise UploadError(409, "the base served has no folder: corrections cannot be kept")
    return CorrectionQueue(kb.path)


def _refusal(e: FgvrError) -> UploadError:
    if isinstance(e, CorrectionError):
        return UploadError(e.status, str(e))
    if isinstance(e, LockedError):
        return UploadError(409, f"{e}; retry when it is done")
    return UploadError(400, str(e))


async def _fields(request: Request, settings: ServeSettings) -> tuple[bytes, dict[str, Any]]:
    """The image and the fields of a correction, multipart (image, class_id | label, name, note, replaced
    as JSON text) or JSON ({"image": base64, ...})."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=2, max_fields=16)
        except Exception as e:  # noqa: BLE001 - the multipart parser's own errors are the client's
            raise UploadError(400, f"cannot parse the multipart form: {e}") from None
        f = form.get("image")
        if f is None or not hasattr(f, "read"):
            raise UploadError(400, "no image in the correction (multipart field 'image')")
        data = await f.read()
        fields: dict[str, Any] = {k: form.get(k) for k in ("class_id", "label", "name", "note", "replaced")
                                  if isinstance(form.get(k), str)}
        await form.close()
        if fields.get("replaced"):
            try:
                fields["replaced"] = json.loads(fields["replaced"])
            except ValueError:
                raise UploadError(400, "the field 'replaced' is not valid JSON") from None
    elif ctype.startswith("application/json"):
        try:
            fields = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise UploadError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise UploadError(400, 'expected a JSON object {"image": "<base64>", "class_id": N}')
        data = b64decode(fields.get("image"))
    else:
        raise UploadError(415, "send multipart/form-data (field 'image') or application/json")
    if len(data) > settings.max_correction_bytes:
        raise UploadError(413, f"the correction's image is {len(data):,} bytes, over the limit of "
                               f"{settings.max_correction_bytes:,}")
    check_header(data, settings.max_pixels)  # not an image or a bomb: refused before anything is kept
    return data, fields


def _label(fields: dict[str, Any], classes: list[str]) -> str:
    cid, label = fields.get("class_id"), fields.get("label")
    if cid not in (None, ""):
        try:
            i = int(cid)
        except (TypeError, ValueError):
            raise UploadError(400, f"class_id {str(cid)[:20]!r} is not a number") from None
        if not 0 <= i < len(classes):
            raise UploadError(400, f"no class id {i}: the base has ids 0..{len(classes) - 1} (GET /v1/classes); "
                                   "name a new class with 'label'")
        return classes[i]
    if not isinstance(label, str) or not label.strip():
        raise UploadError(400, "name the right class: 'class_id' (GET /v1/classes) or 'label' (a new class name)")
    return label


def add_correction_routes(api: FastAPI, service: Service, settings: ServeSettings) -> None:
    """Mount the corrections routes on `api` (see the module docstring)."""
    review = asyncio.Lock()  # one review at a time in this server (the queue's file lock guards other processes)

    @api.post("/v1/corrections", status_code=201)
    async def submit(request: Request) -> dict:
        system = service.require_ready()
        data, fields = await _fields(request, settings)
        label = _label(fields, list(system.kb.classes))
        token = _bearer(request)
        operator = _is(token, settings.admin_token)
        who = "operator" if operator else fields.get("name") or ("token holder" if _is(token, settings.token) else "")
        base = service.base
        try:
            async with review:
                c = await asyncio.get_running_loop().run_in_executor(None, lambda: _queue(service).submit(
                    data, label, who=str(who), authenticated=operator or _is(token, settings.token),
                    replaced=fields.get("replaced"), note=fields.get("note") or "", classes=system.kb.classes,
                    base_version=base.version if base else 0, max_bytes=settings.max_correction_bytes))
        except FgvrError as e:
            raise _refusal(e) from None
        return _public(c.to_json())

    @api.get("/v1/corrections")
    async def listing(request: Request, state: str | None = None) -> dict:
        _operator(request, settings)
        if state is not None and state not in STATES:
            raise UploadError(400, f"no state {state[:20]!r}: one of {', '.join(STATES)}")
        try:
            items = _queue(service).list(state)
        except FgvrError as e:
            raise _refusal(e) from None
        return {"corrections": [_public(c.to_json()) for c in items],
                "contradicted_rules": rule_report(items), "base_version": service.base.version if service.base else None}

    async def change(request: Request, cid: str, what: str) -> dict:
        _operator(request, settings)
        q = _queue(service)
        device = str(getattr(getattr(service.require_ready().encoder, "spec", None), "device", "cpu") or "cpu")

        def run() -> dict:
            from fgvr.knowledge_base.storage import load_knowledge_base

            if what == "accept":
                c = q.accept(cid, who="operator", device=device)
            elif what == "reject":
                c = q.reject(cid, who="operator")
            else:
                c = q.undo(cid, who="operator")
            out = _public(c.to_json())
            if what == "accept" or c.state == "undone":
                served = service.swap(load_knowledge_base(q.kb_path))
                out["served_version"] = served.version
            return out

        try:
            async with review:
                return await asyncio.get_running_loop().run_in_executor(None, run)
        except FgvrError as e:
            raise _refusal(e) from None

    @api.post("/v1/corrections/{cid}/accept")
    async def accept(request: Request, cid: str) -> dict:
        return await change(request, cid, "accept")

    @api.post("/v1/corrections/{cid}/reject")
    async def reject(request: Request, cid: str) -> dict:
        return await change(request, cid, "reject")

    @api.post("/v1/corrections/{cid}/undo")
    async def undo(request: Request, cid: str) -> dict:
        return await change(request, cid, "undo")


def _public(d: dict) -> dict:
    """A correction as the API shows it: the stored image's path is the server's business, its digest is not."""
    return {k: v for k, v in d.items() if k != "image"}
