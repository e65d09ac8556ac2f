"""The HTTP protocol `fgvr serve` runs under uvicorn (fgvr.serve.server.header_deadline_protocol), with
h11 (the default) and httptools (llhttp, opt-in): the head deadline, the head size limit,
keep-alive answers, and a large body that is not mistaken for a large head. A real uvicorn server on a
loopback socket with a one-route app; no models."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")

from fgvr.serve.server import MAX_HEAD_BYTES, header_deadline_protocol  # noqa: E402


async def echo_app(scope: dict, receive, send) -> None:
    """Answers every request with the number of body bytes it read."""
    if scope["type"] != "http":
        return
    n, more = 0, True
    while more:
        msg = await receive()
        n += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = str(n).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["httptools", "h11"])
def protocol(request) -> type:
    """The protocol class `serve` gets: h11's (the default) and httptools' (opt-in; skipped where it is
    not installed)."""
    if request.param == "httptools":
        pytest.importorskip("httptools", reason="httptools is not installed")
        cls = header_deadline_protocol(0.5, http="httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        assert issubclass(cls, HttpToolsProtocol)
    else:
        cls = header_deadline_protocol(0.5)
        from uvicorn.protocols.http.h11_impl import H11Protocol

        assert issubclass(cls, H11Protocol)
    return cls


@contextmanager
def running(protocol: type) -> Iterator[int]:
    """uvicorn on 127.0.0.1 with `protocol`, configured as `fgvr serve` configures it; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(echo_app, http=protocol, log_level="warning", access_log=False, lifespan="off",
                            timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            thread.join(0.05)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def answer(s: socket.socket) -> bytes:
    """One response read off `s`: its head and its body (Content-Length bytes, or up to the close where it
    has none, as h11's 400 has); b'' when `s` was closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
               if k.strip().lower() == b"content-length"]
    while len(body) < (lengths[0] if lengths else float("inf")):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:  # closed with our unread bytes in its buffer
            chunk = b""
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def closed(s: socket.socket) -> bool:
    """Whether the server closed `s` (end of stream, or a reset: it closed with our bytes unread)."""
    try:
        return s.recv(16) == b""
    except ConnectionResetError:
        return True


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_keep_alive_requests_and_a_large_body_are_answered(protocol):
    """Two requests on one connection, the second with a 600 kB body sent in pieces: both answered (the
    body's bytes are not counted as head)."""
    big = b"x" * 600_000
    with running(protocol) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(post(b"/a", b"hello"))
        assert answer(s).endswith(b"\r\n\r\n5")
        req = post(b"/b", big)
        for i in range(0, len(req), 4096):
            s.sendall(req[i:i + 4096])
        got = answer(s)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\n600000")


def test_a_head_over_the_limit_is_refused_and_one_under_it_answered(protocol):
    """Headers trickled in 1 KiB pieces: 12 KiB of them are answered, 20 KiB get a 400 and the connection
    is closed (llhttp alone has no limit: this is the protocol's own count)."""
    def headers(n: int) -> bytes:
        return b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(n))

    with running(protocol) as port:
        for n_kib, ok in ((12, True), (20, False)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                req = post(b"/h", b"", headers(n_kib))
                try:
                    for i in range(0, len(req), 1024):
                        s.sendall(req[i:i + 1024])
                except (BrokenPipeError, ConnectionResetError):
                    assert not ok, "the server closed a connection whose head is under the limit"
                got = answer(s)
                if ok:
                    assert got.startswith(b"HTTP/1.1 200"), got[:80]
                else:
                    assert got.startswith(b"HTTP/1.1 400"), got[:80]
                    assert closed(s)


def test_a_head_not_complete_by_the_deadline_is_closed_while_others_are_answered(protocol):
    with running(protocol) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as half, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        half.sendall(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest of the head
        with socket.create_connection(("127.0.0.1", port), timeout=10) as good:
            good.sendall(post(b"/y", b"abc"))
            assert answer(good).endswith(b"\r\n\r\n3")
        assert closed(half) and closed(silent)  # by the server, not answered


def test_the_protocol_switch_refuses_a_misspelt_value_and_says_when_httptools_is_missing(monkeypatch, caplog):
    """$FGVR_SERVE_HTTP is read once: a typo is one line naming the variable, not a silent h11, and asking
    for httptools where it is not installed says so and serves with h11."""
    import sys

    from uvicorn.protocols.http.h11_impl import H11Protocol

    from fgvr.errors import UsageError

    with pytest.raises(UsageError, match="FGVR_SERVE_HTTP='htttools'"):
        header_deadline_protocol(0.5, http="htttools")
    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)  # import fails
    with caplog.at_level("WARNING", logger="fgvr.serve"):
        cls = header_deadline_protocol(0.5, http="httptools")
    assert issubclass(cls, H11Protocol) and "httptools is not installed" in caplog.text
