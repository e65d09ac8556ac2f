"""Stanford Cars: the devkit, the all-in-one `cars_annos.mat`, or the Kaggle CSV re-packaging."""

from __future__ import annotations

import csv
from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def read_cars(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    if root is None:
        L.locate(info, root, "")
    base = Path(root).expanduser()
    for sub in ("", *info.folders):
        b = base / sub if sub else base
        if L.first(b, "devkit/cars_meta.mat", "cars_meta.mat"):
            return _read_cars_devkit(info, b)
        if (b / "anno_train.csv").exists() or (b / "names.csv").exists():
            return _read_cars_csv(info, b)
        if (b / "cars_annos.mat").exists():
            return _read_cars_annos(info, b)
    if not base.is_dir():
        raise L.layout_error(info, f"{base} is not a folder")
    raise L.layout_error(info, f"none of {base}/devkit/cars_meta.mat, {base}/anno_train.csv (the CSV "
                                    f"re-packaging) or {base}/cars_annos.mat found")


def _cars_names(info: DatasetInfo, meta: Path) -> list[str]:
    names = L.mat_strings(L.loadmat(info, meta, ("class_names",))["class_names"])
    L.unique_names(info, dict(enumerate(names, 1)), str(meta))
    return names


def _cars_samples(info, annos: Path, folder: Path, names: list[str], *, name_field: str = "fname") -> list[Sample]:
    mat = L.loadmat(info, annos, ("annotations",))
    rec = mat["annotations"].ravel()
    fields = rec.dtype.names or ()
    if "class" not in fields or name_field not in fields:
        raise L.layout_error(info, f"{annos}: annotations have fields {fields}; "
                                                f"expected 'class' and {name_field!r} (is it the file with labels?)")
    out = []
    for r in rec:
        cid = L.mat_ints(r["class"])[0]
        if not 1 <= cid <= len(names):
            raise L.layout_error(info, f"{annos}: class {cid} outside 1..{len(names)}")
        out.append(Sample(folder / L.mat_strings([r[name_field]])[0], names[cid - 1]))
    return out


def _read_cars_devkit(info: DatasetInfo, base: Path) -> Splits:
    names = _cars_names(info, L.first(base, "devkit/cars_meta.mat", "cars_meta.mat"))
    train_annos = L.first(base, "devkit/cars_train_annos.mat", "cars_train_annos.mat") or base / "devkit/cars_train_annos.mat"
    test_annos = L.first(base, "devkit/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat")
    if test_annos is None:
        plain = L.first(base, "devkit/cars_test_annos.mat", "cars_test_annos.mat")
        extra = (f" ({plain} has no labels: the labelled test annotations were published separately as "
                 "cars_test_annos_withlabels.mat)") if plain else ""
        raise L.layout_error(info, f"{base}/devkit/cars_test_annos_withlabels.mat not found{extra}")
    train = _cars_samples(info, L.need(info, train_annos), L.need(info, base / "cars_train"), names)
    test = _cars_samples(info, test_annos, L.need(info, base / "cars_test"), names)
    return L.make_splits(info, base, train, test, names, "cars_train_annos.mat", "cars_test_annos_withlabels.mat")


def _read_cars_annos(info: DatasetInfo, base: Path) -> Splits:
    mat = L.loadmat(info, base / "cars_annos.mat", ("annotations", "class_names"))
    names = L.mat_strings(mat["class_names"])
    L.unique_names(info, dict(enumerate(names, 1)), "cars_annos.mat")
    train, test = [], []
    rec = mat["annotations"].ravel()
    if not {"relative_im_path", "class", "test"} <= set(rec.dtype.names or ()):
        raise L.layout_error(info, f"cars_annos.mat: annotations have fields {rec.dtype.names}; expected "
                                        "relative_im_path, class, test")
    for r in rec:
        cid = L.mat_ints(r["class"])[0]
        if not 1 <= cid <= len(names):
            raise L.layout_error(info, f"cars_annos.mat: class {cid} outside 1..{len(names)}")
        s = Sample(base / L.mat_strings([r["relative_im_path"]])[0], names[cid - 1])
        (test if L.mat_ints(r["test"])[0] else train).append(s)
    return L.make_splits(info, base, train, test, names, "cars_annos.mat (test=0)", "cars_annos.mat (test=1)")


def _read_cars_csv(info: DatasetInfo, base: Path) -> Splits:
    """The Kaggle re-packaging: names.csv (one class per line), anno_{train,test}.csv
    (`fname,x1,y1,x2,y2,class`, no header), images in car_data/car_data/{train,test}/<class>/<fname>."""
    names = [r[0] for r in csv.reader(L.need(info, base / "names.csv").read_text(encoding="utf-8-sig").splitlines()) if r]
    L.unique_names(info, dict(enumerate(names, 1)), "names.csv")
    splits = {}
    for split in ("train", "test"):
        folder = L.first(base, f"car_data/car_data/{split}", f"car_data/{split}", split)
        if folder is None:
            raise L.layout_error(info, f"{base}/car_data/car_data/{split} not found")
        by_name: dict[str, Path] = {}
        for p in folder.rglob("*"):
            if p.is_file():
                by_name.setdefault(p.name, p)
        samples = []
        path = L.need(info, base / f"anno_{split}.csv")
        for n, row in enumerate(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()), 1):
            if not row:
                continue
            if len(row) != 6 or not row[5].strip().isdigit():
                raise L.layout_error(info, f"{path}, line {n}: expected fname,x1,y1,x2,y2,class, got {row}")
            cid = int(row[5])
            if not 1 <= cid <= len(names):
                raise L.layout_error(info, f"{path}, line {n}: class {cid} outside 1..{len(names)}")
            samples.append(Sample(by_name.get(row[0].strip(), folder / row[0].strip()), names[cid - 1]))
        splits[split] = samples
    return L.make_splits(info, base, splits["train"], splits["test"], names, "anno_train.csv", "anno_test.csv")


