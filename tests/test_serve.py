"""`fgvr serve` through FastAPI's test client on a real Lite0 knowledge base: the API's answers equal the
pipeline's, every refusal has its status and reason (size, not an image, truncated, decompression bomb, too
many images, bad base64), the token, support images only by index (a `../` attempt gets nothing), the
run browser, metrics, and the micro-batching queue. The served process, a slow client, a storm of bad
requests and the page in Chromium are in tests/test_serve_browser.py."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from fgvr.serve import MicroBatcher, ServeSettings, UploadError, create_app, is_loopback, loud_warning  # noqa: E402
from fakes import SHAPES, bomb_png, png_bytes, shape_image  # noqa: E402

LOCAL = "http://127.0.0.1"  # the Host a loopback server answers (TestClient's own "testserver" is refused)


def opener_for(kb: Path, **kw):
    from fgvr.pipeline import open_system

    return lambda: open_system(kb, **kw)


def wait_ready(client: TestClient, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        r = client.get("/healthz")
        if r.status_code == 200:
            return
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.05)
    raise AssertionError("the server did not become ready")


@pytest.fixture(scope="module")
def client(shapes_kb):
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(max_upload_bytes=200_000, max_pixels=4_000_000,
                                                                       max_batch_images=4))
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        yield c


def test_classify_multipart_and_json_answer_as_the_pipeline_does(client, shapes_kb):
    from fgvr.pipeline import open_system

    img = shapes_kb.parent / "test" / "red_disc" / "0.png"
    r = client.post("/v1/classify", files={"image": ("0.png", img.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()
    with open_system(shapes_kb, threshold=0.5) as system:
        want = system.classify_paths([img])[0]
    assert got["prediction_name"] == want.prediction_name == "red disc"
    # one record schema: the CLI's fields mean the same in the API (prediction = id, candidates' name)
    cli = want.to_dict()
    assert got["schema"] == "fgvr.result/2" and got["prediction"] == cli["prediction"] == want.prediction
    assert got["fast_prediction"] == cli["fast_prediction"] and got["path_taken"] == cli["path_taken"]
    by_id = {c["id"]: c for c in got["candidates"]}
    assert all(set(c) <= set(by_id[c["id"]]) | {"final"} and by_id[c["id"]]["name"] == c["name"]
               for c in cli["candidates"])
    assert got["confidence"] == pytest.approx(want.confidence, abs=1e-5)
    assert got["path_taken"] == want.path_taken
    scores = [c["score"] for c in got["candidates"]]
    assert scores == sorted(scores, reverse=True) and got["candidates"][0]["name"] == got["prediction_name"]
    assert {c["name"] for c in got["candidates"]} <= set(SHAPES)
    assert got["trigger"]["threshold"] == pytest.approx(0.5)
    assert got["trigger"]["score"] == pytest.approx(want.trigger["score"], abs=1e-5)
    assert got["why"].startswith(got["path_taken"] if got["path_taken"] == "fast" else "doubt")
    assert got["timings_ms"]["encode"] > 0 and got["timings_ms"]["request"] >= got["timings_ms"]["encode"]
    # the top candidate's support images are its own class's, nearest first
    sup = got["candidates"][0]["support"]
    assert len(sup) == 3 and [s["similarity"] for s in sup] == sorted([s["similarity"] for s in sup], reverse=True)
    classes = {c["name"]: c for c in client.get("/v1/classes").json()["classes"]}
    assert {s["index"] for s in sup} == {s["index"] for s in classes["red disc"]["support"]}

    b64 = base64.b64encode(img.read_bytes()).decode()
    j = client.post("/v1/classify", json={"image": "data:image/png;base64," + b64}).json()
    assert j["prediction_name"] == got["prediction_name"] and j["confidence"] == pytest.approx(got["confidence"], abs=1e-6)


def test_batch_answers_in_order_and_a_bad_image_is_its_own_error(client, shapes_kb):
    test = shapes_kb.parent / "test"
    files = [("images", (f"{n}.png", (test / n.replace(" ", "_") / "1.png").read_bytes(), "image/png")) for n in SHAPES]
    files.insert(1, ("images", ("junk.png", b"this is not an image", "image/png")))
    r = client.post("/v1/classify/batch", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["name"] for x in res] == ["blue stripes.png", "junk.png", "green checker.png", "red disc.png"]
    assert res[1]["status"] == 400 and "not an image" in res[1]["error"]
    assert [x["prediction_name"] for x in (res[0], res[2], res[3])] == list(SHAPES)
    too_many = [("images", (f"{i}.png", png_bytes(shape_image("red disc", i)), "image/png")) for i in range(5)]
    r = client.post("/v1/classify/batch", files=too_many)
    assert r.status_code == 413 and "over this server's limit of 4" in r.json()["detail"]
    r = client.post("/v1/classify/batch", json={"images": [base64.b64encode(png_bytes(shape_image("red disc", 7))).decode()]})
    assert r.status_code == 200 and r.json()["results"][0]["prediction_name"] == "red disc"


@pytest.mark.parametrize("case", ["too_big", "not_image", "truncated", "bomb", "empty", "bad_base64", "bad_json",
                                  "two_images", "wrong_type", "no_image"])
def test_bad_input_is_refused_with_status_and_reason(client, case):
    good = png_bytes(shape_image("red disc", 3, size=64))
    post = {
        "too_big": lambda: client.post("/v1/classify", files={"image": ("big.png", b"\0" * 300_000, "image/png")}),
        "not_image": lambda: client.post("/v1/classify", files={"image": ("a.png", b"GIF89a? no, just text", "image/png")}),
        "truncated": lambda: client.post("/v1/classify", files={"image": ("t.png", good[: len(good) // 2], "image/png")}),
        "bomb": lambda: client.post("/v1/classify", files={"image": ("b.png", bomb_png(60_000, 60_000), "image/png")}),
        "empty": lambda: client.post("/v1/classify", files={"image": ("e.png", b"", "image/png")}),
        "bad_base64": lambda: client.post("/v1/classify", json={"image": "not base64 !!"}),
        "bad_json": lambda: client.post("/v1/classify", content=b"{nope", headers={"content-type": "application/json"}),
        "two_images": lambda: client.post("/v1/classify", files=[("image", ("a.png", good, "image/png"))] * 2),
        "wrong_type": lambda: client.post("/v1/classify", content=good, headers={"content-type": "image/png"}),
        "no_image": lambda: client.post("/v1/classify", json={"picture": "x"}),
    }[case]
    want = {"too_big": (413, "over this server's limit"), "not_image": (400, "not an image"),
            "truncated": (400, "truncated"), "bomb": (413, "decompression bomb"), "empty": (400, "empty"),
            "bad_base64": (400, "base64"), "bad_json": (400, "not valid JSON"), "two_images": (400, "one image"),
            "wrong_type": (415, "multipart"), "no_image": (400, '"image"')}[case]
    r = post()
    assert r.status_code == want[0], r.text
    assert want[1] in r.json()["detail"]
    assert client.post("/v1/classify", files={"image": ("ok.png", good, "image/png")}).json()["prediction_name"] == "red disc"


def test_bomb_is_refused_before_decoding(client, monkeypatch):
    """The pixel check reads the header only: load_image (the decoder) is never reached for a bomb."""
    import fgvr.serve.upload as serve_mod

    called = []
    monkeypatch.setattr(serve_mod, "load_image", lambda *a, **k: called.append(a) or Image.new("RGB", (8, 8)))
    r = client.post("/v1/classify", files={"image": ("b.png", bomb_png(30_000, 30_000), "image/png")})
    assert r.status_code == 413 and not called


def test_support_images_only_by_index(client):
    r = client.get("/v1/support/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    assert client.get("/v1/support/9").status_code == 404  # 9 support images: 0..8
    assert client.get("/v1/support/-1").status_code == 404
    for attempt in ("/v1/support/../../../../etc/passwd", "/v1/support/..%2F..%2F..%2Fetc%2Fpasswd",
                    "/v1/support/%2e%2e/%2e%2e/etc/passwd", "/static/../../../../etc/passwd",
                    "/static/..%2F..%2F..%2Fpyproject.toml", "/v1/runs/..%2F..%2F/image/0"):
        r = client.get(attempt)
        assert r.status_code in (404, 422), (attempt, r.status_code)
        assert b"root:" not in r.content and b"[project]" not in r.content


def test_classes_metrics_and_pages(client):
    classes = client.get("/v1/classes").json()["classes"]
    assert [c["name"] for c in classes] == list(SHAPES) and all(len(c["support"]) == 3 for c in classes)
    text = client.get("/metrics").text
    assert 'fgvr_requests_total{method="POST",route="/v1/classify",status="200"}' in text
    assert 'fgvr_request_duration_seconds_bucket{route="/v1/classify",le="+Inf"}' in text
    assert "fgvr_slow_path_total" in text and "fgvr_ready 1" in text
    assert 'fgvr_model_bytes{model="efficientnet-lite0"' in text
    assert any(line.startswith("fgvr_process_resident_bytes ") for line in text.splitlines())
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "common.js", "runs.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http://" not in (Path(__file__).parents[1] / "src/fgvr/static/index.html").read_text()  # nothing external


def test_token_required_when_set(shapes_kb, monkeypatch):
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(token="s3cret"))
    good = png_bytes(shape_image("blue stripes", 5))
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        assert c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the token
        for path in ("/v1/classes", "/metrics", "/v1/support/0"):
            assert c.get(path).status_code == 401
        r = c.post("/v1/classify", files={"image": ("x.png", good, "image/png")}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/classify", files={"image": ("x.png", good, "image/png")}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["prediction_name"] == "blue stripes"


def test_loopback_and_the_loud_warning():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert loud_warning("127.0.0.1", None) is None and loud_warning("0.0.0.0", "tok") is None
    w = loud_warning("0.0.0.0", None)
    assert w is not None and "WITHOUT a token" in w and "--token" in w


def test_healthz_is_ready_only_once_loaded_and_a_failed_load_is_reported(shapes_kb):
    import threading
    from contextlib import contextmanager

    from fgvr.pipeline import open_system

    go = threading.Event()

    @contextmanager
    def slow_opener():
        assert go.wait(30)
        with open_system(shapes_kb, threshold=0.5) as s:
            yield s

    with TestClient(create_app(slow_opener), base_url=LOCAL) as c:
        assert c.get("/healthz").status_code == 503 and c.get("/healthz").json()["status"] == "loading"
        r = c.post("/v1/classify", files={"image": ("x.png", png_bytes(shape_image("red disc", 1)), "image/png")})
        assert r.status_code == 503 and "loading" in r.json()["detail"] and r.headers["retry-after"] == "1"
        go.set()
        wait_ready(c)

    errors = []
    bad = create_app(opener_for(shapes_kb.parent / "nowhere"), on_load_error=errors.append)
    with TestClient(bad, base_url=LOCAL) as c:
        deadline = time.time() + 30
        while c.get("/healthz").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "failed" and "nowhere" in h.json()["error"]
    assert errors


def test_cli_serve_on_a_folder_that_is_no_base_is_one_line_and_exit_4(tmp_path):
    """The load error stops the server and leaves with its family's exit code, as every other command does."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "fgvr.cli", "serve", str(tmp_path), "--port", str(port)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr
    assert "is not a knowledge base" in p.stderr and "Traceback" not in p.stderr


