"""The ASGI guard in front of every route: Host, token, body size, read deadline and bytes held, metrics."""

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
    """Before any route runs: the Host header (a loopback server answers loopback names only), the bearer
    token (where one is set), then the whole body read under a size limit, a deadline and a cap on the bytes
    all requests' bodies hold at once; the route gets the body replayed. Every answer is counted in the
    metrics, under labels from a closed set (a refused request teaches the metrics nothing)."""

    OPEN = ("/healthz", "/", "/runs", "/docs", "/openapi.json")  # and /static/*: no data in them

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service
        self.held = 0  # bytes of request bodies held now (reserved as they are read), all requests together

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

        refused: list[str] = []
        try:
            await self._handle(scope, receive, send_counted, refused)
        finally:
            if refused:
                self.service.metrics.refused(refused[0])
            else:
                route = scope.get("route")
                label = getattr(route, "path", None) or ("static" if scope["path"].startswith("/static/") else "other")
                self.service.metrics.request(scope["method"], label, status[0] or 500, time.perf_counter() - t0)

    async def _handle(self, scope: dict, receive: Callable, send: Callable, refused: list[str]) -> None:
        s = self.service.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        close = [(b"connection", b"close")]
        if s.checks_host and not s.host_allowed(headers.get("host", "")):
            refused.append("host")
            host = headers.get("host", "")[:100]
            return await _send_json(send, 421 if host else 400, {
                "detail": f"this server does not answer to the Host {host!r}" if host else "no Host header",
                "hint": "a server on a loopback address answers localhost, 127.0.0.1 and [::1] only; start it "
                        "with --allowed-host NAME to answer NAME too"}, close)
        if s.token and not self._open(scope["path"]):
            got = headers.get("authorization", "")
            if not (got.startswith("Bearer ") and any(hmac.compare_digest(got[7:].strip().encode(), t.encode())
                                                       for t in (s.token, s.admin_token) if t)):
                refused.append("token")
                return await _send_json(send, 401, {"detail": "a bearer token is required: send "
                                                              "'Authorization: Bearer <token>'"},
                                        [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        reserved = [0]
        try:
            await self._with_body(scope, receive, send, headers, reserved)
        finally:
            self.held -= reserved[0]

    def _reserve(self, reserved: list[int], n: int) -> bool:
        """Count `n` more bytes of this request's body as held, if the cap on all bodies held allows it."""
        if self.held + n > self.service.settings.held_cap:
            return False
        self.held += n
        reserved[0] += n
        return True

    async def _with_body(self, scope: dict, receive: Callable, send: Callable, headers: dict[str, str],
                         reserved: list[int]) -> None:
        """Read the body (bounded in size, time and, with every other request's, in bytes held), then run
        the route with it replayed. A body whose declared length does not fit beside the bodies held now is
        answered 503 at once; bytes are counted as they arrive (so a slow client holds only what it has
        sent, not what it promised) and stay counted until the route has answered."""
        s = self.service.settings
        limit = s.max_batch_body if scope["path"].rstrip("/").endswith("/batch") else s.max_upload_bytes
        too_big = {"detail": f"request body over this server's limit of {limit:,} bytes"}
        close = [(b"connection", b"close")]
        busy = {"detail": "the server holds as many request bodies as it allows at once; retry shortly"}
        retry = [*close, (b"retry-after", b"1")]
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _send_json(send, 400, {"detail": "bad Content-Length header"}, close)
        if declared > limit:
            return await _send_json(send, 413, too_big, close)
        if self.held + declared > s.held_cap:
            return await _send_json(send, 503, busy, retry)
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
            if not self._reserve(reserved, len(body)):
                return await _send_json(send, 503, busy, retry)
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
