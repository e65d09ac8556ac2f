"""What every dataset module declares, and the layout helpers the readers share.

A dataset module declares `DATASET = DatasetInfo(...)`: its name, where it is published, the folder layout
`--root` must hold, where its class names come from, which lists make its splits, and a reader with the
signature `reader(info, root, options) -> Splits`. Everything that lists datasets (`fgvr bench --list`, the
CLI's help, the README's table) is made from these declarations; nothing else knows a dataset by name.

Errors are `DatasetLayoutError`s (exit 3) that name the missing file and show the expected layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from fgvr.data import DataError, Dataset, Sample

SPLITS = ("official", "coop")


class DatasetLayoutError(DataError):
    """A dataset root that does not hold the published layout; the message names what is missing."""


@dataclass(frozen=True)
class CoopSplit:
    """CoOp's re-split of a dataset: `file` (split_zhou_<Name>.json) in the dataset's folder, its image paths
    relative to `image_dir` (relative to that folder, "" for the folder itself), as CoOp's readers join them."""

    file: str
    image_dir: str


@dataclass(frozen=True)
class ReadOptions:
    """What a caller chooses when reading: the split ("official" or "coop"), the fold of datasets that
    publish several (1-based; None = the first), and where on-demand images are written."""

    split: str = "official"
    fold: int | None = None
    cache_dir: Path | None = None