def test_slow_path_with_the_reranker_shows_question_and_answer(shapes_kb):
    """Threshold 0: every image goes slow; System 2 (the CPU re-ranker) answers through its bounded queue."""
    app = create_app(opener_for(shapes_kb, threshold=0.0, reranker=True))
    img = shapes_kb.parent / "test" / "green_checker" / "0.png"
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c, 300)
        r = c.post("/v1/classify", files={"image": ("g.png", img.read_bytes(), "image/png")}).json()
        assert r["path_taken"] == "slow" and r["system2"]["ran"] and r["system2"]["name"] == "visual-reranker"
        assert r["system2"]["answer"] in SHAPES and "green checker" in r["system2"]["question"]
        own = max((c_ for c_ in r["candidates"] if c_["slow"] is not None), key=lambda c_: c_["slow"])
        assert r["system2"]["answer"] == own["name"] and r["system2"]["decision"] == r["prediction_name"]
        assert all(c_["slow"] is not None for c_ in r["candidates"]) and r["prediction_name"] == "green checker"
        assert r["why"].startswith("slow: doubt score") and r["timings_ms"]["slow"] > 0
        metrics = c.get("/metrics").text
        assert "fgvr_slow_path_total 1" in metrics and 'fgvr_images_total{path="slow"} 1' in metrics


