"""Running the app under uvicorn: the header deadline protocol and `serve()`."""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from typing import Any, Callable

from fgvr.pipeline import DualSystem
from fgvr.serve.routes import create_app
from fgvr.serve.settings import ServeSettings, loud_warning

log = logging.getLogger("fgvr.serve")


MAX_HEAD_BYTES = 16 * 1024  # request line + headers: a longer head is answered 400 and the connection closed


class _HeadDeadline:
    """Mixed into a uvicorn HTTP protocol: the connection is closed when no complete request head has come
    `head_seconds` after it opened."""

    head_seconds: float

    def connection_made(self, transport: Any) -> None:  # noqa: ANN401
        super().connection_made(transport)  # type: ignore[misc]
        self._head_deadline = self.loop.call_later(self.head_seconds, self._head_overdue)  # type: ignore[attr-defined]

    def _head_overdue(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # type: ignore[attr-defined]
            log.info("closing a connection that sent no complete request head in %.1f s", self.head_seconds)
            self.transport.close()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


HTTP_ENV = "FGVR_SERVE_HTTP"  # "httptools" to try uvicorn's httptools protocol (see header_deadline_protocol)


def header_deadline_protocol(seconds: float, max_head_bytes: int = MAX_HEAD_BYTES, http: str = "h11") -> type:
    """uvicorn's HTTP protocol with a deadline for the request head: a connection that has not sent complete
    headers within `seconds` of opening is closed (uvicorn itself only times out idle keep-alive
    connections, so a client trickling its headers would hold a connection forever).

    `http`: "h11" (uvicorn's pure-Python protocol, the default) or "httptools" (llhttp, a C parser; when
    `httptools` is not installed, h11 with a warning); anything else is a UsageError naming $FGVR_SERVE_HTTP.
    httptools parsed and wrote a request in about half of h11's CPU (0.11 against 0.21 ms per answer,
    benchmarks/results/serve_profile.md) but is opt-in: its effect on resident memory over a storm of bad
    requests was not settled (55-76 MiB after one storm under it, measured while other tests loaded the
    machine), and llhttp answers methods it does not know with 400 where h11 passes them on (405/404). With
    either, a head still incomplete after `max_head_bytes` is answered 400 and closed: h11 counts it itself
    (`h11_max_incomplete_event_size`, set in `serve`); llhttp has no limit, so the httptools protocol here
    counts the head's bytes as they arrive."""
    if http not in ("h11", "httptools"):
        from fgvr.errors import UsageError

        raise UsageError(f"{HTTP_ENV}={http!r}: use h11 (the default) or httptools")
    try:
        if http != "httptools":
            raise ImportError
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        if http == "httptools":
            log.warning("%s=httptools, but httptools is not installed (pip install httptools): serving with h11",
                        HTTP_ENV)

        return type("HeadDeadlineProtocol", (_HeadDeadline, H11Protocol), {"head_seconds": seconds})

    class HeadDeadlineHttpTools(_HeadDeadline, HttpToolsProtocol):
        head_seconds = seconds

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401
            super().connection_made(transport)
            self._head_bytes, self._in_head, self._head_done = 0, True, False

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True

        def on_headers_complete(self) -> None:
            self._in_head, self._head_done, self._head_bytes = False, True, 0
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            # A chunk read while a head is open, in which no head completed, is all head: a client that
            # waits for each answer never sends the next request's bytes in the chunk of a body's last ones.
            self._head_done = False
            super().data_received(data)
            if self._in_head and not self._head_done and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    log.info("closing a connection whose request head is over %d bytes", max_head_bytes)
                    self.send_400_response("Invalid HTTP request received: request head too large.")

    return HeadDeadlineHttpTools


def connection_limit(wanted: int) -> int:
    """Open connections uvicorn allows before it answers 503: `wanted`, within the process's file limit
    (raised to its hard limit first). Idle and half-open connections count, so the limit is set high and
    the head and keep-alive deadlines are what free them; a low limit let a few hundred slow clients make
    the server refuse everyone."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = wanted + 256 if hard == resource.RLIM_INFINITY else min(hard, wanted + 256)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    except (ImportError, ValueError, OSError):
        return wanted
    return max(64, min(wanted, soft - 128))


def serve(opener: Callable[[], AbstractContextManager[DualSystem]], host: str, port: int,
          settings: ServeSettings) -> int:
    """Run the server until interrupted (0). When the models cannot be loaded, the server stops and the load
    error is raised here, so the CLI shows it as one line with its family's exit code (4: not a knowledge
    base, 5: a model or server that is not there) instead of a generic failure."""
    import uvicorn

    import dataclasses

    settings = dataclasses.replace(settings, bind=host)  # the Host check follows the address served on
    warning = loud_warning(host, settings.token)
    if warning:
        log.warning("%s", warning)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load_failed(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(opener, settings, on_load_error=load_failed)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            http=header_deadline_protocol(settings.head_timeout_s,
                                                          http=os.environ.get(HTTP_ENV, "h11").strip() or "h11"),
                            timeout_keep_alive=max(1, round(settings.keep_alive_s)),
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # h11's own count of it
                            limit_concurrency=connection_limit(settings.max_connections), lifespan="on")
    server = uvicorn.Server(config)
    log.info("serve: http://%s:%s/ (loading the models; /healthz says when ready)",
             host if ":" not in host else f"[{host}]", port)
    server.run()
    if failed:
        raise failed[0]
    return 0
