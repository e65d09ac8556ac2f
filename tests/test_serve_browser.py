"""`fgvr serve` as a real process on a free loopback port: the page driven in headless Chromium (Debian's
chromium through Playwright), a slow client timed out while others are answered, and a bounded storm of
bad requests after which good requests are answered as before and memory is where it was.

Screenshots go to $FGVR_TEST_OUTPUT (default tests/output/). Chromium comes from Debian (scripts/setup.sh
installs it); without it these tests skip here and fail in CI, where it must be present."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")

from fakes import SHAPES, bomb_png, png_bytes, shape_image  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
                 "--metrics-recording-only", "--disable-extensions"]
OUTPUT = Path(os.environ.get("FGVR_TEST_OUTPUT") or Path(__file__).parent / "output")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextmanager
def running_server(kb: Path, tmp: Path, *args: str, env: dict[str, str] | None = None):
    """`fgvr serve KB ARGS` on 127.0.0.1:PORT, ready: yields (url, process); stopped (SIGTERM, then SIGKILL)."""
    port = free_port()
    log_file = tmp / f"server-{port}.log"
    log = log_file.open("wb")
    cmd = [sys.executable, "-c", "from fgvr.cli import main; main()", "serve", str(kb), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            assert proc.poll() is None, log_file.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("fgvr serve did not become ready in 180 s:\n" + log_file.read_text())
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(shapes_kb, tmp_path_factory):
    """`fgvr serve KB --runs RUNS` on 127.0.0.1:PORT, ready; stopped (SIGTERM, then SIGKILL) afterwards."""
    from fgvr.data import read_dataset
    from fgvr.evaluate import run_evaluation
    from fgvr.pipeline import open_system

    tmp = tmp_path_factory.mktemp("served")
    with open_system(shapes_kb, threshold=0.5) as system:
        run_evaluation(system, read_dataset(shapes_kb.parent / "test"), tmp / "runs" / "shapes-eval",
                       {"kb": "k", "data": "t"}, progress=False, report=False)
    with running_server(shapes_kb, tmp, "--threshold", "0.5", "--runs", str(tmp / "runs"), "--read-timeout", "2",
                        "--head-timeout", "2", "--max-upload", "1MiB", "--max-pixels", "4000000",
                        "--max-batch-images", "4") as (url, proc):
        yield url, proc, tmp


def classify(url: str, data: bytes, name: str = "x.png") -> httpx.Response:
    return httpx.post(url + "/v1/classify", files={"image": (name, data, "image/png")}, timeout=60)


def test_page_in_chromium_shows_the_apis_answer(server, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: scripts/setup.sh must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (pip install -e '.[serve]')")

    url, proc, _ = server
    photo = tmp_path / "red disc photo.png"
    shape_image("red disc", 77, size=192).save(photo)
    api = classify(url, photo.read_bytes()).json()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 860})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            assert page.inner_text("#top1") == api["prediction_name"] == "red disc"
            assert page.inner_text("#path") == api["path_taken"]
            assert page.locator("#candidates tbody tr").count() == len(api["candidates"])
            assert page.inner_text("#threshold") == f"{api['trigger']['threshold']:.3f}"
            assert "threshold" in page.inner_text("#why")
            # every support image of the top candidates arrived and decoded
            page.wait_for_function("() => { const im = [...document.querySelectorAll('#support img')];"
                                   " return im.length >= 3 && im.every(i => i.complete && i.naturalWidth > 0); }",
                                   timeout=30_000)
            assert page.locator("#support .support-row").count() == min(3, len(api["candidates"]))
            page.screenshot(path=str(OUTPUT / "serve_page.png"), full_page=True)

            page.goto(url + "/runs")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            assert page.locator("#matrix td.cell").count() == len(SHAPES) ** 2
            page.locator("#matrix td.cell.some").first.click()
            page.wait_for_selector("#cell:not([hidden])", timeout=30_000)
            assert page.locator("#cell-items .item").count() >= 1
            page.wait_for_function("() => [...document.querySelectorAll('#cell-items img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            page.screenshot(path=str(OUTPUT / "serve_runs.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems  # no script error, no CSP violation, no failed fetch
    assert proc.poll() is None


def _chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: scripts/setup.sh must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (pip install -e '.[serve]')")
    return sync_playwright


def test_page_from_the_keyboard_alone_and_at_390_px(server, tmp_path):
    """No mouse: Tab reaches the drop zone, Enter opens the file picker, the answer shows; the file input
    itself is reachable too. At 390 x 844 (a phone) nothing is cut off: no sideways scrolling, every
    section within the viewport's width."""
    sync_playwright = _chromium()
    url, proc, _ = server
    photo = tmp_path / "disc.png"
    shape_image("red disc", 78, size=160).save(photo)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            seen = []
            for _ in range(12):
                page.keyboard.press("Tab")
                seen.append(page.evaluate("document.activeElement.id"))
                if seen[-1] == "drop":
                    break
            assert seen[-1] == "drop", seen
            page.evaluate("window.picked = 0; document.getElementById('file')"
                          ".addEventListener('click', () => { window.picked += 1; })")
            page.keyboard.press("Enter")  # opens the file picker: a click on the file input
            page.wait_for_function("() => window.picked === 1", timeout=30_000)
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            assert page.inner_text("#top1") == "red disc"
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "file"  # the input itself is reachable
            page.keyboard.press(" ")
            page.wait_for_function("() => window.picked === 2", timeout=30_000)  # the input answers Space itself
            page.wait_for_function("() => [...document.querySelectorAll('#support img')].every(i => i.complete)",
                                   timeout=30_000)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide at a 390 px viewport"
            for sel in ("#drop", "#result", "#evidence", "header"):
                box = page.locator(sel).bounding_box()
                assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (sel, box)
            OUTPUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUTPUT / "serve_page_390px.png"), full_page=True)
            page.goto(url + "/docs")  # the API's own page, rendered from /openapi.json
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            assert "POST /v1/classify" in page.inner_text("#routes") and "ClassifyResult" in page.inner_text("#schemas")
        finally:
            browser.close()
    assert not problems, problems