def test_runs_browser(shapes_kb, tmp_path):
    from fgvr.data import read_dataset
    from fgvr.evaluate import run_evaluation
    from fgvr.pipeline import open_system

    runs = tmp_path / "runs"
    with open_system(shapes_kb, threshold=0.5) as system:
        run_evaluation(system, read_dataset(shapes_kb.parent / "test"), runs / "first", {"kb": "k", "data": "t"},
                       progress=False, report=False)
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(runs=runs))
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        listing = c.get("/v1/runs").json()["runs"]
        assert [r["name"] for r in listing] == ["first"] and listing[0]["n_images"] == 6
        run = c.get("/v1/runs/first").json()
        m = run["confusion"]["matrix"]
        assert sum(map(sum, m)) == 6 and run["confusion"]["classes"] == list(SHAPES)
        t, p = next((i, j) for i, row in enumerate(m) for j, n in enumerate(row) if n)
        cell = c.get(f"/v1/runs/first/cell?true={t}&pred={p}").json()
        assert cell["count"] == m[t][p] == len(cell["items"])
        item = cell["items"][0]
        assert item["label"] == SHAPES[t] and item["prediction_name"] == SHAPES[p] and item["candidates"]
        img = c.get(item["image"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert c.get("/v1/runs/nope").status_code == 404 and c.get("/v1/runs/first/image/99").status_code == 404
        assert c.get("/runs").status_code == 200
    with TestClient(create_app(opener_for(shapes_kb, threshold=0.5)), base_url=LOCAL) as c:  # without --runs
        wait_ready(c)
        assert c.get("/v1/runs").status_code == 404


def test_micro_batcher_batches_concurrent_items_keeps_order_and_never_holds_a_lone_one():
    calls = []

    def double(xs):
        calls.append(list(xs))
        time.sleep(0.05)
        return [2 * x for x in xs]

    async def main():
        b = MicroBatcher("test", double, max_batch=8, max_wait_s=5.0, max_queue=100, pending=lambda: 0)
        b.start()
        t = time.perf_counter()
        (alone, waited), = await asyncio.gather(b.submit(21))
        lone_s = time.perf_counter() - t
        outs = await asyncio.gather(*(b.submit(i) for i in range(20)))
        full = MicroBatcher("full", double, max_batch=1, max_wait_s=0, max_queue=0)
        full.start()
        with pytest.raises(UploadError) as e:
            await full.submit(1)
        await b.stop()
        await full.stop()
        return alone, lone_s, [o for o, _ in outs], e.value

    alone, lone_s, outs, refused = asyncio.run(main())
    assert alone == 42 and lone_s < 2.5  # max_wait is 5 s: a lone item with nothing pending is not held back
    assert outs == [2 * i for i in range(20)]
    assert max(len(c) for c in calls[1:]) > 1 and all(len(c) <= 8 for c in calls)
    assert refused.status == 503


def test_system2s_answer_is_its_own_pick_not_the_decision():
    from fgvr.pipeline import Candidate, Result
    from fgvr.serve.service import own_pick

    r = Result(path=Path("x"), path_taken="slow", candidates=[Candidate(0, "a", 0.9, slow=0.3, final=0.6),
                                                              Candidate(1, "b", 0.1, slow=0.7, final=0.4)])
    r.slow_prediction = 0  # the decision combines both: "a"; System 2 alone chose "b"
    assert own_pick(r) == "b"
    assert own_pick(Result(path=Path("x"), path_taken="fast", candidates=[Candidate(0, "a", 1.0)])) is None