@dataclass
class Splits:
    """A dataset's train and test splits (one class list, shared by both), and which split they are.

    `split`: how tables name it ("official", "official, fold 3", "coop: split_zhou_OxfordPets.json").
    `test_listed`: test images the split's list names; `test_missing`: those of them not on disk (only a
    reader that accepts a partial download, Birdsnap, leaves any out; every table reports the count).
    `prepare(samples)`: write the files of these samples before reading them (Fashion-MNIST's IDX arrays).
    """

    name: str
    root: Path
    train: Dataset
    test: Dataset
    split: str = "official"
    note: str = ""
    test_listed: int = 0
    test_missing: int = 0
    train_missing: int = 0
    _prepare: Callable[[Sequence[Sample]], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.test_listed = self.test_listed or len(self.test.samples) + self.test_missing

    @property
    def on_demand(self) -> bool:
        """True when sample files exist only after `prepare` (Fashion-MNIST)."""
        return self._prepare is not None

    def prepare(self, samples: Iterable[Sample]) -> None:
        if self._prepare is not None:
            self._prepare(list(samples))


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset, declared in its own module (see the module docstring).

    name / aliases   what `fgvr bench` accepts (case and `_`/`-` do not matter).
    order            position in listings (the paper's order first).
    page / archives  the official page and the files to fetch from it.
    layout           the folder tree `--root` must hold, for messages and `--list`.
    files            the key files, one line, for the README's table.
    class_names      where the readable class names come from.
    split            which lists make train and test, with the published counts.
    folders          the folder names the archive usually unpacks to: `--root` may be that folder or the one
                     above it (one `--root` for several datasets holds each under one of these).
    reader           (info, root, ReadOptions) -> Splits.
    coop             CoOp's re-split, where CoOp published one.
    folds            how many numbered folds the official split has (0: one split).
    official         False where the publisher gives no train/test split (then only --split coop reads it).
    needs_root       False where a default location exists (Fashion-MNIST's Debian package).
    """

    name: str
    title: str
    classes: int
    page: str
    archives: str
    layout: str
    files: str
    class_names: str
    split: str
    reader: Callable[["DatasetInfo", Path | None, ReadOptions], Splits]
    aliases: tuple[str, ...] = ()
    order: int = 100
    folders: tuple[str, ...] = ()
    coop: CoopSplit | None = None
    folds: int = 0
    official: bool = True
    needs_root: bool = True

    @property
    def published(self) -> str:
        return f"{self.page} ({self.archives})"

    def matches(self, name: str) -> bool:
        key = name.strip().lower().replace("_", "-")
        return key == self.name or key in {a.lower().replace("_", "-") for a in self.aliases}


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the readers


def layout_error(info: DatasetInfo, what: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{info.title}: {what}. Expected the layout of the archive published at {info.published}, "
        f"with --root pointing at its top folder (or the folder above it):\n{info.layout}"
    )


def locate(info: DatasetInfo, root: Path | None, marker: str, subdirs: Sequence[str] | None = None) -> Path:
    """The dataset's top folder: `root` itself, or one of the folders the archive unpacks to inside it."""
    if root is None:
        raise DatasetLayoutError(f"{info.title}: give the folder you downloaded it to (--root DIR).\n{info.layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise layout_error(info, f"{root} is not a folder")
    for base in (root, *(root / s for s in (info.folders if subdirs is None else subdirs))):
        if (base / marker).exists():
            return base
    raise layout_error(info, f"{root / marker} not found")


def need(info: DatasetInfo, path: Path) -> Path:
    if not path.exists():
        raise layout_error(info, f"{path} not found")
    return path


def first(base: Path, *rels: str) -> Path | None:
    return next((base / r for r in rels if (base / r).exists()), None)


def missing_images(samples: Sequence[Sample]) -> list[Path]:
    return [s.path for s in samples if not s.path.is_file()]


def check_images(info: DatasetInfo, samples: Sequence[Sample], listed_in: str) -> None:
    missing = missing_images(samples)
    if missing:
        show = ", ".join(str(p) for p in missing[:3])
        raise layout_error(
            info,
            f"{len(missing)} of the {len(samples)} images listed in {listed_in} are not on disk (e.g. {show}); "
            "is the image archive fully extracted",
        )


def unique_names(info: DatasetInfo, names: dict, source: str) -> None:
    seen: dict[str, object] = {}
    for key, name in names.items():
        if name in seen:
            raise layout_error(info, f"{source}: {seen[name]!r} and {key!r} both read as {name!r}")
        seen[name] = key


def make_splits(info: DatasetInfo, root: Path, train: list[Sample], test: list[Sample], classes: Iterable[str],
                train_list: str, test_list: str, split: str = "official") -> Splits:
    """Both splits as `Dataset`s over one sorted class list; every listed image must be on disk."""
    names = sorted(set(classes))
    for samples, listed in ((train, train_list), (test, test_list)):
        if not samples:
            raise layout_error(info, f"{listed} lists no images")
        check_images(info, samples, listed)
    return Splits(name=info.name, root=root, train=Dataset(root=root, classes=list(names), samples=train),
                  test=Dataset(root=root, classes=list(names), samples=test), split=split,
                  note=f"train: {train_list}, {len(train):,} images; test: {test_list}, {len(test):,} images")


def read_lines(info: DatasetInfo, path: Path, fields: int, sep: str | None = None) -> list[list[str]]:
    """Separated lines of a list file (whitespace by default); the last field keeps its inner separators."""
    rows = []
    for n, line in enumerate(need(info, path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(sep, fields - 1) if sep is None else line.rstrip("\r\n").split(sep, fields - 1)
        if len(parts) != fields:
            raise layout_error(info, f"{path}, line {n}: expected {fields} fields, got {line!r}")
        rows.append([p.strip() for p in parts])
    return rows


def read_names(info: DatasetInfo, path: Path) -> list[str]:
    """The non-empty lines of a list file, stripped."""
    return [line.strip() for line in need(info, path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def loadmat(info: DatasetInfo, path: Path, keys: Sequence[str]) -> dict:
    from scipy.io import loadmat as _load

    need(info, path)
    try:
        mat = _load(str(path))
    except Exception as e:  # a truncated or non-MATLAB file
        raise layout_error(info, f"{path} is not a readable .mat file ({e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise layout_error(info, f"{path} has no variable(s) {missing} (found {sorted(k for k in mat if not k.startswith('__'))})")
    return mat


def mat_strings(cells) -> list[str]:
    """A MATLAB cell array of strings (any shape) -> list of str."""
    import numpy as np

    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in np.asarray(cells, dtype=object).ravel()]


def mat_ints(values) -> list[int]:
    import numpy as np

    return [int(v) for v in np.asarray(values).ravel()]


def fold_number(info: DatasetInfo, options: ReadOptions) -> int:
    """The fold to read (1 unless chosen); one clear error outside 1..folds."""
    fold = 1 if options.fold is None else int(options.fold)
    if not 1 <= fold <= info.folds:
        raise DatasetLayoutError(f"{info.title}: --fold {fold} is outside 1..{info.folds} (its official split "
                                 f"comes in {info.folds} folds)")
    return fold


def folder_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name (hidden files left out)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []


def camel_words(text: str) -> str:
    """`ApplyEyeMakeup` -> `Apply Eye Makeup`; `YoYo` -> `Yo Yo` (UCF101's action names)."""
    return " ".join(re.findall(r"[A-Z][^A-Z]*", text)) or text


# ----------------------------------------------------------------------------------------------------------
# CoOp's split files


def read_coop(info: DatasetInfo, root: Path | None) -> Splits:
    """CoOp's `split_zhou_<Name>.json` (train/val/test lists of [path, label, class name], the paths relative
    to the image folder CoOp joins them to). The k shots are drawn from its train list; its test list is the
    test split; its val list is not used (CoOp draws its validation shots there)."""
    coop = info.coop
    assert coop is not None
    base = locate(info, root, coop.file)
    path = base / coop.file
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise layout_error(info, f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val", "test")):
        raise layout_error(info, f"{path}: expected an object with train, val and test lists of "
                                 "[relative path, label, class name]")
    image_dir = base / coop.image_dir if coop.image_dir else base
    names: dict[int, str] = {}
    parts: dict[str, list[Sample]] = {}
    for part in ("train", "val", "test"):
        samples = []
        for n, item in enumerate(split[part]):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], int)
                    and isinstance(item[2], str)):
                raise layout_error(info, f"{path}: {part}[{n}] is {item!r}, expected [relative path, label, class name]")
            rel, label, cname = item
            name = cname.replace("_", " ").strip()  # CoOp's prompts read the names with spaces
            if names.setdefault(label, name) != name:
                raise layout_error(info, f"{path}: label {label} is given to {names[label]!r} and {name!r}")
            samples.append(Sample(image_dir / rel, name))
        parts[part] = samples
    unique_names(info, names, coop.file)
    s = make_splits(info, base, parts["train"], parts["test"], names.values(), f"{coop.file} train",
                    f"{coop.file} test", split=f"coop: {coop.file}")
    s.note += f"; its val list ({len(parts['val']):,} images) is not used"
    return s
