"""Data input: an image folder or a CSV manifest -> a `Dataset`; the k-shot split; robust image decoding.

Two layouts are read:

* a folder `root/<class>/<image>`: the class name is the folder name with `_` read as a space, unless a
  classes file maps folder names to class names;
* a CSV manifest with a `path,label` header: relative paths are relative to the CSV file's folder. A row
  repeated verbatim is read once (with a warning); one file under two labels is an error naming both
  lines; paths that lead outside the manifest's folder (`../../etc/passwd`) are read, with a warning.

Class ids are indices into the sorted list of class names, so the same data gives the same ids on every
machine. The k-shot split is per class and depends only on the seed, the class name and the file names,
never on the order the file system lists them in.

`load_image` is the one place images are decoded. Whatever arrives (grayscale, RGBA, palette, CMYK, 16-bit,
EXIF-rotated, huge) leaves as an RGB `PIL.Image`; anything that is not a decodable image raises
`ImageError(path, reason)` so callers can skip it, list it and go on. Memory is bounded before any pixel is
decoded: the header gives the size, a JPEG is decoded at a reduced scale (draft), and an image whose
decoded size would still exceed the limit (`set_max_decoded_pixels`, `--max-image-pixels`) is refused: a
31 KB 1-bit PNG of 16000x16000 would otherwise become 768 MB of RGB.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fgvr.errors import InputError
from fgvr.io import path_resolver, read_user_text

# Files with these suffixes are treated as images; anything else in a class folder is listed as ignored
# (not silently dropped) so a stray `notes.txt` shows up in the build summary.
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico".split()
)

# Largest image we agree to decode at all (a 16k x 16k photo). Pillow's own default (89 Mpx) warns on
# ordinary panoramas; far larger headers are decompression bombs. We treat Pillow's bomb warning as an
# error, so the limit here is the one that applies.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)

# Images are downscaled while decoding so that memory stays bounded: no encoder here looks at more than
# ~1,000 px per side (Qwen2.5-VL's default cap is 1280 visual tokens = ~1 Mpx).
DEFAULT_MAX_SIDE = 2048

# Largest image decoded in full (pixels after a JPEG's reduced decoding): 64 Mpx is 192 MB as RGB. The
# file size says nothing (PNG and GIF compress flat areas a thousandfold); the header's size does.
DEFAULT_MAX_DECODED_PIXELS = 64_000_000
_max_decoded = [DEFAULT_MAX_DECODED_PIXELS]


def set_max_decoded_pixels(n: int) -> None:
    """The process-wide limit `load_image` applies (the CLI's --max-image-pixels)."""
    if n < 1:
        raise ValueError(f"the decoded-pixel limit must be at least 1, got {n}")
    _max_decoded[0] = int(n)


def max_decoded_pixels() -> int:
    return _max_decoded[0]


class DataError(InputError, ValueError):
    """The dataset as a whole cannot be read (no classes, an empty class, a bad manifest line)."""


class ImageError(Exception):
    """One file is not a usable image. Callers skip it and record `reason` next to `path`."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class FewShotWarning(UserWarning):
    """A class has fewer images than the requested k; all of them are used."""


class ManifestWarning(UserWarning):
    """A manifest read with a caveat: repeated rows dropped, paths outside its folder."""


class OneClassWarning(UserWarning):
    """The data holds a single class: every answer is that class, whatever the image."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str  # the class name (not the id)


@dataclass
class Dataset:
    """Samples plus the class list; a class's id is its index in `classes`.

    `ignored` lists files found in class folders that are not image files by name, with the reason, so a
    build can report them next to the files that failed to decode.
    """

    root: Path
    classes: list[str]
    samples: list[Sample]
    ignored: list[tuple[Path, str]] = field(default_factory=list)

    def class_id(self, label: str) -> int:
        return self._index()[label]

    def _index(self) -> dict[str, int]:
        key = tuple(self.classes)  # rebuilt if the class list was changed after construction
        cached = self.__dict__.get("_idx")
        if cached is None or cached[0] != key:
            cached = (key, {c: i for i, c in enumerate(self.classes)})
            self.__dict__["_idx"] = cached
        return cached[1]

    def by_class(self) -> dict[str, list[Sample]]:
        out: dict[str, list[Sample]] = {c: [] for c in self.classes}
        for s in self.samples:
            out[s.label].append(s)
        return out


# ----------------------------------------------------------------------------------------------------------
# reading a dataset


def normalise_label(label: str) -> str:
    """A class name as fgvr keeps it: Unicode NFC and no surrounding white space, so `café` typed two ways
    or `cat ` with a trailing space is the one class it looks like, not two identical-looking ones."""
    import unicodedata

    return unicodedata.normalize("NFC", label).strip()


class LabelWarning(UserWarning):
    """Labels written differently that became one class once normalised (NFC, trimmed)."""


def folder_to_class_name(folder: str) -> str:
    """`Black_footed_Albatross` -> `Black footed Albatross` (the common convention of FGVR datasets)."""
    return normalise_label(folder.replace("_", " "))


def read_classes_file(path: Path) -> dict[str, str]:
    """A mapping from folder name (or CSV label) to class name.

    Accepted forms: a JSON object `{"folder": "Class name", ...}`, or a UTF-8 text file with one class per
    line, either `folder<TAB>Class name` or just `name` (the folder/label is taken verbatim as the class
    name, underscores kept). Blank lines and lines starting with `#` are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"classes file {path} does not exist")
    text = read_user_text(path, "classes file")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DataError(f"classes file {path} is not valid JSON ({e}): write an object "
                            "{\"folder\": \"Class name\", ...}, or use a .txt file with one class per line") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise DataError(f"classes file {path}: expected a JSON object mapping folder names to class names")
        mapping = dict(obj)
    else:
        mapping = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, name = line.partition("\t")
            key, name = (key, name) if sep else (line, line)
            if not key or not name:
                raise DataError(f"classes file {path}, line {lineno}: expected `folder<TAB>class name`")
            if key in mapping:
                raise DataError(f"classes file {path}, line {lineno}: {key!r} appears twice")
            mapping[key] = name
    mapping = {k: normalise_label(v) for k, v in mapping.items()}
    names = list(mapping.values())
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"classes file {path}: class name(s) {dup} given to more than one folder/label")
    return mapping


def read_dataset(source: str | Path, classes_file: str | Path | None = None) -> Dataset:
    """An image folder (`root/<class>/<image>`), a `.csv` manifest (`path,label`), an imagefolder split, or
    one of the formats of `fgvr.formats` (FiftyOne export, Parquet, Hugging Face save_to_disk) -> `Dataset`.

    With a classes file, it is the full class list: every folder/label must appear in it and every entry
    must have images, so a typo cannot silently drop or invent a class.
    """
    source = Path(source)
    mapping = read_classes_file(Path(classes_file)) if classes_file is not None else None
    return _read_any(source, mapping, classes_file)


def _read_any(source: Path, mapping: dict[str, str] | None, classes_file) -> Dataset:
    from fgvr.formats import FormatError, detect, read_format

    if (kind := detect(source)) is not None:  # FiftyOne, Parquet, Hugging Face save_to_disk
        try:
            where, entries = read_format(kind, source)
        except FormatError as e:
            raise DataError(str(e)) from None
        samples = labelled_samples(where, entries, mapping, classes_file)
        return Dataset(root=source if source.is_dir() else source.parent,
                       classes=sorted({s.label for s in samples}), samples=samples)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _read_manifest(source, mapping, classes_file)
    if not source.exists():
        raise DataError(f"{source} does not exist: pass an image folder (root/<class>/<image>) or a .csv manifest")
    if not source.is_dir():
        raise DataError(f"{source} is neither a folder, a .csv manifest (path,label) nor a .parquet file")
    from fgvr.imagefolder import ImageFolderError, imagefolder_metadata, read_imagefolder, split_folders

    if imagefolder_metadata(source) is not None:  # a Hugging Face imagefolder split
        try:
            meta, entries = read_imagefolder(source)
        except ImageFolderError as e:
            raise DataError(str(e)) from None
        samples = labelled_samples(str(meta), entries, mapping, classes_file)
        return Dataset(root=source, classes=sorted({s.label for s in samples}), samples=samples)
    if splits := split_folders(source):
        raise DataError(f"{source} holds the splits {', '.join(splits)} (Hugging Face imagefolder layout): pass one "
                        f"split, e.g. {source / splits[-1]} (build the base from train, evaluate on test)")
    return _read_folder(source, mapping, classes_file)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _read_folder(root: Path, mapping: dict[str, str] | None, classes_file) -> Dataset:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not folders:
        raise DataError(
            f"{root} has no class folders: expected one subfolder per class, e.g. {root}/<class>/<image>.jpg"
        )
    if mapping is not None:
        unknown = [f.name for f in folders if f.name not in mapping]
        if unknown:
            raise DataError(f"class folder(s) {unknown} in {root} are not in classes file {classes_file}")
        missing = sorted(set(mapping) - {f.name for f in folders})
        if missing:
            raise DataError(f"classes file {classes_file} names folder(s) {missing} that are not in {root}")
    samples: list[Sample] = []
    ignored: list[tuple[Path, str]] = []
    names: dict[str, Path] = {}
    for folder in folders:
        name = mapping[folder.name] if mapping is not None else folder_to_class_name(folder.name)
        if name in names:
            raise DataError(
                f"folders {names[name]} and {folder} both give the class name {name!r}; rename one "
                "or pass a classes file"
            )
        names[name] = folder
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p)
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += [(p, f"not an image file type ({p.suffix or 'no suffix'})") for p in files
                    if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"class folder {folder} contains no image files; add images or remove the folder")
        samples += [Sample(p, name) for p in images]
    return Dataset(root=root, classes=sorted(names), samples=samples, ignored=ignored)


def _read_manifest(path: Path, mapping: dict[str, str] | None, classes_file) -> Dataset:
    rows = list(csv.reader(io.StringIO(read_user_text(path, "manifest"), newline="")))
    if not rows:
        raise DataError(f"manifest {path} is empty: expected a header `path,label` and one row per image")
    header = [h.strip().lower() for h in rows[0]]
    if "path" not in header or "label" not in header:
        raise DataError(f"manifest {path}: the first line must be the header `path,label` (got {rows[0]})")
    ip, il = header.index("path"), header.index("label")
    entries: list[tuple[int, str, Path, str]] = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ip, il) or not row[ip].strip() or row[il] == "":
            raise DataError(f"manifest {path}, line {lineno}: expected `path,label`, got {row}")
        p = Path(row[ip].strip())
        entries.append((lineno, row[ip].strip(), p if p.is_absolute() else path.parent / p, row[il]))
    if not entries:
        raise DataError(f"manifest {path} has a header but no rows")
    samples = labelled_samples(f"manifest {path}", entries, mapping, classes_file)
    folder, resolve = path.parent.resolve(), path_resolver()
    inside = str(folder).rstrip(os.sep) + os.sep
    outside = [f"{name} (line {n})" for n, name, full, _ in entries if not resolve(full).startswith(inside)]
    if outside:
        warnings.warn(f"manifest {path}: {len(outside)} path(s) lead outside its folder {folder} (first: "
                      f"{outside[0]}); check that this is intended", ManifestWarning, stacklevel=3)
    return Dataset(root=path.parent, classes=sorted({s.label for s in samples}), samples=samples)


def labelled_samples(where: str, entries: list[tuple[int, str, Path, str]], mapping: dict[str, str] | None,
                     classes_file: object) -> list[Sample]:
    """(line, path as written, full path, label) rows of a list of labelled images -> samples, read the same
    way for every list format (CSV manifest, imagefolder metadata): a label outside the classes file is an
    error, so is a class of the classes file with no row, and so is one image under two labels; an image
    listed twice with one label is read once, with a warning."""
    samples: list[Sample] = []
    first: dict[str, tuple[int, str]] = {}  # resolved path -> (line, label) where it first appeared
    repeated: list[int] = []
    spellings: dict[str, set[str]] = {}  # class name -> the labels as written that gave it
    resolve = path_resolver()
    for lineno, name, full, raw in entries:
        if "\x00" in str(full):  # no file system has such a name; Python's path calls raise on it
            raise DataError(f"{where}, line {lineno}: the path {name!r} holds a NUL byte: fix the line")
        if mapping is not None:
            if raw not in mapping:
                raise DataError(f"{where}, line {lineno}: label {raw!r} is not in classes file {classes_file}")
        label = mapping[raw] if mapping is not None else normalise_label(raw)
        if not label:
            raise DataError(f"{where}, line {lineno}: the label {raw!r} is only white space; give the class a name")
        spellings.setdefault(label, set()).add(raw)
        key = resolve(full)
        if key in first:
            line0, label0 = first[key]
            if label0 != label:
                raise DataError(f"{where}: {name} is labelled {label0!r} on line {line0} and {label!r} on line "
                                f"{lineno}; one image has one label: fix one of the lines")
            repeated.append(lineno)
            continue
        first[key] = (lineno, label)
        samples.append(Sample(full, label))
    if repeated:
        warnings.warn(f"{where}: {len(repeated)} repeated row(s) read once (line(s) "
                      f"{', '.join(map(str, repeated[:10]))}{', ...' if len(repeated) > 10 else ''})",
                      ManifestWarning, stacklevel=4)
    merged = {k: sorted(v) for k, v in spellings.items() if len(v) > 1 and mapping is None}
    if merged:
        k, v = next(iter(sorted(merged.items())))
        warnings.warn(f"{where}: {len(merged)} class name(s) written in more than one way became one class each "
                      f"once normalised (Unicode NFC, white space trimmed), e.g. {v} -> {k!r}; check that this is "
                      "intended", LabelWarning, stacklevel=4)
    if mapping is not None:
        missing = sorted(set(mapping) - {label for _, _, _, label in entries})
        if missing:
            raise DataError(f"classes file {classes_file} names label(s) {missing} with no rows in {where}")
    return samples


# ----------------------------------------------------------------------------------------------------------
# the k-shot split


def split_k_shot(dataset: Dataset, k: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(support, rest): k images per class drawn with `seed`, and every other image (for validation).

    Per class, files are sorted by path and shuffled by a generator seeded with (seed, class name), so a
    class's draw does not depend on directory listing order or on which other classes exist. A class with
    fewer than k images gives all of them to the support set and warns. Both lists are ordered by class id.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    support: list[Sample] = []
    rest: list[Sample] = []
    for name, items in dataset.by_class().items():
        items = sorted(items, key=lambda s: str(s.path))
        random.Random(f"{seed}\x00{name}").shuffle(items)
        if len(items) < k:
            warnings.warn(f"class {name!r} has {len(items)} image(s), fewer than k={k}: using all of them",
                          FewShotWarning, stacklevel=2)
        support += items[:k]
        rest += items[k:]
    return support, rest


# ----------------------------------------------------------------------------------------------------------
# decoding one image


# Bytes a pixel occupies once Pillow has decoded it, by mode (multi-band modes are stored 4 bytes a pixel
# whatever their band count). What the promise "about 4 bytes a pixel" is counted in.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
                 "BGR;15": 2, "BGR;16": 2, "BGR;24": 3}
# Extra bytes a pixel the conversion to RGB needs at full size: high-depth data is scaled band by band into
# an 8-bit copy; transparency and palettes are expanded to RGBA. Everything else is resized before it is
# converted, so its conversion costs the small image only.
_CONVERT_BYTES = {"P": 4, "PA": 4, "1": 1}
BYTES_PER_PIXEL_BUDGET = 4  # the decoded-memory budget is max_pixels x this (an RGB(A) image as Pillow holds it)
_BAND_ROWS = 256  # rows of a high-depth image scaled at a time


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Peak bytes decoding a `mode` image of width x height takes in `load_image` (the decoded pixels plus
    the full-size work of converting them), so a 16-bit or float file is counted by what it becomes, not
    by its pixel count or its file size."""
    px = width * height
    stored = _STORED_BYTES.get(mode, 4)
    extra = 1 if _high_depth(mode) else _CONVERT_BYTES.get(mode, 0)
    return px * (stored + extra)


def _high_depth(mode: str) -> bool:
    return mode.startswith("I;16") or mode in ("I", "F")


def load_image(path: str | Path, max_side: int | None = DEFAULT_MAX_SIDE,
               max_pixels: int | None = None, data: bytes | None = None) -> Image.Image:
    """Decode `path` to an RGB image with EXIF orientation applied, longest side at most `max_side`.
    With `data` (the file's bytes, already in memory: an upload), those are decoded the same way and `path`
    only names them in errors: no temporary file is written to share this decoder.

    Large JPEGs are decoded at a reduced scale (`draft`) so a 24 Mpx photo never occupies 72 MB before being
    shrunk. Memory is counted before any pixel is decoded: the decoded size (after that reduction) in the
    decoded mode's bytes (`decode_bytes`: a float image is 4 bytes a pixel plus its 8-bit copy, a 16-bit one
    2 + 1) must fit `max_pixels` x 4 bytes (default: the process limit, see `set_max_decoded_pixels`).
    The image is shrunk in its own mode before it is converted, so conversion costs the small image only.
    Transparency is composited on white (what a viewer shows), 16-bit data is scaled to 8 bits rather than
    clipped. Raises `ImageError(path, reason)` for anything that is not a decodable image.
    """
    limit = max_pixels if max_pixels is not None else _max_decoded[0]
    path = Path(path)
    try:
        size = path.stat().st_size if data is None else len(data)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                out = _decode_open(path, im, max_side, limit)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"refused as a decompression bomb: {e}") from None
    except MemoryError:
        raise ImageError(path, "out of memory while decoding") from None
    except Exception as e:  # truncated data, bad headers, codec errors: all mean "this file is unusable"
        msg = str(e) or type(e).__name__
        reason = "truncated image data" if "truncated" in msg.lower() else f"cannot decode: {msg}"
        raise ImageError(path, reason) from None
    return out


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _decode_open(path: Path, im: Image.Image, max_side: int | None, limit: int) -> Image.Image:
    """The budget check, then decode, shrink (in the decoded mode), orient and convert an opened image."""
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(path, f"image is {w}x{h}, over the {MAX_IMAGE_PIXELS:,} pixel limit")
    if max_side and max(w, h) > max_side and im.format == "JPEG":
        r = max_side / max(w, h)
        im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else "RGB",
                 (max(1, round(w * r)), max(1, round(h * r))))
    dw, dh = im.size  # what decoding will really produce (reduced by draft for a JPEG)
    if dw * dh > limit:
        raise ImageError(path, f"image is {w}x{h}, {dw * dh / 1e6:.1f} Mpx decoded, over the "
                               f"{limit / 1e6:g} Mpx limit (raise it with --max-image-pixels)")
    need, budget = decode_bytes(im.mode, dw, dh), limit * BYTES_PER_PIXEL_BUDGET
    if need > budget:
        raise ImageError(path, f"image is {w}x{h} in mode {im.mode}: decoding takes {need / 1e6:.0f} MB, over "
                               f"the {budget / 1e6:.0f} MB budget ({limit / 1e6:g} Mpx x {BYTES_PER_PIXEL_BUDGET}"
                               " bytes; raise it with --max-image-pixels)")
    orientation = im.getexif().get(0x0112)
    im.load()
    out: Image.Image = im
    if _high_depth(out.mode):
        out = _high_depth_to_gray(out)  # full size, 1 byte a pixel; the original is dropped by the caller
    elif out.mode == "1":
        out = out.convert("L")  # resampled as gray, not as 1-bit dots
    elif out.mode in _CONVERT_BYTES:
        out = _to_rgb(out)
    if max_side and max(out.size) > max_side:
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if orientation in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[orientation])
    out = _to_rgb(out)
    return out.copy() if out is im else out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if _high_depth(mode):
        return _high_depth_to_gray(im).convert("RGB")
    if (mode == "P" and "transparency" in im.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _high_depth_to_gray(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images -> 8-bit gray, by scaling, never by clipping. Scaled a band of
    rows at a time (float32), so the work costs the 8-bit result plus one band, never a float64 copy."""
    w, h = im.size
    bands = [(y, min(h, y + _BAND_ROWS)) for y in range(0, h, _BAND_ROWS)]

    def band(y0: int, y1: int) -> np.ndarray:
        return np.asarray(im.crop((0, y0, w, y1))).astype(np.float32)

    lo, hi, finite = np.inf, -np.inf, False
    if not im.mode.startswith("I;16"):
        for y0, y1 in bands:
            a = band(y0, y1)
            ok = a[np.isfinite(a)]
            if ok.size:
                finite = True
                lo, hi = min(lo, float(ok.min())), max(hi, float(ok.max()))
    if not finite:
        lo = hi = 0.0

    def scale(a: np.ndarray) -> np.ndarray:
        if im.mode.startswith("I;16"):
            return (a / 257.0).round()
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            return (a * 255.0).round()
        if im.mode == "I" and lo >= 0 and hi <= 255:
            return a
        if im.mode == "I" and lo >= 0 and hi <= 65535:
            return (a / 257.0).round()
        return (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)

    out = np.empty((h, w), np.uint8)
    for y0, y1 in bands:
        out[y0:y1] = np.nan_to_num(scale(band(y0, y1)), nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255)
    return Image.fromarray(out, "L")