DATASET = DatasetInfo(
    name="stanford-cars", aliases=("cars", "stanford_cars", "cars196"), title="Stanford Cars", classes=196, order=4,
    page="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
    archives="car_devkit.tgz, cars_train.tgz, cars_test.tgz, cars_test_annos_withlabels.mat",
    layout=("  devkit layout:\n    <root>/devkit/cars_meta.mat  devkit/cars_train_annos.mat  "
            "devkit/cars_test_annos_withlabels.mat (or in <root>/)\n    <root>/cars_train/00001.jpg ...  "
            "<root>/cars_test/00001.jpg ...\n"
            "  or the all-in-one release: <root>/cars_annos.mat  <root>/car_ims/000001.jpg ...\n"
            "  or the Kaggle CSV re-packaging: <root>/names.csv  anno_train.csv  anno_test.csv\n"
            "    <root>/car_data/car_data/train/<class>/00001.jpg ...  car_data/car_data/test/<class>/00001.jpg ...\n"
            "  --split coop: <root>/split_zhou_StanfordCars.json beside cars_train/ and cars_test/"),
    files=("`devkit/cars_meta.mat`, `devkit/cars_train_annos.mat`, `cars_test_annos_withlabels.mat` (root or "
           "devkit), `cars_train/`, `cars_test/`; or `cars_annos.mat` + `car_ims/`; or the Kaggle CSV "
           "re-packaging `names.csv`, `anno_train.csv`, `anno_test.csv`, `car_data/car_data/{train,test}/`"),
    class_names="`class_names` of `cars_meta.mat` / `names.csv`, as published",
    split="8,144 / 8,041", folders=("stanford_cars", "stanford-cars"), reader=read_cars,
    coop=CoopSplit("split_zhou_StanfordCars.json", ""),
)
