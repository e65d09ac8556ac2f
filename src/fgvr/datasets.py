"""The field's benchmark datasets by name, read from the layout each one is published in.

    splits = load_splits("cub-200-2011", "/data/CUB_200_2011")
    splits.train, splits.test            # fgvr `Dataset`s: the official train and test splits

Nothing is downloaded: the user fetches a dataset from its official page and points `root` at the folder
the archive unpacks to (or the folder above it). Each reader takes the official split from the dataset's
own list files, never from a re-split, and turns the published class labels into readable names:

* CUB-200-2011: `001.Black_footed_Albatross` -> `Black-footed Albatross`. The folder names lost the
  hyphens and apostrophes of the bird names; a lower-case word after an underscore is the second half of
  a hyphenated word (`Black_footed`, `Chuck_will_Widow`, `Black_and_white_Warbler`), an upper-case one a
  new word; `Chuck_will_Widow` and `Whip_poor_Will` are spelled out. Apostrophes are not recovered
  (`Clark_Nutcracker` -> `Clark Nutcracker`).
* Stanford Dogs: `n02085782-Japanese_spaniel` -> `Japanese spaniel` (the WordNet id dropped).
* Stanford Cars: the names in `cars_meta.mat` / `names.csv` (`AM General Hummer SUV 2000`), as published.
* Oxford-IIIT Pets: the breed in the image name, `_` as a space (`american_pit_bull_terrier` ->
  `american pit bull terrier`, `British_Shorthair` -> `British Shorthair`): CLIP's list, word for word.
* FGVC-Aircraft: the variant names of `variants.txt` (`707-320`, `F/A-18`), as published (CLIP's list).
* Flowers-102: the files give label numbers only; the names are the list CLIP and CoOp use
  (`pink primrose`, ...), in label order.
* Fashion-MNIST: the names of the dataset's README (`T-shirt/top`, ...).

Splits where papers differ, and what is used here:

* Flowers-102 publishes train (`trnid`, 10 images per class), validation (`valid`, 10 per class) and test
  (`tstid`, 6,149). Training-free few-shot methods draw their k shots from train + validation (16 shots
  do not fit in 10) and test on `tstid`; so does this reader.
* FGVC-Aircraft: train + val (`images_variant_trainval.txt`) and test, at the variant level (100 classes).
* Oxford-IIIT Pets: `trainval.txt` and `test.txt`. CUB, Dogs, Cars: their train and test lists.

A root that lacks a file raises `DatasetLayoutError` naming that file and showing the expected layout; a
list that names images which are not on disk raises it too (with a count and examples), since a partly
extracted archive would otherwise quietly change the test set.

Fashion-MNIST is stored as IDX arrays, not image files. Its samples point into `cache_dir`, and
`Splits.prepare(samples)` writes the PNGs of just the samples a caller is about to read (the k shots, the
test images), so a benchmark never exports all 70,000.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from fgvr.data import DataError, Dataset, Sample


class DatasetLayoutError(DataError):
    """A dataset root that does not hold the published layout; the message names what is missing."""


@dataclass
class Splits:
    """A dataset's official train and test splits (one class list, shared by both).

    `prepare(samples)`: write the files of these samples to disk before reading them (only datasets whose
    images are not stored as files need it; for the others it does nothing).
    """

    name: str
    root: Path
    train: Dataset
    test: Dataset
    note: str = ""
    _prepare: Callable[[Sequence[Sample]], None] | None = field(default=None, repr=False)

    @property
    def on_demand(self) -> bool:
        """True when sample files exist only after `prepare` (Fashion-MNIST)."""
        return self._prepare is not None

    def prepare(self, samples: Iterable[Sample]) -> None:
        if self._prepare is not None:
            self._prepare(list(samples))


@dataclass(frozen=True)
class DatasetInfo:
    """What `fgvr bench --list` and the README show about a dataset, and how to read it."""

    name: str
    aliases: tuple[str, ...]
    title: str
    classes: int
    published: str  # the official page, by name and address
    layout: str  # the expected folder layout, as a small tree
    split: str  # which lists make the train and the test split
    reader: Callable[..., Splits]


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the readers


def _layout_error(info: DatasetInfo, what: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{info.title}: {what}. Expected the layout of the archive published at {info.published}, "
        f"with --root pointing at its top folder:\n{info.layout}"
    )


def _locate(info: DatasetInfo, root: Path | None, marker: str, subdirs: Sequence[str] = ()) -> Path:
    """The dataset's top folder: `root` itself, or the folder the archive unpacks to inside it."""
    if root is None:
        raise DatasetLayoutError(f"{info.title}: give the folder you downloaded it to (--root DIR).\n{info.layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _layout_error(info, f"{root} is not a folder")
    for base in (root, *(root / s for s in subdirs)):
        if (base / marker).exists():
            return base
    raise _layout_error(info, f"{root / marker} not found")


def _need(info: DatasetInfo, path: Path) -> Path:
    if not path.exists():
        raise _layout_error(info, f"{path} not found")
    return path


def _check_images(info: DatasetInfo, samples: Sequence[Sample], listed_in: str) -> None:
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        show = ", ".join(str(p) for p in missing[:3])
        raise _layout_error(
            info,
            f"{len(missing)} of the {len(samples)} images listed in {listed_in} are not on disk (e.g. {show}); "
            "is the image archive fully extracted",
        )


def _unique_names(info: DatasetInfo, names: dict, source: str) -> None:
    seen: dict[str, object] = {}
    for key, name in names.items():
        if name in seen:
            raise _layout_error(info, f"{source}: {seen[name]!r} and {key!r} both read as {name!r}")
        seen[name] = key


def _datasets(info: DatasetInfo, root: Path, train: list[Sample], test: list[Sample], classes: Iterable[str],
              train_list: str, test_list: str) -> Splits:
    classes = sorted(set(classes))
    for samples, listed in ((train, train_list), (test, test_list)):
        if not samples:
            raise _layout_error(info, f"{listed} lists no images")
        _check_images(info, samples, listed)
    return Splits(name=info.name, root=root, train=Dataset(root=root, classes=list(classes), samples=train),
                  test=Dataset(root=root, classes=list(classes), samples=test),
                  note=f"train: {train_list}, {len(train):,} images; test: {test_list}, {len(test):,} images")


def _read_lines(info: DatasetInfo, path: Path, fields: int) -> list[list[str]]:
    """Whitespace-separated lines of a list file; the last field keeps its inner spaces."""
    rows = []
    for n, line in enumerate(_need(info, path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, fields - 1)
        if len(parts) != fields:
            raise _layout_error(info, f"{path}, line {n}: expected {fields} fields, got {line!r}")
        rows.append(parts)
    return rows


def _loadmat(info: DatasetInfo, path: Path, keys: Sequence[str]) -> dict:
    from scipy.io import loadmat

    _need(info, path)
    try:
        mat = loadmat(str(path))
    except Exception as e:  # a truncated or non-MATLAB file
        raise _layout_error(info, f"{path} is not a readable .mat file ({e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise _layout_error(info, f"{path} has no variable(s) {missing} (found {sorted(k for k in mat if not k.startswith('__'))})")
    return mat


def _mat_strings(cells) -> list[str]:
    """A MATLAB cell array of strings (any shape) -> list of str."""
    import numpy as np

    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in np.asarray(cells, dtype=object).ravel()]


def _mat_ints(values) -> list[int]:
    import numpy as np

    return [int(v) for v in np.asarray(values).ravel()]


# ----------------------------------------------------------------------------------------------------------
# CUB-200-2011


# The two CUB names whose last part is an upper-case word inside the hyphenated name.
CUB_NAME_EXCEPTIONS = {"Chuck_will_Widow": "Chuck-will's-widow", "Whip_poor_Will": "Whip-poor-will"}


def cub_class_name(folder: str) -> str:
    """`001.Black_footed_Albatross` -> `Black-footed Albatross` (see the module docstring)."""
    name = re.sub(r"^\d+\.", "", folder.strip())
    if name in CUB_NAME_EXCEPTIONS:
        return CUB_NAME_EXCEPTIONS[name]
    words = [w for w in name.split("_") if w]
    out = words[0] if words else name
    for w in words[1:]:
        out += ("-" if w[0].islower() else " ") + w
    return out


def read_cub(root: Path | None) -> Splits:
    info = DATASETS["cub-200-2011"]
    base = _locate(info, root, "images.txt", ("CUB_200_2011",))
    classes = {cid: cub_class_name(folder) for cid, folder in _read_lines(info, base / "classes.txt", 2)}
    _unique_names(info, classes, "classes.txt")
    images = dict(_read_lines(info, base / "images.txt", 2))
    labels = dict(_read_lines(info, base / "image_class_labels.txt", 2))
    is_train = dict(_read_lines(info, base / "train_test_split.txt", 2))
    train, test = [], []
    image_dir = _need(info, base / "images")
    for iid, rel in images.items():
        for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if iid not in table:
                raise _layout_error(info, f"image {iid} of images.txt is missing from {fname}")
        if is_train[iid] not in ("0", "1"):
            raise _layout_error(info, f"train_test_split.txt: image {iid} has is_training_image "
                                      f"{is_train[iid]!r}, expected 1 or 0")
        if labels[iid] not in classes:
            raise _layout_error(info, f"image_class_labels.txt gives image {iid} class {labels[iid]}, "
                                            "which classes.txt does not list")
        (train if is_train[iid] == "1" else test).append(Sample(image_dir / rel, classes[labels[iid]]))
    return _datasets(info, base, train, test, classes.values(), "train_test_split.txt (is_training_image=1)",
                     "train_test_split.txt (is_training_image=0)")


# ----------------------------------------------------------------------------------------------------------
# Stanford Dogs


def dogs_class_name(folder: str) -> str:
    """`n02085782-Japanese_spaniel` -> `Japanese spaniel`."""
    return folder.split("-", 1)[1].replace("_", " ") if re.match(r"^n\d+-", folder) else folder.replace("_", " ")


def read_dogs(root: Path | None) -> Splits:
    info = DATASETS["stanford-dogs"]
    base = _locate(info, root, "Images", ())
    images = base / "Images"
    # lists.tar unpacks without a folder of its own: accept the .mat files in lists/ or in the root
    lists = base if (base / "train_list.mat").exists() and not (base / "lists").is_dir() else base / "lists"
    splits, names = {}, {}
    for split in ("train", "test"):
        mat = _loadmat(info, lists / f"{split}_list.mat", ("file_list", "labels"))
        files, labels = _mat_strings(mat["file_list"]), _mat_ints(mat["labels"])
        if len(files) != len(labels):
            raise _layout_error(info, f"{split}_list.mat: {len(files)} files but {len(labels)} labels")
        samples = []
        for rel, lab in zip(files, labels):
            folder = rel.replace("\\", "/").split("/", 1)[0]
            name = dogs_class_name(folder)
            if names.setdefault(lab, name) != name:
                raise _layout_error(info, f"{split}_list.mat: label {lab} is given to folders of "
                                                 f"{names[lab]!r} and {name!r}")
            samples.append(Sample(images / rel, name))
        splits[split] = samples
    _unique_names(info, names, "train_list.mat/test_list.mat")
    return _datasets(info, base, splits["train"], splits["test"], names.values(), "train_list.mat",
                     "test_list.mat")


# ----------------------------------------------------------------------------------------------------------
# Stanford Cars: the devkit, the all-in-one cars_annos.mat, or the CSV re-packaging


def _first(base: Path, *rels: str) -> Path | None:
    return next((base / r for r in rels if (base / r).exists()), None)


def read_cars(root: Path | None) -> Splits:
    info = DATASETS["stanford-cars"]
    if root is None:
        _locate(info, root, "")
    base = Path(root).expanduser()
    for sub in ("", "stanford_cars", "stanford-cars"):
        b = base / sub if sub else base
        if _first(b, "devkit/cars_meta.mat", "cars_meta.mat"):
            return _read_cars_devkit(info, b)
        if (b / "anno_train.csv").exists() or (b / "names.csv").exists():
            return _read_cars_csv(info, b)
        if (b / "cars_annos.mat").exists():
            return _read_cars_annos(info, b)
    if not base.is_dir():
        raise _layout_error(info, f"{base} is not a folder")
    raise _layout_error(info, f"none of {base}/devkit/cars_meta.mat, {base}/anno_train.csv (the CSV "
                                    f"re-packaging) or {base}/cars_annos.mat found")


def _cars_names(info: DatasetInfo, meta: Path) -> list[str]:
    names = _mat_strings(_loadmat(info, meta, ("class_names",))["class_names"])
    _unique_names(info, dict(enumerate(names, 1)), str(meta))
    return names


def _cars_samples(info, annos: Path, folder: Path, names: list[str], *, name_field: str = "fname") -> list[Sample]:
    mat = _loadmat(info, annos, ("annotations",))
    rec = mat["annotations"].ravel()
    fields = rec.dtype.names or ()
    if "class" not in fields or name_field not in fields:
        raise _layout_error(info, f"{annos}: annotations have fields {fields}; "
                                                f"expected 'class' and {name_field!r} (is it the file with labels?)")
    out = []
    for r in rec:
        cid = _mat_ints(r["class"])[0]
        if not 1 <= cid <= len(names):
            raise _layout_error(info, f"{annos}: class {cid} outside 1..{len(names)}")
        out.append(Sample(folder / _mat_strings([r[name_field]])[0], names[cid - 1]))
    return out


def _read_cars_devkit(info: DatasetInfo, base: Path) -> Splits:
    names = _cars_names(info, _first(base, "devkit/cars_meta.mat", "cars_meta.mat"))
    train_annos = _first(base, "devkit/cars_train_annos.mat", "cars_train_annos.mat") or base / "devkit/cars_train_annos.mat"
    test_annos = _first(base, "devkit/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat")
    if test_annos is None:
        plain = _first(base, "devkit/cars_test_annos.mat", "cars_test_annos.mat")
        extra = (f" ({plain} has no labels: the labelled test annotations were published separately as "
                 "cars_test_annos_withlabels.mat)") if plain else ""
        raise _layout_error(info, f"{base}/devkit/cars_test_annos_withlabels.mat not found{extra}")
    train = _cars_samples(info, _need(info, train_annos), _need(info, base / "cars_train"), names)
    test = _cars_samples(info, test_annos, _need(info, base / "cars_test"), names)
    return _datasets(info, base, train, test, names, "cars_train_annos.mat", "cars_test_annos_withlabels.mat")


def _read_cars_annos(info: DatasetInfo, base: Path) -> Splits:
    mat = _loadmat(info, base / "cars_annos.mat", ("annotations", "class_names"))
    names = _mat_strings(mat["class_names"])
    _unique_names(info, dict(enumerate(names, 1)), "cars_annos.mat")
    train, test = [], []
    rec = mat["annotations"].ravel()
    if not {"relative_im_path", "class", "test"} <= set(rec.dtype.names or ()):
        raise _layout_error(info, f"cars_annos.mat: annotations have fields {rec.dtype.names}; expected "
                                        "relative_im_path, class, test")
    for r in rec:
        cid = _mat_ints(r["class"])[0]
        if not 1 <= cid <= len(names):
            raise _layout_error(info, f"cars_annos.mat: class {cid} outside 1..{len(names)}")
        s = Sample(base / _mat_strings([r["relative_im_path"]])[0], names[cid - 1])
        (test if _mat_ints(r["test"])[0] else train).append(s)
    return _datasets(info, base, train, test, names, "cars_annos.mat (test=0)", "cars_annos.mat (test=1)")


def _read_cars_csv(info: DatasetInfo, base: Path) -> Splits:
    """The Kaggle re-packaging: names.csv (one class per line), anno_{train,test}.csv
    (`fname,x1,y1,x2,y2,class`, no header), images in car_data/car_data/{train,test}/<class>/<fname>."""
    names = [r[0] for r in csv.reader(_need(info, base / "names.csv").read_text(encoding="utf-8-sig").splitlines()) if r]
    _unique_names(info, dict(enumerate(names, 1)), "names.csv")
    splits = {}
    for split in ("train", "test"):
        folder = _first(base, f"car_data/car_data/{split}", f"car_data/{split}", split)
        if folder is None:
            raise _layout_error(info, f"{base}/car_data/car_data/{split} not found")
        by_name: dict[str, Path] = {}
        for p in folder.rglob("*"):
            if p.is_file():
                by_name.setdefault(p.name, p)
        samples = []
        path = _need(info, base / f"anno_{split}.csv")
        for n, row in enumerate(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()), 1):
            if not row:
                continue
            if len(row) != 6 or not row[5].strip().isdigit():
                raise _layout_error(info, f"{path}, line {n}: expected fname,x1,y1,x2,y2,class, got {row}")
            cid = int(row[5])
            if not 1 <= cid <= len(names):
                raise _layout_error(info, f"{path}, line {n}: class {cid} outside 1..{len(names)}")
            samples.append(Sample(by_name.get(row[0].strip(), folder / row[0].strip()), names[cid - 1]))
        splits[split] = samples
    return _datasets(info, base, splits["train"], splits["test"], names, "anno_train.csv", "anno_test.csv")


# ----------------------------------------------------------------------------------------------------------
# Oxford-IIIT Pets


def pets_class_name(image_id: str) -> str:
    """`american_pit_bull_terrier_12` -> `american pit bull terrier` (CLIP's spelling)."""
    return image_id.rsplit("_", 1)[0].replace("_", " ")


def read_pets(root: Path | None) -> Splits:
    info = DATASETS["oxford-pets"]
    base = _locate(info, root, "annotations/trainval.txt", ("oxford-iiit-pet",))
    images = _need(info, base / "images")
    names: dict[str, str] = {}
    splits = {}
    for split in ("trainval", "test"):
        samples = []
        for image_id, class_id, _species, _breed in _read_lines(info, base / "annotations" / f"{split}.txt", 4):
            name = pets_class_name(image_id)
            if names.setdefault(class_id, name) != name:
                raise _layout_error(info, f"annotations/{split}.txt: class id {class_id} is given to "
                                                f"{names[class_id]!r} and {name!r}")
            samples.append(Sample(images / f"{image_id}.jpg", name))
        splits[split] = samples
    _unique_names(info, names, "annotations/trainval.txt")
    return _datasets(info, base, splits["trainval"], splits["test"], names.values(), "annotations/trainval.txt",
                     "annotations/test.txt")


# ----------------------------------------------------------------------------------------------------------
# FGVC-Aircraft


def read_aircraft(root: Path | None) -> Splits:
    info = DATASETS["fgvc-aircraft"]
    top = _locate(info, root, "data/images_variant_trainval.txt", ("fgvc-aircraft-2013b",))
    data = top / "data"
    _need(info, data / "images")
    variants = [line.strip() for line in _need(info, data / "variants.txt").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    known = set(variants)
    splits = {}
    for split in ("trainval", "test"):
        samples = []
        for image_id, variant in _read_lines(info, data / f"images_variant_{split}.txt", 2):
            if variant not in known:
                raise _layout_error(info, f"images_variant_{split}.txt: variant {variant!r} of image "
                                               f"{image_id} is not in variants.txt")
            samples.append(Sample(data / "images" / f"{image_id}.jpg", variant))
        splits[split] = samples
    return _datasets(info, top, splits["trainval"], splits["test"], variants, "data/images_variant_trainval.txt",
                     "data/images_variant_test.txt")


# ----------------------------------------------------------------------------------------------------------
# Oxford Flowers-102

# Label 1..102 -> name: the list of CLIP's data/prompts.md (also CoOp's), in label order.
FLOWERS_102_CLASSES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy",
    "daffodil", "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink and yellow dahlia", "cautleya spicata",
    "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus",
    "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea", "camellia", "mallow",
    "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)


def read_flowers(root: Path | None) -> Splits:
    info = DATASETS["flowers-102"]
    base = _locate(info, root, "imagelabels.mat", ("flowers-102", "flowers102"))
    labels = _mat_ints(_loadmat(info, base / "imagelabels.mat", ("labels",))["labels"])
    setid = _loadmat(info, base / "setid.mat", ("trnid", "valid", "tstid"))
    jpg = _need(info, base / "jpg")
    bad = sorted({v for v in labels if not 1 <= v <= len(FLOWERS_102_CLASSES)})
    if bad:
        raise _layout_error(info, f"imagelabels.mat: labels {bad[:5]} outside 1..{len(FLOWERS_102_CLASSES)}")

    def samples(ids) -> list[Sample]:
        out = []
        for i in _mat_ints(ids):
            if not 1 <= i <= len(labels):
                raise _layout_error(info, f"setid.mat: image id {i} outside 1..{len(labels)} (imagelabels.mat)")
            out.append(Sample(jpg / f"image_{i:05d}.jpg", FLOWERS_102_CLASSES[labels[i - 1] - 1]))
        return out

    train = samples(setid["trnid"]) + samples(setid["valid"])
    return _datasets(info, base, train, samples(setid["tstid"]), (FLOWERS_102_CLASSES[v - 1] for v in set(labels)),
                     "setid.mat trnid + valid", "setid.mat tstid")


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX arrays; images written on demand)


def read_fashion_mnist(root: Path | None, cache_dir: Path | None = None) -> Splits:
    """Both splits from the IDX files (Debian: /usr/share/datasets/fashion-mnist); sample paths point into
    `cache_dir` and `Splits.prepare` writes the PNGs of the samples asked for."""
    from fgvr import fashion_mnist as fm

    info = DATASETS["fashion-mnist"]
    if cache_dir is None:
        raise ValueError("fashion-mnist needs a cache_dir: its images are written there as they are needed")
    d = fm.data_dir(root)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if not ((d / stem).is_file() or (d / f"{stem}.gz").is_file()):
            raise _layout_error(info, f"{d / stem}(.gz) not found (install it with: {fm.INSTALL_HINT})")
    cache_dir = Path(cache_dir)
    arrays = {s: fm.load_split(s, d) for s in ("train", "test")}
    where: dict[Path, tuple[str, int]] = {}
    split_samples: dict[str, list[Sample]] = {}
    for split, arr in arrays.items():
        out = []
        for i, lab in enumerate(arr.labels.tolist()):
            name = fm.CLASSES[lab]
            p = cache_dir / split / fm.folder_name(name) / f"{split}-{i:05d}.png"
            where[p] = (split, i)
            out.append(Sample(p, name))
        split_samples[split] = out

    def prepare(samples: Sequence[Sample]) -> None:
        for split, arr in arrays.items():
            idx = [where[s.path][1] for s in samples if s.path in where and where[s.path][0] == split]
            if idx:
                fm.export_image_folder(arr, idx, cache_dir / split, prefix=split)

    classes = list(fm.CLASSES)
    return Splits(name=info.name, root=d, train=Dataset(root=cache_dir, classes=sorted(classes), samples=split_samples["train"]),
                  test=Dataset(root=cache_dir, classes=sorted(classes), samples=split_samples["test"]),
                  note=info.split, _prepare=prepare)


# ----------------------------------------------------------------------------------------------------------
# the registry


def _info(**kw) -> DatasetInfo:
    return DatasetInfo(**kw)


DATASETS: dict[str, DatasetInfo] = {i.name: i for i in (
    _info(name="cub-200-2011", aliases=("cub", "cub200", "cub-200"), title="CUB-200-2011", classes=200,
          published="'The Caltech-UCSD Birds-200-2011 Dataset' (https://www.vision.caltech.edu/datasets/cub_200_2011/), CUB_200_2011.tgz",
          layout=("  CUB_200_2011/\n    images.txt  image_class_labels.txt  train_test_split.txt  classes.txt\n"
                  "    images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ..."),
          split="train_test_split.txt: 5,994 train / 5,794 test", reader=read_cub),
    _info(name="stanford-dogs", aliases=("dogs", "stanford_dogs"), title="Stanford Dogs", classes=120,
          published="'Stanford Dogs Dataset' (http://vision.stanford.edu/aditya86/ImageNetDogs/), images.tar + lists.tar",
          layout=("  <root>/\n    Images/n02085620-Chihuahua/n02085620_10074.jpg ...\n"
                  "    lists/train_list.mat  lists/test_list.mat   (or directly in <root>/, as lists.tar unpacks)"),
          split="train_list.mat: 12,000 train / test_list.mat: 8,580 test", reader=read_dogs),
    _info(name="stanford-cars", aliases=("cars", "stanford_cars", "cars196"), title="Stanford Cars", classes=196,
          published="'Stanford Cars Dataset' (https://ai.stanford.edu/~jkrause/cars/car_dataset.html), car_devkit.tgz + cars_train.tgz + cars_test.tgz + cars_test_annos_withlabels.mat",
          layout=("  devkit layout:\n    <root>/devkit/cars_meta.mat  devkit/cars_train_annos.mat  "
                  "devkit/cars_test_annos_withlabels.mat (or in <root>/)\n    <root>/cars_train/00001.jpg ...  "
                  "<root>/cars_test/00001.jpg ...\n"
                  "  or the all-in-one release: <root>/cars_annos.mat  <root>/car_ims/000001.jpg ...\n"
                  "  or the Kaggle CSV re-packaging: <root>/names.csv  anno_train.csv  anno_test.csv\n"
                  "    <root>/car_data/car_data/train/<class>/00001.jpg ...  car_data/car_data/test/<class>/00001.jpg ..."),
          split="cars_train_annos.mat: 8,144 train / cars_test_annos_withlabels.mat: 8,041 test", reader=read_cars),
    _info(name="oxford-pets", aliases=("pets", "oxford-iiit-pet", "oxford_pets"), title="Oxford-IIIT Pets", classes=37,
          published="'The Oxford-IIIT Pet Dataset' (https://www.robots.ox.ac.uk/~vgg/data/pets/), images.tar.gz + annotations.tar.gz",
          layout=("  <root>/\n    annotations/trainval.txt  annotations/test.txt\n"
                  "    images/Abyssinian_1.jpg ..."),
          split="annotations/trainval.txt: 3,680 train / test.txt: 3,669 test", reader=read_pets),
    _info(name="fgvc-aircraft", aliases=("aircraft", "fgvc_aircraft", "fgvc-aircraft-2013b"), title="FGVC-Aircraft",
          classes=100,
          published="'FGVC-Aircraft Benchmark' (https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/), fgvc-aircraft-2013b.tar.gz",
          layout=("  fgvc-aircraft-2013b/\n    data/variants.txt  data/images_variant_trainval.txt  "
                  "data/images_variant_test.txt\n    data/images/0034309.jpg ..."),
          split="images_variant_trainval.txt: 6,667 train / images_variant_test.txt: 3,333 test (variant level)",
          reader=read_aircraft),
    _info(name="flowers-102", aliases=("flowers", "flowers102", "oxford-flowers-102", "oxford_flowers"),
          title="Oxford Flowers-102", classes=102,
          published="'102 Category Flower Dataset' (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/), 102flowers.tgz + imagelabels.mat + setid.mat",
          layout="  <root>/\n    imagelabels.mat  setid.mat\n    jpg/image_00001.jpg ...",
          split="setid.mat trnid + valid: 2,040 train / tstid: 6,149 test", reader=read_flowers),
    _info(name="fashion-mnist", aliases=("fashion_mnist", "fmnist"), title="Fashion-MNIST", classes=10,
          published="'Fashion-MNIST' (https://github.com/zalandoresearch/fashion-mnist); Debian package dataset-fashion-mnist",
          layout=("  <root>/ (default /usr/share/datasets/fashion-mnist, or $FGVR_FASHION_MNIST)\n"
                  "    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  t10k-images-idx3-ubyte.gz  "
                  "t10k-labels-idx1-ubyte.gz"),
          split="60,000 train / 10,000 test (the IDX files)", reader=read_fashion_mnist),
)}


def dataset_info(name: str) -> DatasetInfo:
    """The dataset called `name` or one of its aliases (case and `_`/`-` do not matter)."""
    key = name.strip().lower().replace("_", "-")
    for info in DATASETS.values():
        if key == info.name or key in {a.replace("_", "-") for a in info.aliases}:
            return info
    raise DataError(f"unknown dataset {name!r}: fgvr reads {', '.join(DATASETS)} (see `fgvr bench --list`)")


def load_splits(name: str, root: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Splits:
    """The official train and test splits of the dataset `name`, read from `root` (see the module docstring)."""
    info = dataset_info(name)
    root = Path(root) if root is not None else None
    if info.reader is read_fashion_mnist:
        return read_fashion_mnist(root, Path(cache_dir) if cache_dir is not None else None)
    return info.reader(root)


def describe_datasets() -> str:
    """The table `fgvr bench --list` prints: name, classes, split, where it is published, the layout."""
    lines = []
    for i in DATASETS.values():
        lines += [f"{i.name}  ({i.title}, {i.classes} classes; also: {', '.join(i.aliases)})",
                  f"  published: {i.published}", f"  split: {i.split}", i.layout, ""]
    return "\n".join(lines).rstrip()
