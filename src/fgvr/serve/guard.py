"""The ASGI guard in front of every route: token, body size and read deadline, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, Callable

from fgvr.serve.service import Service


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