def test_runs_page_says_why_a_run_of_a_newer_schema_cannot_be_browsed(server):
    """A run whose results.jsonl a newer fgvr wrote: its summary shows, a click on a cell shows the server's
    one-line refusal (409, naming the run and its file) instead of nothing and an unhandled error."""
    import json
    import shutil

    sync_playwright = _chromium()
    url, _, tmp = server
    run = tmp / "runs" / "zz-newer"  # listed after the fixture's run, so the other tests' first run stays theirs
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"n_images": 1, "accuracy": 1.0, "slow_rate": 0.0,
                                                  "confusion": {"classes": ["red disc"], "matrix": [[1]]}}))
    (run / "results.jsonl").write_text(json.dumps({"schema": "fgvr.result/3", "path": "x.png", "label_id": 0,
                                                   "prediction": 0}) + "\n")
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1180, "height": 860})
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.goto(url + "/runs")
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                page.select_option("#run", "zz-newer")
                page.wait_for_function("() => document.getElementById('run-summary').textContent"
                                       ".startsWith('1 images')", timeout=30_000)
                page.locator("#matrix td.cell.some").first.click()
                page.wait_for_selector("#cell:not([hidden])", timeout=30_000)
                title = page.inner_text("#cell-title")
                assert "run zz-newer" in title and "results.jsonl" in title and "fgvr.result/3" in title, title
                assert page.locator("#cell-items .item").count() == 0
            finally:
                browser.close()
    finally:
        shutil.rmtree(run)
    assert not problems, problems


def test_slow_clients_time_out_while_others_are_answered(server):
    url, proc, _ = server
    port = int(url.rsplit(":", 1)[1])
    good = png_bytes(shape_image("red disc", 5))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as body_trickle, \
            socket.create_connection(("127.0.0.1", port), timeout=15) as head_trickle:
        body_trickle.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5000\r\n\r\n{\"image\": \"")
        head_trickle.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t = time.time()
        assert classify(url, good).json()["prediction_name"] == "red disc"  # not blocked by the stalled clients
        answer = b""
        while chunk := body_trickle.recv(4096):  # the head and the body may come in separate reads
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer
        assert head_trickle.recv(4096) == b""  # closed: no complete request head within the deadline
        assert time.time() - t < 12
    assert proc.poll() is None


