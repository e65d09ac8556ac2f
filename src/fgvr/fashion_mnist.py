"""Fashion-MNIST, the demo's real images: read the IDX files Debian ships and export a sample as an image folder.

Why an image folder rather than arrays: the demo must run the same path a user's own photos take
(folder -> data.py -> encoder -> knowledge base -> evaluate), so the 28x28 product photos are written as PNGs
into one folder per class. Folder names are the class names with '/' and ' ' turned into '_' (data.py reads
'_' as a space), so "T-shirt/top" becomes the folder "T-shirt_top" and the class "T-shirt top".

The IDX format (LeCun's MNIST format): a big-endian header, magic = 0x00 0x00 <dtype code> <ndim>, then ndim
big-endian uint32 sizes, then the raw data in C order. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgvr.errors import InputError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"

# Label id -> class name, in Fashion-MNIST's own order (zalandoresearch/fashion-mnist README).
CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> numpy dtypes (all multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(InputError, ValueError):
    """A file that is not a well-formed IDX file; the message names the file and what is wrong."""


class FashionMNISTMissing(InputError, FileNotFoundError):
    """The Fashion-MNIST files are not installed; the message says what to install."""


def folder_name(class_name: str) -> str:
    """A folder name that is safe on every file system and reads back (via '_' -> ' ') as a readable class."""
    return class_name.replace("/", "_").replace(" ", "_")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or .gz) into a numpy array of its declared type and shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IdxError(f"{path}: looks gzip-compressed but does not decompress ({e}); re-download it") from e
    if len(raw) < 4:
        raise IdxError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0:
        raise IdxError(
            f"{path}: bad IDX magic {raw[:4].hex()} (expected 0000<type><ndim>); not an IDX file"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxError(f"{path}: unknown IDX data type 0x{code:02x} in magic {raw[:4].hex()}")
    if ndim == 0:
        raise IdxError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        raise IdxError(
            f"{path}: dims {dims} of {dtype.name} need {expected} data bytes, file has {body}; "
            "the file is truncated or corrupt"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write an array as IDX (gzip if the name ends in .gz). Used by tests and to hand subsets to others."""
    path = Path(path)
    codes = {v.newbyteorder("=").str if v.itemsize > 1 else v.str: k for k, v in _IDX_DTYPES.items()}
    arr = np.asarray(array)
    key = arr.dtype.newbyteorder("=").str if arr.dtype.itemsize > 1 else arr.dtype.str
    if key not in codes:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    code = codes[key]
    buf = io.BytesIO()
    buf.write(bytes([0, 0, code, arr.ndim]))
    buf.write(np.asarray(arr.shape, dtype=">u4").tobytes())
    buf.write(np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes())
    data = buf.getvalue()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    from fgvr.io import atomic_write_bytes

    atomic_write_bytes(path, data)


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the IDX files are: an explicit root, $FGVR_FASHION_MNIST, or the Debian package's folder."""
    return Path(root or os.environ.get("FGVR_FASHION_MNIST") or DEFAULT_DIR)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FashionMNISTMissing(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with: {INSTALL_HINT} "
        "(or set FGVR_FASHION_MNIST to a folder holding the four IDX files)"
    )


@dataclass
class Split:
    """One split as arrays: images (N,28,28) uint8, labels (N,) int64 indexing CLASSES."""

    images: np.ndarray
    labels: np.ndarray


def load_split(split: str, root: str | os.PathLike | None = None) -> Split:
    """Load 'train' (60,000) or 'test' (10,000) images and labels, checking that they belong together."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    d = data_dir(root)
    img_path, lab_path = (_find(d, s) for s in _FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise IdxError(f"{img_path}/{lab_path}: expected (N,H,W) images and (N,) labels, got {images.shape}, {labels.shape}")
    if len(images) != len(labels):
        raise IdxError(f"{img_path}: {len(images)} images but {lab_path}: {len(labels)} labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise IdxError(f"{lab_path}: labels outside 0..{len(CLASSES) - 1}")
    return Split(images=images, labels=labels)


def sample_indices(labels: np.ndarray, *, per_class: int | None = None, total: int | None = None, seed: int = 0) -> np.ndarray:
    """Deterministic sample: `per_class` of each class, or `total` spread as evenly as possible over classes.

    Stratified so that a small test sample still covers every class; sorted so exports are reproducible.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if per_class is None:
        if total is None:
            return np.arange(len(labels))
        base, extra = divmod(int(total), len(classes))
        extra_classes = set(rng.permutation(classes)[:extra].tolist())
        counts = {int(c): base + (1 if int(c) in extra_classes else 0) for c in classes}
    else:
        counts = {int(c): int(per_class) for c in classes}
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        n = counts[int(c)]
        if n > len(idx):
            raise ValueError(f"asked for {n} images of class {CLASSES[int(c)]!r}, only {len(idx)} exist")
        chosen.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def export_image_folder(
    split: Split, indices: np.ndarray, out_dir: str | os.PathLike, *, prefix: str
) -> list[Path]:
    """Write the chosen images as PNGs into out_dir/<class folder>/<prefix>-<index>.png.

    Files already present are kept (an interrupted export resumes); each new file is written atomically.
    """
    from PIL import Image

    from fgvr.io import atomic_write_bytes

    out = Path(out_dir)
    written: list[Path] = []
    for i in np.asarray(indices, dtype=np.int64):
        cls = CLASSES[int(split.labels[i])]
        path = out / folder_name(cls) / f"{prefix}-{int(i):05d}.png"
        if not path.exists():
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(split.images[i])).save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def to_pil(images: np.ndarray) -> list:
    """(N,28,28) uint8 -> RGB PIL images, the form every encoder's preprocess takes."""
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(im)).convert("RGB") for im in images]
