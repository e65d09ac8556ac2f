"""The tests' side of tests/vlm_server.py: start it in its own process, set its behaviour, read its log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVER = Path(__file__).parent / "vlm_server.py"


def start_server(tmp: Path, *args: str, wait_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """tests/vlm_server.py with `args` (`--model DIR` or `--scripted`, ...) in its own process; returns it and
    its /v1 URL once it serves (a bounded wait; a server that dies says why)."""
    ready = tmp / "port"
    proc = subprocess.Popen([sys.executable, str(SERVER), "--ready-file", str(ready), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ready.is_file():
            return proc, f"http://127.0.0.1:{ready.read_text()}/v1"
        if proc.poll() is not None:
            raise RuntimeError(f"test server died: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"test server did not start within {wait_s:.0f} s")


@contextmanager
def serving(tmp: Path, *args: str, wait_s: float = 60.0) -> Iterator[str]:
    """The server's /v1 URL while it runs (killed at the end: a module fixture's whole life)."""
    proc, url = start_server(tmp, *args, wait_s=wait_s)
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def state(url: str, **defaults) -> Iterator[str]:
    """`url` with the server set to `defaults` before and after (one test's changes never leak)."""
    admin(url, **defaults)
    try:
        yield url
    finally:
        admin(url, **defaults)


def admin(url: str, **state) -> dict:
    """Set the server's behaviour (see vlm_server.py's Handler state); returns the state it now has."""
    req = urllib.request.Request(url.rsplit("/v1", 1)[0] + "/admin", data=json.dumps(state).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def stats(url: str) -> dict:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:
        return json.loads(r.read())


def request_log(url: str) -> list[dict]:
    """Every request the server received, oldest first."""
    return stats(url)["requests"]