def test_hundreds_of_half_open_connections_do_not_shut_others_out(server):
    """700 connections that send nothing (more than the 512 the server once allowed in all): a normal
    client is still answered, and the idle ones are closed by the head deadline."""
    url, proc, _ = server
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(700)]
    try:
        for s in idle[::2]:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a head
        r = classify(url, png_bytes(shape_image("red disc", 5)))
        assert r.status_code == 200 and r.json()["prediction_name"] == "red disc"
        assert idle[0].recv(16) == b"" and idle[-1].recv(16) == b""  # closed by the server, not answered
    finally:
        for s in idle:
            s.close()
    assert proc.poll() is None


def test_bad_input_storm_then_good_requests_as_before_and_memory_back(server):
    url, proc, _ = server
    photos = [png_bytes(shape_image(name, 500 + i)) for i, name in enumerate(SHAPES)]
    before = [classify(url, p).json() for p in photos for _ in range(4)]  # warm up every code path
    rss0 = rss(proc.pid)
    big = io.BytesIO()  # a valid 1800x1200 JPEG under the size limit: decoded, then shrunk for the encoder
    shape_image("red disc", 9).resize((1800, 1200), Image.NEAREST).save(big, "JPEG", quality=85)
    big_ok = big.getvalue()
    kinds = [
        lambda: classify(url, b"\0" * (1_200_000)),  # over --max-upload 1MiB: 413
        lambda: classify(url, b"definitely not an image"),  # 400
        lambda: classify(url, photos[0][: len(photos[0]) // 3]),  # truncated: 400
        lambda: classify(url, bomb_png(50_000, 50_000)),  # bomb: 413 from the header
        lambda: classify(url, bomb_png(3_000, 3_000)),  # 9 Mpx, over --max-pixels 4e6: 413
        lambda: httpx.post(url + "/v1/classify/batch", timeout=60,
                           files=[("images", (f"{i}.png", photos[0], "image/png")) for i in range(6)]),  # 413
        lambda: httpx.post(url + "/v1/classify", json={"image": "@@@"}, timeout=60),  # 400
        lambda: httpx.post(url + "/v1/classify", timeout=60, files={"image": ("big.jpg", big_ok, "image/jpeg")}),
    ]
    want = [413, 400, 400, 413, 413, 413, 400, 200]

    def storm() -> None:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: kinds[i % len(kinds)]().status_code, range(48)))
        assert got == [want[i % len(want)] for i in range(48)]

    storm()
    after = [classify(url, p).json() for p in photos for _ in range(4)]
    assert [(a["prediction_name"], round(a["confidence"], 5)) for a in after] == \
           [(b["prediction_name"], round(b["confidence"], 5)) for b in before]
    # Resident memory after a storm swings with what glibc's per-thread arenas keep of four 1800x1200
    # decodes at once: 29-54 MiB over the warm state in eight storms on this machine, up and down, so one
    # reading is no leak test (a 48 MiB bound on one storm failed on main under load). A leak grows with
    # every storm: the last three storms' lowest reading must not pass the first three's highest, and no
    # storm may take the server far from where it started.
    seen = [rss(proc.pid) - rss0]
    for _ in range(5):
        storm()
        seen.append(rss(proc.pid) - rss0)
    mib = [round(g / 2**20, 1) for g in seen]
    assert max(seen) < 160 * 2**20, f"resident memory grew by up to {max(mib)} MiB over the storms {mib}"
    assert min(seen[3:]) <= max(seen[:3]) + 8 * 2**20, f"resident memory climbs storm after storm (MiB): {mib}"
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'route="/v1/classify",status="413"' in metrics and 'route="/v1/classify",status="400"' in metrics
    assert httpx.get(url + "/healthz", timeout=10).json()["status"] == "ready" and proc.poll() is None


