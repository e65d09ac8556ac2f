"""Running the app under uvicorn: the header deadline protocol and `serve()`."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any, Callable

from fgvr.pipeline import DualSystem
from fgvr.serve.routes import create_app
from fgvr.serve.settings import ServeSettings, loud_warning

log = logging.getLogger("fgvr.serve")


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
                            http=header_deadline_protocol(settings.head_timeout_s),
                            timeout_keep_alive=max(1, round(settings.keep_alive_s)),
                            h11_max_incomplete_event_size=16 * 1024,  # request line + headers
                            limit_concurrency=connection_limit(settings.max_connections), lifespan="on")
    server = uvicorn.Server(config)
    log.info("serve: http://%s:%s/ (loading the models; /healthz says when ready)",
             host if ":" not in host else f"[{host}]", port)
    server.run()
    if failed:
        raise failed[0]
    return 0
