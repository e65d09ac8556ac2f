"""`fgvr models`: every family and known model name, its role, size per dtype, and whether its weights are in
a models folder."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner

from fgvr.cli import cli
from fgvr.models import configs, families


def _rows(args):
    r = CliRunner().invoke(cli, ["models", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_every_family_and_known_name_is_listed():
    rows = _rows(["--no-sizes"])
    assert {r["family"] for r in rows} == set(families.names())
    for fam in families.all_families():
        assert {r["name"] for r in rows if r["family"] == fam.name} >= set(fam.known_configs)
        assert all(r["role"] == fam.role for r in rows if r["family"] == fam.name)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dinov2-base"]["source"] == "facebook/dinov2-base"
    assert by_name["efficientnet-lite0"]["source"] == "packaged"


def test_sizes_are_the_architecture_on_the_meta_device_and_presence_reads_the_folder(tmp_path, tiny_dino_dir):
    shutil.copytree(tiny_dino_dir, tmp_path / "dinov3-vits16")
    rows = {r["name"]: r for r in _rows(["--family", "dinov3_vit", "--dir", str(tmp_path)])}
    assert set(rows) == set(configs.DINOV3)
    from fgvr.models.families.dinov2 import build_meta

    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with torch.device("meta"):
            model = build_meta(configs.DINOV3["dinov3-vitb16"], torch_dtype)
        want = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        assert rows["dinov3-vitb16"]["sizes"][dtype] == want
    assert rows["dinov3-vitb16"]["sizes"]["int8"] is None  # encoders load in fp32/fp16/bf16 only
    assert rows["dinov3-vits16"]["present"] is True and rows["dinov3-vitb16"]["present"] is False


def test_vlm_rows_have_quantised_sizes_and_the_table_prints():
    rows = {r["name"]: r for r in _rows(["--family", "qwen2_5_vl"])}
    s = rows["qwen2.5-vl-3b"]["sizes"]
    assert s["nf4"] < s["int8"] < s["bf16"]
    text = CliRunner().invoke(cli, ["models", "--family", "siglip2", "--no-sizes"]).output
    assert "siglip2-so400m-patch16-naflex" in text and "google/siglip2-so400m-patch16-naflex" in text


def test_unknown_family_and_missing_dir_are_one_line_errors(tmp_path):
    r = CliRunner().invoke(cli, ["models", "--family", "nope"])
    assert r.exit_code == 2 and "known: clip" in r.output
    r = CliRunner().invoke(cli, ["models", "--dir", str(tmp_path / "absent")])
    assert r.exit_code == 2 and "not a folder" in r.output


def test_readme_table_and_download_lines_are_the_declarations():
    """README.md's block is `fgvr models --markdown`: the same rows and download lines, in order, and the
    sizes of the small models as computed now (the large VLMs take seconds to build on the meta device)."""
    from pathlib import Path

    from fgvr.models import catalog

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- fgvr models --markdown: begin -->\n")[1].split("\n<!-- fgvr models --markdown: end -->")[0]
    want = catalog.markdown(catalog.rows(sizes=False))

    def strip_sizes(text: str) -> list[str]:
        return ["|".join(line.split("|")[:5]) if line.startswith("|") else line for line in text.splitlines()]

    assert strip_sizes(block) == strip_sizes(want)
    small = [r for r in catalog.rows(family="dinov2") + catalog.rows(family="efficientnet")]
    for line in catalog.markdown(small).splitlines()[2:2 + len(small)]:
        assert line in block.splitlines()
