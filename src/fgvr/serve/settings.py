"""A server's limits and batching, the refusal it answers with, and whether a host is loopback."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "FGVR_TOKEN"
ADMIN_TOKEN_ENV = "FGVR_ADMIN_TOKEN"


@dataclass
class ServeSettings:
    """Limits and batching of one server. The defaults suit a 2-core CPU machine and phone photos."""

    max_upload_bytes: int = 10 * 2**20  # request body of /v1/classify, and each image of a batch
    max_pixels: int = 40_000_000  # width x height from the header; more is refused before decoding
    max_batch_images: int = 16  # images in one /v1/classify/batch request
    read_timeout_s: float = 30.0  # a request body must arrive within this (slow client: 408)
    head_timeout_s: float = 10.0  # the request line and headers must arrive within this (else: closed)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_held_bytes: int = 96 * 2**20  # request bodies held at once, all clients together; more: 503 at once
    max_connections: int = 4096  # open connections (idle ones included) before uvicorn answers 503
    encode_batch: int = 4  # encoder micro-batch (CPU: bigger did not lower the cost per image, and costs memory)
    encode_wait_ms: float = 5.0  # longest wait for a micro-batch to fill
    slow_batch: int = 4  # System 2 images per call; one call in flight
    max_queue: int = 256  # images waiting for a model; more is answered 503
    decode_threads: int = 2  # images decoded at once (each may take max_pixels x 4 bytes for a moment)
    support_per_candidate: int = 3  # support images shown per candidate (nearest first)
    token: str | None = None
    admin_token: str | None = None  # the operator's: accept, reject and undo corrections (refused without one)
    max_correction_bytes: int = 10 * 2**20  # the image of one correction
    runs: Path | None = None
    bind: str = "127.0.0.1"  # the address served on: a loopback one answers loopback Host names only
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones (--allowed-host)

    @property
    def max_batch_body(self) -> int:
        return 4 * self.max_upload_bytes

    @property
    def held_cap(self) -> int:
        """Bytes of request bodies held at once: at least one largest batch body, so one always fits."""
        return max(self.max_held_bytes, self.max_batch_body)

    @property
    def checks_host(self) -> bool:
        """Whether the Host header is checked: always on a loopback address (a web page's DNS rebinding
        must not reach it), and wherever --allowed-host names the hosts."""
        return is_loopback(self.bind) or bool(self.allowed_hosts)

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request's Host header (`name[:port]`, `[v6][:port]`) names this server: a loopback name
        or one of `allowed_hosts` (case-insensitive, port ignored)."""
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        name = name.rstrip(".")
        if not name:
            return False
        return is_loopback(name) or name in {h.lower().rstrip(".") for h in self.allowed_hosts}


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


def loud_warning(host: str, token: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a token (None when there is none)."""
    if is_loopback(host) or token:
        return None
    bar = "!" * 78
    return (f"{bar}\nWARNING: fgvr serve is listening on {host}, reachable from other machines, WITHOUT a token.\n"
            f"Anyone who can reach it can classify images and read this knowledge base's support images.\n"
            f"Set --token (or {TOKEN_ENV}), or bind to 127.0.0.1.\n{bar}")
