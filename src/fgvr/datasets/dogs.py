"""Stanford Dogs: `lists/train_list.mat` and `lists/test_list.mat`; names from the WordNet folder names."""

from __future__ import annotations

import re
from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import DatasetInfo, ReadOptions, Splits


def dogs_class_name(folder: str) -> str:
    """`n02085782-Japanese_spaniel` -> `Japanese spaniel`."""
    return folder.split("-", 1)[1].replace("_", " ") if re.match(r"^n\d+-", folder) else folder.replace("_", " ")


def read_dogs(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    base = L.locate(info, root, "Images")
    images = base / "Images"
    # lists.tar unpacks without a folder of its own: accept the .mat files in lists/ or in the root
    lists = base if (base / "train_list.mat").exists() and not (base / "lists").is_dir() else base / "lists"
    splits, names = {}, {}
    for split in ("train", "test"):
        mat = L.loadmat(info, lists / f"{split}_list.mat", ("file_list", "labels"))
        files, labels = L.mat_strings(mat["file_list"]), L.mat_ints(mat["labels"])
        if len(files) != len(labels):
            raise L.layout_error(info, f"{split}_list.mat: {len(files)} files but {len(labels)} labels")
        samples = []
        for rel, lab in zip(files, labels):
            folder = rel.replace("\\", "/").split("/", 1)[0]
            name = dogs_class_name(folder)
            if names.setdefault(lab, name) != name:
                raise L.layout_error(info, f"{split}_list.mat: label {lab} is given to folders of "
                                                 f"{names[lab]!r} and {name!r}")
            samples.append(Sample(images / rel, name))
        splits[split] = samples
    L.unique_names(info, names, "train_list.mat/test_list.mat")
    return L.make_splits(info, base, splits["train"], splits["test"], names.values(), "train_list.mat",
                     "test_list.mat")


DATASET = DatasetInfo(
    name="stanford-dogs", aliases=("dogs", "stanford_dogs"), title="Stanford Dogs", classes=120, order=1,
    page="http://vision.stanford.edu/aditya86/ImageNetDogs/", archives="images.tar, lists.tar",
    layout=("  <root>/\n    Images/n02085620-Chihuahua/n02085620_10074.jpg ...\n"
            "    lists/train_list.mat  lists/test_list.mat   (or directly in <root>/, as lists.tar unpacks)"),
    files="`Images/n02085620-Chihuahua/...`, `lists/train_list.mat`, `lists/test_list.mat` (or the two `.mat` in the root)",
    class_names="the folder names without the WordNet id (`Japanese spaniel`)",
    split="`train_list.mat` / `test_list.mat`: 12,000 / 8,580", folders=("stanford_dogs", "stanford-dogs"),
    reader=read_dogs,
)
