"""What fgvr reads and writes, hardened: decoding memory counted by the decoded mode (a small 16-bit or float
file is not allowed to take hundreds of megabytes), file names that are not UTF-8 written losslessly, the
output lock through a symlink, and class names escaped for where they are written (report.md, CSV)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvr.data import ImageError, decode_bytes, load_image

_PROBE = textwrap.dedent("""
    import sys
    from fgvr.data import load_image
    def hwm():
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM'):
                return int(line.split()[1]) * 1024
    before = hwm()
    im = load_image(sys.argv[1])
    print(im.mode, im.size[0], im.size[1], hwm() - before)
""")


def _peak_decode_bytes(path: Path) -> int:
    import fgvr

    env = {"PYTHONPATH": str(Path(fgvr.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()
    assert out[0] == "RGB" and max(int(out[1]), int(out[2])) <= 2048
    return int(out[3])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")
@pytest.mark.parametrize("kind", ["float-tiff", "png-16"])
def test_decoding_a_high_depth_image_costs_a_few_bytes_a_pixel(tmp_path, kind):
    w, h = 4000, 3000
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None].repeat(h, 0)
    if kind == "float-tiff":
        path = tmp_path / "f.tif"
        Image.fromarray(ramp * 3, "F").save(path, compression="tiff_adobe_deflate")
    else:
        path = tmp_path / "g.png"
        Image.fromarray((ramp * 65535).astype(np.uint16)).save(path)
    assert path.stat().st_size < 12_000_000
    peak = _peak_decode_bytes(path)
    assert peak < 8 * w * h, f"{kind}: {peak / 1e6:.0f} MB for {w * h / 1e6:.0f} Mpx"


def test_decode_budget_counts_the_decoded_mode(tmp_path):
    assert decode_bytes("F", 100, 100) == 5 * 100 * 100 and decode_bytes("I;16", 10, 10) == 300
    assert decode_bytes("RGB", 10, 10) == 400 and decode_bytes("L", 10, 10) == 100
    f = tmp_path / "f.tif"
    Image.fromarray(np.full((300, 400), 0.5, np.float32), "F").save(f)
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (400, 300), (1, 2, 3)).save(rgb)
    limit = 110_000  # pixels: 440 KB at 4 bytes a pixel; the float image needs 600 KB, the RGB one 480 KB
    with pytest.raises(ImageError, match="mode F: decoding takes 1 MB|budget"):
        load_image(f, max_pixels=int(limit * 1.2))
    assert load_image(rgb, max_pixels=int(limit * 1.2)).size == (400, 300)
    im = load_image(f)  # within the default budget: scaled, not clipped (0.5 of [0, 1] -> 128)
    assert im.mode == "RGB" and im.getpixel((5, 5)) == (128, 128, 128)


def test_exif_orientation_applies_after_shrinking(tmp_path):
    im = Image.new("RGB", (3000, 1000), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown portrait
    im.save(tmp_path / "r.jpg", exif=exif)
    out = load_image(tmp_path / "r.jpg", max_side=600)
    assert out.size == (200, 600)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_file_names_that_are_not_utf8_are_written_losslessly_and_resume(tmp_path):
    import json
    import os
    import shutil

    from click.testing import CliRunner
    from fakes import write_shapes

    from fgvr.cli import cli

    write_shapes(tmp_path / "support", 3, seed=0)
    write_shapes(tmp_path / "test", 2, seed=1)
    odd = []
    for split in ("support", "test"):
        folder = sorted((tmp_path / split).iterdir())[0]
        raw = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1 bytes: not valid UTF-8
        shutil.copy(sorted(folder.iterdir())[0], raw)
        odd.append(os.fsdecode(raw))
    run = CliRunner().invoke
    r = run(cli, ["build-kb", str(tmp_path / "support"), "--out", str(tmp_path / "kb"), "--shots", "4"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text(encoding="utf-8"))
    assert "caf\udce9.png" in json.dumps(manifest, ensure_ascii=False)
    for args in (["evaluate", str(tmp_path / "kb"), str(tmp_path / "test"), "--out", str(tmp_path / "run")],
                 ["classify", str(tmp_path / "kb"), str(tmp_path / "test"), "--out", str(tmp_path / "cls")]):
        for attempt in range(2):  # the second run resumes: reads back what the first wrote
            r = run(cli, args)
            assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 7 and odd[1] in {r["path"] for r in recs}
    assert Path(odd[1]).is_file() and os.fsencode(odd[1]).endswith(b"caf\xe9.png")
    parts = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "cls").glob("part-*.jsonl"))
    assert len(parts.splitlines()) == 7 and odd[1] in {json.loads(x)["path"] for x in parts.splitlines()}


def test_the_output_lock_holds_through_a_symlinked_out(tmp_path):
    import fgvr
    from fgvr.locks import lock_path, output_lock

    real = tmp_path / "runs" / "real"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "via").symlink_to(tmp_path / "runs")
    assert lock_path(tmp_path / "link") == lock_path(real) == lock_path(tmp_path / "elsewhere" / "via" / "real")
    probe = ("import sys\nfrom fgvr.errors import LockedError\nfrom fgvr.locks import output_lock\n"
             "try:\n    with output_lock(sys.argv[1], 'evaluate'):\n        print('taken')\n"
             "except LockedError as e:\n    print('locked', e)\n")
    env = {"PYTHONPATH": str(Path(fgvr.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    with output_lock(real, "evaluate"):
        for name in (tmp_path / "link", tmp_path / "elsewhere" / "via" / "real"):
            out = subprocess.run([sys.executable, "-c", probe, str(name)], capture_output=True, text=True, env=env,
                                 timeout=60).stdout
            assert out.startswith("locked") and "fgvr evaluate" in out, out
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "link")], capture_output=True, text=True,
                         env=env, timeout=60).stdout
    assert out.startswith("taken")


HOSTILE = {"blue stripes": "<img src=x onerror=alert(1)>", "green checker": "[click](javascript:alert(1))",
           "red disc": '=HYPERLINK("http://evil.example","x")'}


def _manifest(root: Path, split: str, rename: dict[str, str], spaced: str | None = None) -> Path:
    lines = ["path,label"]
    for folder in sorted((root / split).iterdir()):
        for i, f in enumerate(sorted(folder.iterdir())):
            label = rename[folder.name.replace("_", " ")]
            if spaced and label == spaced and i % 2:
                label = label + " "  # the same class written with a trailing space
            q = '"' + label.replace('"', '""') + '"'
            lines.append(f"{f},{q}")
    out = root / f"{split}.csv"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def test_class_names_are_escaped_in_report_md_and_csv_cells(tmp_path):
    import csv

    from click.testing import CliRunner
    from fakes import write_shapes

    from fgvr.cli import cli

    write_shapes(tmp_path / "support", 3, seed=0)
    write_shapes(tmp_path / "test", 2, seed=1)
    run = CliRunner().invoke
    r = run(cli, ["build-kb", str(_manifest(tmp_path, "support", HOSTILE)), "--out", str(tmp_path / "kb"), "--shots", "3"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["evaluate", str(tmp_path / "kb"), str(_manifest(tmp_path, "test", HOSTILE)), "--out",
                  str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "<img" not in md and "&lt;img src=x onerror=alert\\(1\\)&gt;" in md
    assert "](javascript" not in md and "\\[click\\]\\(javascript\\:alert\\(1\\)\\)" in md
    for name in ("per_class.csv", "confusion.csv"):
        cells = [c for row in csv.reader((tmp_path / "run" / name).open(encoding="utf-8")) for c in row]
        assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), name
        assert "'" + HOSTILE["red disc"] in cells


def test_labels_are_normalised_and_a_collapse_is_warned(tmp_path):
    import unicodedata

    from fakes import write_shapes

    from fgvr.data import LabelWarning, read_dataset

    write_shapes(tmp_path / "support", 2, seed=0)
    nfd = unicodedata.normalize("NFD", "café")
    rename = {"blue stripes": "café", "green checker": nfd, "red disc": "cat"}
    with pytest.warns(LabelWarning, match="normalised"):
        ds = read_dataset(_manifest(tmp_path, "support", rename, spaced="cat"))
    assert ds.classes == ["café", "cat"] and len(ds.samples) == 6
    assert unicodedata.is_normalized("NFC", ds.classes[0])
    (tmp_path / "folders" / "cat ").mkdir(parents=True)
    (tmp_path / "folders" / "dog").mkdir()
    for d in ("cat ", "dog"):
        Image.new("RGB", (8, 8)).save(tmp_path / "folders" / d / "0.png")
    assert read_dataset(tmp_path / "folders").classes == ["cat", "dog"]