def test_serve_refuses_a_missing_base_and_warns_beyond_loopback(shapes_kb, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import uvicorn

    from fgvr.cli import cli

    r = subprocess.run([sys.executable, "-c", "from fgvr.cli import main; main()", "serve", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr
    # beyond loopback without a token: the warning, before the server starts (which is stopped from binding here:
    # tests never listen beyond 127.0.0.1)
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config.host))
    r = CliRunner().invoke(cli, ["serve", str(shapes_kb), "--host", "0.0.0.0", "--threshold", "0.5"])
    assert r.exit_code == 0 and started == ["0.0.0.0"]
    assert "WARNING" in r.stderr and "WITHOUT a token" in r.stderr
    r = CliRunner().invoke(cli, ["serve", str(shapes_kb), "--host", "0.0.0.0", "--threshold", "0.5"],
                           env={"FGVR_TOKEN": "t0k"})
    assert r.exit_code == 0 and "WITHOUT a token" not in r.stderr


def test_a_correction_on_the_page_accepted_is_served_while_others_are_answered(shapes_kb, tmp_path):
    """Issue 24's check: on the page a person marks an answer wrong and names a new class; the operator
    accepts it through the API; the next request for that photo is answered with the corrected class, while
    a load of other requests (before, during and after the swap) is served without an error."""
    import shutil

    sync_playwright = _chromium()
    kb = tmp_path / "kb"
    shutil.copytree(shapes_kb, kb)  # the session's base stays as it is
    photo = tmp_path / "odd disc.png"
    shape_image("red disc", 991, size=96).save(photo)
    others = [png_bytes(shape_image(n, 600 + i)) for i, n in enumerate(SHAPES)]
    op = {"Authorization": "Bearer op-t0ken"}
    problems: list[str] = []
    with running_server(kb, tmp_path, "--threshold", "0.5", env={"FGVR_ADMIN_TOKEN": "op-t0ken"}) as (url, proc):
        first = classify(url, photo.read_bytes()).json()
        assert first["prediction_name"] == "red disc" and first["base_version"] == 1
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1180, "height": 860})
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#result:not([hidden])", timeout=60_000)
                assert page.inner_text("#top1") == "red disc"
                page.click("#wrong")
                page.wait_for_selector("#correct:not([hidden])", timeout=30_000)
                names = page.eval_on_selector_all("#correct-class option", "os => os.map(o => o.textContent)")
                assert "red disc" not in names and {"blue stripes", "green checker"} <= set(names)
                page.select_option("#correct-class", "__new__")
                page.fill("#correct-new", "scarlet disc")
                page.fill("#correct-name", "ana")
                page.click("#correct-send")
                page.wait_for_function("() => document.getElementById('correct-status').dataset.id", timeout=30_000)
                cid = page.eval_on_selector("#correct-status", "e => e.dataset.id")
                assert "queued for review" in page.inner_text("#correct-status")
                OUTPUT.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(OUTPUT / "serve_correction.png"), full_page=True)
            finally:
                browser.close()
        queued = httpx.get(url + "/v1/corrections", params={"state": "pending"}, headers=op, timeout=30).json()
        [c] = queued["corrections"]
        assert c["id"] == cid and c["label"] == "scarlet disc" and c["who"] == "ana" and c["new_class"]
        assert c["replaced"]["prediction_name"] == "red disc"

        errors: list[str] = []
        stop = time.time() + 3600
        served = [0]

        def load(i: int) -> None:
            while time.time() < stop:
                r = classify(url, others[i % len(others)])
                served[0] += 1
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text}")

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load, i) for i in range(4)]
            time.sleep(0.5)
            accepted = httpx.post(f"{url}/v1/corrections/{cid}/accept", headers=op, timeout=120)
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["served_version"] == 2
            after = classify(url, photo.read_bytes()).json()
            time.sleep(0.5)
            stop = 0
            for f in futures:
                f.result(60)
        assert after["prediction_name"] == "scarlet disc" and after["base_version"] == 2
        assert not errors, errors[:3]
        assert served[0] >= 8  # the load really ran across the swap
        assert httpx.get(url + "/v1/info", timeout=10).json()["base_version"] == 2
        assert proc.poll() is None
    assert not problems, problems
