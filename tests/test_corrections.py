"""Corrections from the page (issue 24, item 3): the review queue beside the base, the operator's token, accept
as `kb add` (a new version the server swaps to without dropping requests, the same image then answered with
the corrected class, the encoder not loaded again), reject, undo as a new version, bad input, and a
correction reported against the experience rule it contradicts (item 4). The page in Chromium is in
tests/test_serve_browser.py."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi", reason="fgvr serve needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from fakes import png_bytes, shape_image  # noqa: E402
from fgvr.cli import cli  # noqa: E402
from fgvr.knowledge_base import load_knowledge_base  # noqa: E402
from fgvr.knowledge_base.corrections import CorrectionQueue, queue_dir  # noqa: E402
from fgvr.knowledge_base.versions import read_log  # noqa: E402
from fgvr.serve import ServeSettings, create_app  # noqa: E402

OP = {"Authorization": "Bearer op-secret"}
LOCAL = "http://127.0.0.1"  # the Host a loopback server answers (TestClient's own "testserver" is refused)


def opener_for(kb: Path, **kw):
    from fgvr.pipeline import open_system

    return lambda: open_system(kb, **kw)


def wait_ready(client: TestClient, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if client.get("/healthz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not become ready")


@pytest.fixture()
def kb(shapes_kb, tmp_path) -> Path:
    """A copy of the session's shapes base (3 classes x 3 shots), so corrections change this one only."""
    out = tmp_path / "kb"
    shutil.copytree(shapes_kb, out)
    return out


def _client(kb: Path, **settings) -> TestClient:
    s = ServeSettings(**{"max_upload_bytes": 400_000, "max_pixels": 4_000_000, "admin_token": "op-secret", **settings})
    return TestClient(create_app(opener_for(kb, threshold=0.5), s), base_url=LOCAL)


def _correct(c: TestClient, data: bytes, headers=None, **fields) -> dict:
    form = {k: (json.dumps(v) if k == "replaced" else str(v)) for k, v in fields.items()}
    r = c.post("/v1/corrections", files={"image": ("x.png", data, "image/png")}, data=form, headers=headers or {})
    assert r.status_code == 201, r.text
    return r.json()


