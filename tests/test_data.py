"""Data input (issue 3, points 1 and 8): folder/CSV reading, the k-shot split, and robust decoding.

Every bad file is written here by the test itself, so each case says exactly what it feeds in.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvr.data import (
    DataError,
    FewShotWarning,
    ImageError,
    ManifestWarning,
    Sample,
    load_image,
    read_dataset,
    split_k_shot,
)


def _img(path: Path, color=(200, 30, 30), size=(40, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _folder(root: Path, spec: dict[str, int]) -> Path:
    for name, n in spec.items():
        for i in range(n):
            _img(root / name / f"img{i:02d}.png", color=(i * 20 % 255, 10, 10))
    return root


# ------------------------------------------------------------------------------------------- reading


def test_folder_classes_sorted_underscore_is_space_and_odd_names_roundtrip(tmp_path):
    odd = ["Black_footed_Albatross", "café crème", "Boeing 737-800 (v2)", "狗", "a,b;c'd\"e"]
    root = _folder(tmp_path / "data", {n: 2 for n in odd})
    ds = read_dataset(root)
    expected = sorted(n.replace("_", " ") for n in odd)
    assert ds.classes == expected
    assert len(ds.samples) == 10
    assert {s.label for s in ds.samples} == set(expected)
    assert ds.class_id("Black footed Albatross") == expected.index("Black footed Albatross")


def test_classes_file_tab_and_json_mapping(tmp_path):
    root = _folder(tmp_path / "data", {"001.Black_footed_Albatross": 1, "002.Laysan_Albatross": 1})
    tf = tmp_path / "classes.txt"
    tf.write_text("001.Black_footed_Albatross\tBlack-footed Albatross\n002.Laysan_Albatross\n", encoding="utf-8")
    ds = read_dataset(root, classes_file=tf)
    assert ds.classes == ["002.Laysan_Albatross", "Black-footed Albatross"]  # plain line: verbatim
    jf = tmp_path / "classes.json"
    jf.write_text(json.dumps({"001.Black_footed_Albatross": "A", "002.Laysan_Albatross": "B"}), encoding="utf-8")
    assert read_dataset(root, classes_file=jf).classes == ["A", "B"]
    jf.write_text(json.dumps({"001.Black_footed_Albatross": "A"}), encoding="utf-8")
    with pytest.raises(DataError, match="002.Laysan_Albatross"):
        read_dataset(root, classes_file=jf)


def test_csv_manifest_relative_paths_and_labels(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    absolute = _img(tmp_path / "elsewhere" / "c.png")
    man = tmp_path / "sub" / "m.csv"
    man.parent.mkdir()
    man.write_text(f'path,label\n../imgs/a.png,"Fox, red"\n../imgs/b.png,Owl\n{absolute},Owl\n', encoding="utf-8")
    with pytest.warns(ManifestWarning, match="3 path"):  # all three lead outside sub/: said, then read
        ds = read_dataset(man)
    assert ds.classes == ["Fox, red", "Owl"]
    assert ds.samples[0] == Sample(man.parent / "../imgs/a.png", "Fox, red")
    assert ds.samples[2].path == absolute
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.png,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="header"):
        read_dataset(bad)


def test_empty_class_folder_and_no_classes_are_errors_naming_the_folder(tmp_path):
    root = _folder(tmp_path / "data", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("not a picture")
    with pytest.raises(DataError, match=r"dog.*no image files"):
        read_dataset(root)
    flat = tmp_path / "flat"
    _img(flat / "x.png")
    with pytest.raises(DataError, match=rf"{flat}.*no class folders"):
        read_dataset(flat)
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope")


def test_non_image_suffix_is_listed_as_ignored(tmp_path):
    root = _folder(tmp_path / "data", {"cat": 2})
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    ds = read_dataset(root)
    assert len(ds.samples) == 2
    assert [p.name for p, _ in ds.ignored] == ["notes.txt"]


# ------------------------------------------------------------------------------------------- k-shot


def test_split_is_deterministic_seeded_and_independent_of_listing_order(tmp_path):
    root = _folder(tmp_path / "data", {"a": 10, "b": 10, "c": 3})
    ds = read_dataset(root)
    with pytest.warns(FewShotWarning, match="'c' has 3"):
        s1, r1 = split_k_shot(ds, 5, seed=0)
    shuffled = type(ds)(ds.root, ds.classes, list(reversed(ds.samples)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewShotWarning)
        s2, _ = split_k_shot(shuffled, 5, seed=0)
        s3, _ = split_k_shot(ds, 5, seed=1)
        # a class's draw does not depend on which other classes exist
        only_a = type(ds)(ds.root, ["a"], [s for s in ds.samples if s.label == "a"])
        s4, _ = split_k_shot(only_a, 5, seed=0)
    assert s1 == s2
    assert s1 != s3
    assert [s for s in s1 if s.label == "a"] == s4
    assert [sum(s.label == c for s in s1) for c in "abc"] == [5, 5, 3]
    assert set(s1).isdisjoint(r1) and len(s1) + len(r1) == len(ds.samples)
    assert [ds.class_id(s.label) for s in s1] == sorted(ds.class_id(s.label) for s in s1)


# ------------------------------------------------------------------------------------------- decoding


def test_bad_files_raise_image_error_with_reason(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    cases = {
        "zero.jpg": (b"", "empty file"),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x13garbage" * 20, "cannot decode|not an image|truncated"),
        "text.jpg": (b"this is plain text, not a JPEG\n" * 5, "not an image"),
        "truncated.jpg": (good.getvalue()[: len(good.getvalue()) // 2], "truncated"),
        "random.jpg": (np.random.default_rng(0).bytes(500), "not an image"),
    }
    for name, (data, reason) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ImageError, match=reason) as exc:
            load_image(p)
        assert exc.value.path == p and exc.value.reason
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_modes_become_rgb(tmp_path):
    gray = Image.new("L", (20, 10), 128)
    gray.save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel stays red
    rgba.save(tmp_path / "rgba.png")
    pal = Image.new("P", (20, 10), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.gif")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red
    arr16 = np.full((10, 20), 65535, dtype=np.uint16)
    arr16[:, :10] = 32896  # 128 * 257
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    out = {n: load_image(tmp_path / n) for n in ["gray.png", "rgba.png", "pal.gif", "cmyk.jpg", "deep.png"]}
    for n, im in out.items():
        assert im.mode == "RGB" and im.size == (20, 10), n
    assert out["gray.png"].getpixel((5, 5)) == (128, 128, 128)
    assert out["rgba.png"].getpixel((5, 5)) == (255, 255, 255)
    assert out["rgba.png"].getpixel((0, 0)) == (255, 0, 0)
    assert out["pal.gif"].getpixel((5, 5)) == (0, 255, 0)
    r, g, b = out["cmyk.jpg"].getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    assert out["deep.png"].getpixel((2, 2)) == (128, 128, 128)  # scaled, not clipped to 255
    assert out["deep.png"].getpixel((15, 2)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    raw = Image.open(tmp_path / "rot.jpg")
    assert raw.size == (60, 20)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 60)
    r, _, b = out.getpixel((10, 3))  # the left strip is now at the top
    assert r > 200 and b < 60


def test_bytes_in_memory_decode_as_their_file_does(tmp_path):
    """`load_image(name, data=...)` (what the server decodes uploads with, no temporary file) gives the
    file's pixels for every mode, EXIF rotation and a reduced-scale JPEG, and the file's error otherwise."""
    Image.new("L", (20, 10), 128).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((10, 20), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (3000, 2000), (10, 200, 10)).save(tmp_path / "big.jpg", quality=80)
    for name in ["gray.png", "rgba.png", "cmyk.jpg", "deep.png", "rot.jpg", "big.jpg"]:
        data = (tmp_path / name).read_bytes()
        a, b = load_image(tmp_path / name, max_side=500), load_image(name, max_side=500, data=data)
        assert (a.mode, a.size) == (b.mode, b.size) and a.tobytes() == b.tobytes(), name
    cut = (tmp_path / "rot.jpg").read_bytes()[:300]
    (tmp_path / "cut.jpg").write_bytes(cut)
    with pytest.raises(ImageError) as from_file:
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError) as from_bytes:
        load_image("cut.jpg", data=cut)
    assert from_bytes.value.reason == from_file.value.reason
    with pytest.raises(ImageError, match="empty"):
        load_image("nothing.png", data=b"")


def test_very_large_image_is_downscaled_while_decoding(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (10, 200, 10)).save(big, quality=80)
    out = load_image(big)
    assert out.mode == "RGB" and max(out.size) == 2048 and out.size[0] > out.size[1]
    assert load_image(big, max_side=300).size == (300, 200)
    png = tmp_path / "big.png"
    Image.new("L", (3000, 100), 7).save(png)
    assert load_image(png, max_side=1000).size == (1000, 33)


def test_path_resolver_is_path_resolve_for_links_dots_and_missing_paths(tmp_path: Path, monkeypatch) -> None:
    """Manifests are read through a resolver that resolves each folder once (a 60,000-row list spent
    seconds in per-component lstat calls); it must give exactly what Path.resolve() gives, links included,
    or duplicate detection and the "outside its folder" warning would change."""
    import os

    from fgvr.io import path_resolver

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(b"")
    os.symlink(tmp_path / "a", tmp_path / "link")
    os.symlink(tmp_path / "a" / "x.png", tmp_path / "a" / "y.png")
    os.symlink(tmp_path.parent, tmp_path / "a" / "b" / "up")
    monkeypatch.chdir(tmp_path)
    resolve = path_resolver()
    for p in ["a/x.png", "link/x.png", "a/y.png", "link/y.png", "link/../a/x.png", "a/..", "a/", "./a/x.png",
              "missing.png", "a/b/up/x.png", "link/missing/z.png", str(tmp_path / "link" / "x.png"), "/"]:
        assert resolve(p) == str(Path(p).resolve()), p
    # the folder cache lives with one resolver: a re-linked folder is seen by the next one
    os.remove(tmp_path / "link")
    os.symlink(tmp_path / "a" / "b", tmp_path / "link")
    assert path_resolver()("link/x.png") == str(tmp_path / "a" / "b" / "x.png")
