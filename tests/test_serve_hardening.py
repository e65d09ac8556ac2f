"""`fgvr serve` against hostile clients, through FastAPI's test client and the ASGI guard itself: the Host
check (DNS rebinding), metrics labels from a closed set, request bodies held at once capped (503 at once
over the cap), images counted by their decoded mode, a malformed run summary and a changed run."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from fgvr.serve import Guard, Metrics, ServeSettings, create_app  # noqa: E402
from fakes import png_bytes, shape_image  # noqa: E402

LOCAL = "http://127.0.0.1"


def opener_for(kb: Path, **kw):
    from fgvr.pipeline import open_system

    return lambda: open_system(kb, **kw)


def wait_ready(c: TestClient) -> None:
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        if c.get("/healthz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("not ready")


@pytest.fixture(scope="module")
def client(shapes_kb):
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(max_upload_bytes=200_000, max_pixels=4_000_000))
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("host,ok", [("127.0.0.1:8000", True), ("localhost", True), ("[::1]:8000", True),
                                     ("127.3.4.5", True), ("LOCALHOST.:80", True), ("evil.example", False),
                                     ("evil.example:8000", False), ("127.0.0.1.evil.example", False),
                                     ("", False)])
def test_a_loopback_server_answers_loopback_host_names_only(client, host, ok):
    for path in ("/v1/info", "/healthz", "/"):
        r = client.get(path, headers={"host": host})
        if ok:
            assert r.status_code == 200, (host, path, r.text)
        else:
            assert r.status_code == (421 if host else 400), (host, path)
            assert "--allowed-host" in r.json()["hint"] and "knowledge_base" not in r.text


def test_allowed_host_and_a_non_loopback_bind():
    s = ServeSettings(allowed_hosts=("box.lan",))
    assert s.checks_host and s.host_allowed("BOX.lan:8000") and s.host_allowed("localhost")
    assert not s.host_allowed("other.lan")
    public = ServeSettings(bind="0.0.0.0")
    assert not public.checks_host  # names it answers to are unknown: the token (and the loud warning) guard it
    assert ServeSettings(bind="0.0.0.0", allowed_hosts=("a.b",)).checks_host


def test_metrics_labels_come_from_a_closed_set_and_refused_requests_add_nothing(shapes_kb):
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(token="s3cret"))
    auth = {"authorization": "Bearer s3cret"}
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        before = c.get("/metrics", headers=auth).text
        for i in range(150):
            c.request(f"X{i}Y", f"/v1/made-up-{i}", headers=auth)  # invented methods and paths
            c.request(f"Q{i}", f"/nothing/{i}")  # no token: 401
            c.get(f"/v1/info?{i}", headers={**auth, "host": f"evil{i}.example"})  # wrong Host: 421
        after = c.get("/metrics", headers=auth).text
    series = [line for line in after.splitlines() if line.startswith("fgvr_requests_total")]
    assert not any("X1Y" in s or "made-up" in s or "Q1" in s or 'status="401"' in s for s in series)
    assert 'fgvr_refused_total{reason="token"} 150' in after and 'fgvr_refused_total{reason="host"} 150' in after
    assert len(after) < len(before) + 3000, (len(before), len(after))


def _guard(settings: ServeSettings, inner):
    return Guard(inner, SimpleNamespace(settings=settings, metrics=Metrics()))


def test_request_bodies_held_at_once_are_capped_and_released():
    """Four requests have sent 900 of their 1,000-byte bodies and stall; the cap is 4,000 bytes, so a fifth
    declaring 500 is answered 503 at once (so is one with no length, as its bytes arrive), one declaring 300
    still fits, and once they are answered everything held is released."""
    settings = ServeSettings(max_upload_bytes=1000, max_held_bytes=0)  # cap = one batch body = 4,000
    assert settings.held_cap == 4000

    async def inner(scope, receive, send):
        msg = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(msg["body"])).encode()})

    async def main():
        guard = _guard(settings, inner)
        gate = asyncio.Event()

        def request(n: int, slow: bool, length: bool = True):
            scope = {"type": "http", "method": "POST", "path": "/v1/classify",
                     "headers": [(b"host", b"127.0.0.1")] + ([(b"content-length", str(n).encode())] if length else [])}
            sent = []

            parts = [b"x" * (n - 100), b"x" * 100] if slow else [b"x" * n]

            async def receive():
                if len(parts) == 1 and slow:
                    await gate.wait()
                return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

            async def send(msg):
                sent.append(msg)

            return guard(scope, receive, send), sent

        slow = [request(1000, True) for _ in range(4)]
        tasks = [asyncio.create_task(co) for co, _ in slow]
        await asyncio.sleep(0.05)
        assert guard.held == 3600
        co, sent = request(500, False)
        await asyncio.wait_for(co, 1)  # answered at once, not after the others
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        co, sent = request(500, False, length=False)  # no Content-Length: counted as it arrives
        await asyncio.wait_for(co, 1)
        assert sent[0]["status"] == 503
        co, sent = request(300, False)
        await asyncio.wait_for(co, 1)
        assert sent[0]["status"] == 200 and guard.held == 3600
        gate.set()
        await asyncio.gather(*tasks)
        assert [s[0]["status"] for _, s in slow] == [200] * 4 and [s[1]["body"] for _, s in slow] == [b"1000"] * 4
        assert guard.held == 0
        co, sent = request(1000, False)
        await co
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"1000" and guard.held == 0

    asyncio.run(main())


def test_an_image_is_counted_by_its_decoded_mode(client):
    buf = io.BytesIO()  # 1900 x 1900 float: 3.6 Mpx is under the 4 Mpx limit, 18 MB over its 16 MB budget
    Image.fromarray(np.zeros((1900, 1900), np.float32), "F").save(buf, format="TIFF", compression="tiff_adobe_deflate")
    assert len(buf.getvalue()) < 200_000
    r = client.post("/v1/classify", files={"image": ("f.tif", buf.getvalue(), "image/tiff")})
    assert r.status_code == 413 and "mode F" in r.json()["detail"]
    ok = client.post("/v1/classify", files={"image": ("s.png", png_bytes(shape_image("red disc", 3)), "image/png")})
    assert ok.status_code == 200


def test_a_malformed_summary_is_skipped_and_a_changed_run_shows_its_own_image(shapes_kb, tmp_path):
    from fgvr.data import read_dataset
    from fgvr.evaluate import run_evaluation
    from fgvr.pipeline import open_system

    runs = tmp_path / "runs"
    with open_system(shapes_kb, threshold=0.5) as system:
        run_evaluation(system, read_dataset(shapes_kb.parent / "test"), runs / "good", {"kb": "k", "data": "t"},
                       progress=False, report=False)
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text('{"n_images": 3,')
    (runs / "list").mkdir()
    (runs / "list" / "summary.json").write_text("[1, 2]")
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(runs=runs))
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        r = c.get("/v1/runs")
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["name"] for x in body["runs"]] == ["good"] and len(body["warnings"]) == 2
        assert any("broken" in w for w in body["warnings"]) and any("list" in w for w in body["warnings"])
        assert c.get("/v1/runs/broken").status_code == 422
        first = c.get("/v1/runs/good/image/0").content
        # the run is rewritten: record 0 is now another image (the first one's file is untouched)
        res = runs / "good" / "results.jsonl"
        lines = res.read_text().splitlines()
        other = next(i for i, x in enumerate(lines) if json.loads(x)["label"] != json.loads(lines[0])["label"])
        lines[0], lines[other] = lines[other], lines[0]
        res.write_text("\n".join(lines) + "\n")
        import os
        os.utime(res, ns=(res.stat().st_atime_ns, res.stat().st_mtime_ns + 10**9))
        second = c.get("/v1/runs/good/image/0").content
        assert second != first and c.get(f"/v1/runs/good/image/{other}").content == first


def test_a_run_of_a_newer_record_schema_is_a_409_naming_its_file(shapes_kb, tmp_path):
    """A results file written by a newer fgvr is refused as a JSON 409 that names the run and its file
    (the server is older than the run), not a 500; the other runs stay browsable."""
    from fgvr.records import RECORD_SCHEMA

    runs = tmp_path / "runs"
    row = {"path": str(shapes_kb.parent / "test" / "red_disc" / "0.png"), "path_taken": "fast", "prediction": 0,
           "prediction_name": "red disc", "confidence": 0.9, "label": "red disc", "label_id": 0, "correct": True,
           "candidates": [{"id": 0, "name": "red disc", "fast": 0.9}]}
    for name, schema in (("newer", "fgvr.result/3"), ("current", RECORD_SCHEMA)):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"n_images": 1, "accuracy": 1.0}))
        (runs / name / "results.jsonl").write_text(json.dumps({"schema": schema, **row}) + "\n")
    app = create_app(opener_for(shapes_kb, threshold=0.5), ServeSettings(runs=runs))
    with TestClient(app, base_url=LOCAL) as c:
        wait_ready(c)
        assert [x["name"] for x in c.get("/v1/runs").json()["runs"]] == ["current", "newer"]
        for url in ("/v1/runs/newer/cell?true=0&pred=0", "/v1/runs/newer/image/0"):
            r = c.get(url)
            assert r.status_code == 409, (url, r.status_code, r.text)
            detail = r.json()["detail"]
            assert "run newer" in detail and "results.jsonl" in detail and "fgvr.result/3" in detail
            assert "upgrade fgvr" in detail and "\n" not in detail and str(tmp_path) not in detail
        ok = c.get("/v1/runs/current/cell?true=0&pred=0")
        assert ok.status_code == 200 and ok.json()["count"] == 1


def test_openapi_describes_the_records_and_the_answers_fit_them(client, shapes_kb):
    from fgvr.serve import models

    spec = client.get("/openapi.json").json()
    assert client.get("/docs").status_code == 200 and "docs.js" in client.get("/docs").text
    op = spec["paths"]["/v1/classify"]["post"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClassifyResult")
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    props = spec["components"]["schemas"]["ClassifyResult"]["properties"]
    assert {"schema", "prediction", "prediction_name", "candidates"} <= set(props)
    assert "413" in op["responses"] and "/v1/classify/batch" in spec["paths"] and "/v1/runs" in spec["paths"]
    img = (shapes_kb.parent / "test" / "red_disc" / "0.png").read_bytes()
    r = client.post("/v1/classify", files={"image": ("0.png", img, "image/png")}).json()
    rec = models.ClassifyResult.model_validate(r)
    assert rec.prediction_name == "red disc" and rec.candidates[0].name == "red disc"
    # the models declare every key an answer has, and no other (README's record table is checked against
    # them: test_readme_schema), so /openapi.json describes the whole answer
    declared = lambda model: {f.alias or n for n, f in model.model_fields.items()}  # noqa: E731
    assert set(r) == declared(models.ClassifyResult)
    assert all(set(c) == declared(models.Candidate) for c in r["candidates"])
    assert set(r["trigger"]) == declared(models.TriggerInfo)
    models.Classes.model_validate(client.get("/v1/classes").json())
    models.Info.model_validate(client.get("/v1/info").json())
    b = client.post("/v1/classify/batch", files=[("images", ("a.png", img, "image/png")),
                                                 ("images", ("b.png", b"junk", "image/png"))]).json()
    parsed = models.BatchResult.model_validate(b)
    assert isinstance(parsed.results[1], models.BatchError) and parsed.results[0].name == "a.png"