def _classify(c: TestClient, data: bytes) -> dict:
    r = c.post("/v1/classify", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def _encoder_loads() -> int:
    from fgvr.models import registry

    return sum(m.loads for m in registry.report().models if m.family == "efficientnet")


def test_accept_a_new_class_swaps_the_base_and_the_image_is_answered_so(kb):
    photo = png_bytes(shape_image("red disc", 901, size=64))
    with _client(kb) as c:
        wait_ready(c)
        assert c.get("/v1/info").json()["base_version"] == 1
        before = _classify(c, photo)
        assert before["prediction_name"] == "red disc" and before["base_version"] == 1
        made = _correct(c, photo, label="scarlet disc", name="ana",
                        replaced={"prediction_name": before["prediction_name"], "confidence": before["confidence"]})
        assert made["state"] == "pending" and made["new_class"] and made["who"] == "ana"
        assert not made["authenticated"] and made["replaced"]["prediction_name"] == "red disc"
        assert "image" not in made  # the server's own path is not shown
        # the image is kept content-addressed beside the base, the record is a file of its own
        stored = list((queue_dir(kb) / "images").iterdir())
        assert [p.name for p in stored] == [f"{made['sha256']}.png"] and stored[0].read_bytes() == photo
        assert (queue_dir(kb) / "records" / f"{made['id']}.json").is_file()
        assert load_knowledge_base(kb).num_classes == 3  # nothing in the base changes before an accept

        pending = c.get("/v1/corrections", params={"state": "pending"}, headers=OP).json()["corrections"]
        assert [p["id"] for p in pending] == [made["id"]]
        loads = _encoder_loads()
        done = c.post(f"/v1/corrections/{made['id']}/accept", headers=OP)
        assert done.status_code == 200, done.text
        acc = done.json()
        assert acc["state"] == "accepted" and acc["version"] == 2 and acc["served_version"] == 2
        assert _encoder_loads() == loads  # the swap and the kb add reused the loaded encoder
        assert [r.change for r in read_log(kb)] == ["build", "add"]
        assert c.get("/v1/info").json()["base_version"] == 2
        assert "scarlet disc" in [x["name"] for x in c.get("/v1/classes").json()["classes"]]
        after = _classify(c, photo)
        assert after["prediction_name"] == "scarlet disc" and after["base_version"] == 2
        assert c.get("/v1/corrections", params={"state": "pending"}, headers=OP).json()["corrections"] == []

        # undo: the image (and the class it made) removed as a new version; history kept
        undone = c.post(f"/v1/corrections/{made['id']}/undo", headers=OP).json()
        assert undone["state"] == "undone" and undone["undo_version"] == 3 and undone["served_version"] == 3
        assert [r.change for r in read_log(kb)] == ["build", "add", "remove"]
        assert _classify(c, photo)["prediction_name"] == "red disc"
        assert [h["state"] for h in undone["history"]] == ["pending", "accepted", "undone"]
        assert c.post(f"/v1/corrections/{made['id']}/undo", headers=OP).status_code == 409  # once only


def test_accept_under_an_existing_class_and_reject(kb):
    odd = png_bytes(shape_image("green checker", 902, size=64))
    with _client(kb) as c:
        wait_ready(c)
        classes = [x["name"] for x in c.get("/v1/classes").json()["classes"]]
        made = _correct(c, odd, class_id=classes.index("blue stripes"))
        assert made["label"] == "blue stripes" and not made["new_class"] and made["who"] == "anonymous"
        acc = c.post(f"/v1/corrections/{made['id']}/accept", headers=OP).json()
        assert acc["version"] == 2
        new = load_knowledge_base(kb)
        assert new.num_classes == 3 and new.exemplars.shape[0] == 10  # one support image more
        assert new.manifest["classes"][classes.index("blue stripes")]["support"] == 4

        other = _correct(c, png_bytes(shape_image("red disc", 903, size=64)), class_id=0)
        rej = c.post(f"/v1/corrections/{other['id']}/reject", headers=OP).json()
        assert rej["state"] == "rejected" and rej.get("version") is None
        assert len(read_log(kb)) == 2  # a reject changes no base
        back = c.post(f"/v1/corrections/{other['id']}/undo", headers=OP).json()
        assert back["state"] == "pending"  # undoing a reject puts it back in the queue
        states = {x["id"]: x["state"] for x in c.get("/v1/corrections", headers=OP).json()["corrections"]}
        assert states == {made["id"]: "accepted", other["id"]: "pending"}


def test_operator_routes_need_the_operator_token(kb):
    photo = png_bytes(shape_image("red disc", 904, size=48))
    with _client(kb, token="user-secret") as c:
        wait_ready(c)
        assert c.post("/v1/corrections", files={"image": ("x.png", photo, "image/png")},
                      data={"class_id": "0"}).status_code == 401  # the server's token first
        user = {"Authorization": "Bearer user-secret"}
        made = _correct(c, photo, headers=user, class_id=0)
        assert made["authenticated"] and made["who"] == "token holder"
        for method, path in (("get", "/v1/corrections"), ("post", f"/v1/corrections/{made['id']}/accept"),
                             ("post", f"/v1/corrections/{made['id']}/reject"), ("post", f"/v1/corrections/{made['id']}/undo")):
            r = getattr(c, method)(path, headers=user)
            assert r.status_code == 403 and "operator token" in r.json()["detail"], (path, r.text)
        assert c.get("/v1/corrections", headers={"Authorization": "Bearer op-secret"}).status_code == 200
        assert CorrectionQueue(kb).get(made["id"]).state == "pending"
    with _client(kb, admin_token=None) as c:  # no operator token configured: refused, and says how to set one
        wait_ready(c)
        r = c.get("/v1/corrections", headers=OP)
        assert r.status_code == 403 and "--admin-token" in r.json()["detail"]


def test_bad_corrections_are_refused_with_a_reason(kb):
    photo = png_bytes(shape_image("red disc", 905, size=48))
    with _client(kb, max_correction_bytes=20_000) as c:
        wait_ready(c)
        big = png_bytes(Image.effect_noise((160, 160), 90).convert("RGB"))
        assert len(big) > 20_000
        r = c.post("/v1/corrections", files={"image": ("b.png", big, "image/png")}, data={"class_id": "0"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = c.post("/v1/corrections", files={"image": ("x.png", photo, "image/png")}, data={"class_id": "7"})
        assert r.status_code == 400 and "no class id 7" in r.json()["detail"]
        r = c.post("/v1/corrections", files={"image": ("x.png", photo, "image/png")}, data={})
        assert r.status_code == 400 and "name the right class" in r.json()["detail"]
        r = c.post("/v1/corrections", files={"image": ("x.png", b"not an image", "image/png")}, data={"label": "x"})
        assert r.status_code == 400 and "not an image" in r.json()["detail"]
        r = c.post("/v1/corrections", files={"image": ("x.png", photo, "image/png")}, data={"label": "y" * 500})
        assert r.status_code == 400 and "over the limit" in r.json()["detail"]
        r = c.post("/v1/corrections", files={"image": ("x.png", photo, "image/png")},
                   data={"label": "z", "name": "n" * 100})
        assert r.status_code == 400
        for cid in ("abc123", "a.b"):
            r = c.post(f"/v1/corrections/{cid}/accept", headers=OP)
            assert r.status_code == 404 and "no correction" in r.json()["detail"], r.text
        r = c.get("/v1/corrections", params={"state": "maybe"}, headers=OP)
        assert r.status_code == 400
        assert not (queue_dir(kb) / "records").exists()  # nothing refused was kept


def test_swap_under_concurrent_requests_drops_none(kb):
    from fgvr.knowledge_base.incremental import add_images

    photos = [png_bytes(shape_image(n, 910 + i, size=48)) for i, n in enumerate(["red disc", "blue stripes"] * 3)]
    extra = kb.parent / "extra"
    extra.mkdir()
    for i in range(3):
        shape_image("green checker", 920 + i, size=48).save(extra / f"{i}.png")
    with _client(kb) as c:
        wait_ready(c)
        service = c.app.state.service
        errors: list[str] = []
        versions: set[int] = set()
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                for p in photos:
                    r = c.post("/v1/classify", files={"image": ("x.png", p, "image/png")})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text}")
                    else:
                        versions.add(r.json()["base_version"])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(3):
                add_images(kb, [extra / f"{i}.png"], "green checker")
                service.swap(load_knowledge_base(kb))
            deadline = time.time() + 60  # the load goes on until it has been answered on the last version
            while 4 not in versions and time.time() < deadline and not errors:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors[:3]
        assert service.base.version == 4 and 4 in versions and len(versions) >= 2


def test_a_correction_that_contradicts_a_rule_is_reported_against_it(kb):
    from fgvr.rules import ExperienceLibrary, Rule

    lib = ExperienceLibrary([Rule("r-disc", ["red disc", "blue stripes"], "round", "a round red blob is a red disc"),
                             Rule("r-other", ["green checker", "blue stripes"], "grid", "a grid is a checker"),
                             Rule("r-cited", ["red disc"], "red", "red means red disc")], None, kb / "experience")
    (kb / "experience").mkdir()
    lib.save()
    photo = png_bytes(shape_image("red disc", 930, size=48))
    with _client(kb) as c:
        wait_ready(c)
        classes = [x["name"] for x in c.get("/v1/classes").json()["classes"]]
        made = _correct(c, photo, class_id=classes.index("blue stripes"),
                        replaced={"prediction_name": "red disc", "rules_used": ["r-cited"]})
        assert made["contradicted_rules"] == []  # reported once accepted, not on a claim alone
        acc = c.post(f"/v1/corrections/{made['id']}/accept", headers=OP).json()
        assert acc["contradicted_rules"] == ["r-disc", "r-cited"]
        listing = c.get("/v1/corrections", headers=OP).json()
        assert listing["contradicted_rules"] == {"r-disc": [made["id"]], "r-cited": [made["id"]]}
    out = CliRunner().invoke(cli, ["kb", "corrections", str(kb)])
    assert out.exit_code == 0, out.output
    assert "contradicts rules r-disc, r-cited" in out.output
    assert f"rule r-disc contradicted by 1 accepted correction(s): {made['id']}" in out.output


def test_cli_lists_and_reviews_the_queue(kb):
    photo = png_bytes(shape_image("blue stripes", 940, size=48))
    q = CorrectionQueue(kb)
    a = q.submit(photo, "navy stripes", who="bo", replaced={"prediction_name": "blue stripes"})
    b = q.submit(photo, "blue stripes", who="cy")
    assert a.sha256 == b.sha256 and len(list(q.images.iterdir())) == 1  # one file for one photo
    out = CliRunner().invoke(cli, ["kb", "corrections", str(kb), "--state", "pending"])
    assert out.exit_code == 0 and a.id in out.output and b.id in out.output
    assert "'blue stripes' -> 'navy stripes' (new class)" in out.output
    out = CliRunner().invoke(cli, ["kb", "corrections", str(kb), "--accept", a.id])
    assert out.exit_code == 0, out.output
    assert load_knowledge_base(kb).classes[-1] == "navy stripes" and read_log(kb)[-1].version == 2
    out = CliRunner().invoke(cli, ["kb", "corrections", str(kb), "--reject", b.id])
    assert out.exit_code == 0 and "rejected" in out.output
    out = CliRunner().invoke(cli, ["kb", "corrections", str(kb), "--accept", "nosuchid"])
    assert out.exit_code != 0 and "no correction 'nosuchid'" in out.output
    out = CliRunner().invoke(cli, ["kb", "corrections", str(kb), "--json"])
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert {r["id"]: r["state"] for r in rows} == {a.id: "accepted", b.id: "rejected"}


def test_a_request_in_flight_during_a_swap_finishes_on_the_version_it_started_on(kb):
    from fgvr.knowledge_base.incremental import add_images

    photo = png_bytes(shape_image("red disc", 950, size=64))
    new = kb.parent / "new.png"
    shape_image("red disc", 951, size=64).save(new)
    with _client(kb) as c:
        wait_ready(c)
        service = c.app.state.service
        encoder = service.base.fast.encoder
        entered, release = threading.Event(), threading.Event()
        real = encoder.encode_images

        def held(images, **kw):  # the first batch waits inside the encoder until the swap is done
            if not release.is_set() and threading.current_thread().name.startswith("fgvr-encoder"):
                entered.set()
                assert release.wait(60)
            return real(images, **kw)

        encoder.encode_images = held
        answers: list[dict] = []
        try:
            t = threading.Thread(target=lambda: answers.append(_classify(c, photo)))
            t.start()
            assert entered.wait(60)
            add_images(kb, [new], "crimson disc")
            assert service.swap(load_knowledge_base(kb)).version == 2
            release.set()
            t.join(60)
        finally:
            release.set()
            encoder.encode_images = real
        [old] = answers
        assert old["base_version"] == 1 and "crimson disc" not in {x["name"] for x in old["candidates"]}
        now = _classify(c, photo)
        assert now["base_version"] == 2 and "crimson disc" in {x["name"] for x in now["candidates"]}


def test_system2_follows_a_new_version_or_the_swap_is_refused(kb):
    from types import SimpleNamespace

    from fgvr.debias import DebiasedSlowPath
    from fgvr.serve import UploadError
    from fgvr.serve.service import slow_for

    new = SimpleNamespace(classes=["a", "b", "c", "d"], descriptions={"d": "a new one"})
    reasoner = SimpleNamespace(name="vlm", class_names=["a", "b", "c"], descriptions={})
    wrapped = slow_for(DebiasedSlowPath(reasoner, "cyclic"), new)
    assert isinstance(wrapped, DebiasedSlowPath) and wrapped.inner.class_names == ["a", "b", "c", "d"]
    assert wrapped.inner.descriptions == {"d": "a new one"} and reasoner.class_names == ["a", "b", "c"]  # a copy
    with pytest.raises(UploadError) as e:  # a re-ranker holds the support set itself: restart to serve it
        slow_for(SimpleNamespace(name="visual-reranker"), new)
    assert e.value.status == 409 and "restart" in e.value.reason
