"""CUB-200-2011: `train_test_split.txt` over `images.txt`; names from the folder names of `classes.txt`."""

from __future__ import annotations

import re
from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import DatasetInfo, ReadOptions, Splits


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


def read_cub(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    base = L.locate(info, root, "images.txt")
    classes = {cid: cub_class_name(folder) for cid, folder in L.read_lines(info, base / "classes.txt", 2)}
    L.unique_names(info, classes, "classes.txt")
    images = dict(L.read_lines(info, base / "images.txt", 2))
    labels = dict(L.read_lines(info, base / "image_class_labels.txt", 2))
    is_train = dict(L.read_lines(info, base / "train_test_split.txt", 2))
    train, test = [], []
    image_dir = L.need(info, base / "images")
    for iid, rel in images.items():
        for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if iid not in table:
                raise L.layout_error(info, f"image {iid} of images.txt is missing from {fname}")
        if is_train[iid] not in ("0", "1"):
            raise L.layout_error(info, f"train_test_split.txt: image {iid} has is_training_image "
                                      f"{is_train[iid]!r}, expected 1 or 0")
        if labels[iid] not in classes:
            raise L.layout_error(info, f"image_class_labels.txt gives image {iid} class {labels[iid]}, "
                                            "which classes.txt does not list")
        (train if is_train[iid] == "1" else test).append(Sample(image_dir / rel, classes[labels[iid]]))
    return L.make_splits(info, base, train, test, classes.values(), "train_test_split.txt (is_training_image=1)",
                     "train_test_split.txt (is_training_image=0)")


DATASET = DatasetInfo(
    name="cub-200-2011", aliases=("cub", "cub200", "cub-200"), title="CUB-200-2011", classes=200, order=3,
    page="https://www.vision.caltech.edu/datasets/cub_200_2011/", archives="CUB_200_2011.tgz",
    layout=("  CUB_200_2011/\n    images.txt  image_class_labels.txt  train_test_split.txt  classes.txt\n"
            "    images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ..."),
    files="`CUB_200_2011/` with `images.txt`, `image_class_labels.txt`, `train_test_split.txt`, `classes.txt`, `images/`",
    class_names="the folder names of `classes.txt`, hyphens restored (`Black-footed Albatross`)",
    split="`train_test_split.txt`: 5,994 / 5,794", folders=("CUB_200_2011",), reader=read_cub,
)
