"""The Fashion-MNIST reader and exporter, on tiny IDX files the tests write themselves."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fgvr import fashion_mnist as fm
from fgvr.data import read_dataset


def _raw_idx(arr: np.ndarray, code: int) -> bytes:
    """An IDX file built by hand (not via write_idx), so the reader is checked against the format itself."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def test_read_idx_raw_and_gzip(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    (tmp_path / "imgs").write_bytes(_raw_idx(images, 0x08))
    (tmp_path / "imgs.gz").write_bytes(gzip.compress(_raw_idx(images, 0x08)))
    for name in ("imgs", "imgs.gz"):
        out = fm.read_idx(tmp_path / name)
        assert out.shape == (3, 4, 5) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_multibyte(tmp_path):
    values = np.array([1, 256, -2, 70000], dtype=">i4")  # stored big-endian as the format says
    (tmp_path / "ints").write_bytes(_raw_idx(values, 0x0C))
    out = fm.read_idx(tmp_path / "ints")
    assert out.tolist() == [1, 256, -2, 70000]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad IDX magic"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "unknown IDX data type"),
        (b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"), "truncated header"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "truncated or corrupt"),
        (b"\x00\x00", "too short"),
    ],
)
def test_read_idx_rejects_bad_files_naming_them(tmp_path, data, message):
    path = tmp_path / "broken-idx"
    path.write_bytes(data)
    with pytest.raises(fm.IdxError, match=message) as e:
        fm.read_idx(path)
    assert "broken-idx" in str(e.value)


def test_write_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, size=(7, 28, 28), dtype=np.uint8)
    fm.write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    assert (tmp_path / "x-idx3-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "x-idx3-ubyte.gz"), arr)


def _fake_fashion_dir(tmp_path, n_train=40, n_test=20):
    rng = np.random.default_rng(1)
    d = tmp_path / "fmnist"
    for split, n in (("train", n_train), ("t10k", n_test)):
        fm.write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        fm.write_idx(d / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return d


def test_missing_dataset_says_what_to_install(tmp_path):
    with pytest.raises(fm.FashionMNISTMissing, match="apt-get install dataset-fashion-mnist"):
        fm.load_split("train", tmp_path / "nowhere")


def test_mismatched_images_and_labels_are_refused(tmp_path):
    d = _fake_fashion_dir(tmp_path)
    fm.write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(fm.IdxError, match="20 images but"):
        fm.load_split("test", d)


def test_sampling_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(10), 30)
    a = fm.sample_indices(labels, per_class=3, seed=5)
    assert np.bincount(labels[a], minlength=10).tolist() == [3] * 10
    np.testing.assert_array_equal(a, fm.sample_indices(labels, per_class=3, seed=5))
    assert not np.array_equal(a, fm.sample_indices(labels, per_class=3, seed=6))
    b = fm.sample_indices(labels, total=23, seed=0)
    counts = np.bincount(labels[b], minlength=10)
    assert counts.sum() == 23 and counts.min() == 2 and counts.max() == 3


def test_export_reads_back_as_an_image_folder(tmp_path):
    split = fm.load_split("train", _fake_fashion_dir(tmp_path))
    idx = fm.sample_indices(split.labels, per_class=2, seed=0)
    paths = fm.export_image_folder(split, idx, tmp_path / "folder", prefix="train")
    assert len(paths) == 20 and all(p.is_file() for p in paths)
    ds = read_dataset(tmp_path / "folder")
    # '/' never reaches the file system; data.py reads '_' back as a space
    assert "T-shirt top" in ds.classes and "Ankle boot" in ds.classes and len(ds.classes) == 10
    assert len(ds.samples) == 20
    # the pixels survive the PNG round trip exactly
    from PIL import Image

    first = Image.open(paths[0])
    np.testing.assert_array_equal(np.asarray(first), split.images[idx[0]])
    # a second export keeps the files already there (resume) and returns the same paths
    before = paths[0].stat().st_mtime_ns
    assert fm.export_image_folder(split, idx, tmp_path / "folder", prefix="train") == paths
    assert paths[0].stat().st_mtime_ns == before
