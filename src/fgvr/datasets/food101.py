"""Food-101: `meta/train.txt` and `meta/test.txt` (750 / 250 images per class) over `meta/classes.txt`."""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def read_food101(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    base = L.locate(info, root, "meta/classes.txt")
    folders = L.read_names(info, base / "meta" / "classes.txt")
    names = {f: f.replace("_", " ") for f in folders}  # `apple_pie` -> `apple pie` (CoOp's and CLIP's)
    L.unique_names(info, names, "meta/classes.txt")
    images = L.need(info, base / "images")
    splits = {}
    for split in ("train", "test"):
        samples = []
        for n, rel in enumerate(L.read_names(info, base / "meta" / f"{split}.txt"), 1):
            folder = rel.split("/", 1)[0]
            if folder not in names:
                raise L.layout_error(info, f"meta/{split}.txt, line {n}: class {folder!r} is not in meta/classes.txt")
            samples.append(Sample(images / f"{rel}.jpg", names[folder]))
        splits[split] = samples
    return L.make_splits(info, base, splits["train"], splits["test"], names.values(), "meta/train.txt", "meta/test.txt")


DATASET = DatasetInfo(
    name="food-101", aliases=("food101", "food"), title="Food-101", classes=101, order=8,
    page="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", archives="food-101.tar.gz",
    layout=("  food-101/\n    meta/classes.txt  meta/train.txt  meta/test.txt\n"
            "    images/apple_pie/1005649.jpg ...\n    split_zhou_Food101.json   (for --split coop)"),
    files="`meta/classes.txt`, `meta/train.txt`, `meta/test.txt`, `images/`",
    class_names="`meta/classes.txt`, `_` as a space (`apple pie`)",
    split="`meta/train.txt` / `meta/test.txt`: 75,750 / 25,250", folders=("food-101",), reader=read_food101,
    coop=CoopSplit("split_zhou_Food101.json", "images"),
)
