"""The extension points docs/ARCHITECTURE.md promises, tried as a contributor would: a System 2 backend and a
VLM family are each one new file, found by the package that lists its modules, and work from the commands."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from fgvr import backends
from fgvr.cli import cli
from fgvr.models import families, parse_spec

# A backend that answers deterministically: option A gets the most mass, and it writes one fixed sentence.
DUMMY_BACKEND = '''
from fgvr.backends.base import Generated, OptionScores

NAME = "dummy"
SERVED = True


def claims(text):
    return text.startswith("dummy://")


def open_backend(text, options):
    return DummyVlm(text)


class DummyVlm:
    name = NAME
    served = SERVED

    def __init__(self, text):
        self.text = text

    def score_options(self, questions, images, n_options):
        return [OptionScores(probs=[0.97] + [0.03 / (n - 1)] * (n - 1) if n > 1 else [1.0], tokens_in=7,
                             tokens_out=1) for n in n_options]

    def generate(self, conversations, images, max_new_tokens):
        return [Generated(text="It has stripes across the whole image.", tokens_in=5, tokens_out=8)
                for _ in conversations]

    def describe(self):
        return {"backend": NAME, "mode": "fixed", "model": "dummy", "key": f"dummy|{self.text}"}
'''


@pytest.fixture()
def dummy_backend(tmp_path, monkeypatch):
    plugins = tmp_path / "backend-plugins"
    plugins.mkdir()
    (plugins / "dummy_vlm.py").write_text(DUMMY_BACKEND)
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(plugins)])
    yield
    sys.modules.pop("fgvr.backends.dummy_vlm", None)


def test_a_system2_backend_is_one_new_file(dummy_backend, lite0_setup, tmp_path):
    """`fgvr classify` and `fgvr evaluate --vlm dummy://...` reach the dropped-in backend, and the run is
    bound to that backend's own identity."""
    root, _ = lite0_setup
    assert "dummy" in backends.backend_names()
    backend = backends.get_backend("dummy://here")
    assert backend.served and backend.opened_as[0] == "dummy://here"

    image = next(p for p in (root / "test" / "red_disc").glob("*.png") if p.name != "broken.png")
    got = CliRunner().invoke(cli, ["classify", str(root / "kb"), str(image), "--vlm", "dummy://here",
                                   "--slow-budget", "1.0", "--top-k", "2"])
    assert got.exit_code == 0, got.output
    row = json.loads(got.stdout.strip().splitlines()[0])
    assert row["slow_ran"] and row["slow_tokens_in"] == 7 and row["slow_backend"].startswith("dummy")

    out = tmp_path / "run"
    ran = CliRunner().invoke(cli, ["evaluate", str(root / "kb"), str(root / "test"), "--vlm", "dummy://here",
                                   "--slow-budget", "1.0", "--top-k", "2", "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    slow = [r for r in rows if r.get("slow_ran")]
    assert slow and all(r["slow_tokens_in"] == 7 for r in slow)
    run = json.loads((out / "run.json").read_text())
    assert "dummy|dummy://here" in json.dumps(run)


def test_build_kb_writes_descriptions_through_a_new_backend(dummy_backend, tmp_path):
    from fakes import pattern_images

    pattern_images(tmp_path / "support", 2, seed=0)
    got = CliRunner().invoke(cli, ["build-kb", str(tmp_path / "support"), "--shots", "2", "--vlm", "dummy://kb",
                                   "--out", str(tmp_path / "kb")])
    assert got.exit_code == 0, got.output
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    assert manifest["vlm"]["key"] == "dummy|dummy://kb" and manifest["vlm"]["backend"] == "dummy"
    descriptions = json.loads((tmp_path / "kb" / "descriptions.json").read_text())
    assert set(descriptions.values()) == {"It has stripes across the whole image."}


def test_an_unknown_vlm_text_is_one_clear_error():
    got = CliRunner().invoke(cli, ["memory", "plan", "--vlm", "dummy://nowhere"])
    assert got.exit_code != 0 and "dummy://nowhere" in got.output


# A VLM family on another grid (32-pixel patches), planned from its config like the real one.
NEW_VLM_FAMILY = '''
from fgvr.models.family import Family, VlmDeclaration, grid_resize
from fgvr.models.families.qwen_vl import _build_meta, load

PATCH = 32


def fitted_size(height, width, max_pixels, min_pixels):
    return grid_resize(height, width, PATCH, max_pixels, min_pixels)


def serve_flags(engine, max_pixels, min_pixels):
    return (["--limit-pixels", str(max_pixels)], {}) if engine == "vllm" else ([], {"GRID_MAX": str(max_pixels)})


FAMILY = Family(name="gridvl", role="vlm", title="GridVL", load=load, estimate_bytes=lambda spec: 1,
                build_meta=_build_meta, model_types=("gridvl",),
                vlm=VlmDeclaration(patch=PATCH, default_max_pixels=64 * PATCH * PATCH,
                                   default_min_pixels=4 * PATCH * PATCH, fitted_size=fitted_size,
                                   serve_flags=serve_flags))
'''


def test_a_vlm_family_is_one_new_file(tiny_qwen_dir, tmp_path, monkeypatch):
    """Spec defaults, the pixels a backend sends, the memory plan and the serving engine's flags all come
    from the dropped-in family's declaration."""
    from fgvr.backends.transformers_vlm import open_backend as open_in_process
    from fgvr.models.plan import make_plan
    from fgvr.models.serve_plan import make_serve_plan

    plugins = tmp_path / "family-plugins"
    plugins.mkdir()
    (plugins / "gridvl.py").write_text(NEW_VLM_FAMILY)
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(plugins)])
    families.all_families.cache_clear()
    try:
        folder = tmp_path / "gridvl-tiny"
        folder.mkdir()
        config = json.loads((tiny_qwen_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gridvl"}))
        vlm_names = [f.name for f in families.by_role("vlm")]
        assert vlm_names[0] == "gridvl" and "qwen2_5_vl" in vlm_names  # found, in module-name order
        assert families.vlm_declaration().patch == 28  # the default VLM family stays the marked one

        backend = open_in_process(str(folder), backends.BackendOptions(max_visual_tokens=16))
        assert backend.spec.family == "gridvl" and backend.spec.max_pixels == 16 * 32 * 32
        assert parse_spec(str(folder)).max_pixels is None or parse_spec(str(folder)).family == "gridvl"
        sent = families.vlm_declaration("gridvl").fit_pixels(Image.new("RGB", (300, 200)), 16 * 32 * 32)
        assert sent.width % 32 == 0 and sent.height % 32 == 0 and sent.width * sent.height <= 16 * 32 * 32

        plan = make_plan(str(folder), None, "bf16", 2**40, max_pixels=16 * 32 * 32)
        assert plan.workload.visual_tokens == 16 and plan.fits
        vllm = make_serve_plan("vllm", str(folder), 2**40, encoder=None)
        assert "--limit-pixels 65536" in vllm.command() and vllm.visual_tokens == 64
        assert make_serve_plan("sglang", str(folder), 2**40, encoder=None).command().startswith("GRID_MAX=65536 ")
    finally:
        families.all_families.cache_clear()
        sys.modules.pop("fgvr.models.families.gridvl", None)
