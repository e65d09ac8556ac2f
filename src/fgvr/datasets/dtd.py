"""DTD: `labels/train<N>.txt` + `labels/val<N>.txt` / `labels/test<N>.txt` for one of its ten folds."""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def read_dtd(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    """Train is train<N> + val<N> (40 + 40 per class: 16 shots must fit, as the few-shot papers draw them),
    test is test<N> (40 per class); the names are the image folders (`banded`)."""
    fold = L.fold_number(info, options)
    base = L.locate(info, root, "labels")
    images = L.need(info, base / "images")
    parts = {}
    for part in ("train", "val", "test"):
        samples = []
        for rel in L.read_names(info, base / "labels" / f"{part}{fold}.txt"):
            samples.append(Sample(images / rel, rel.split("/", 1)[0].replace("_", " ")))
        parts[part] = samples
    return L.make_splits(info, base, parts["train"] + parts["val"], parts["test"],
                         {s.label for s in parts["train"] + parts["val"] + parts["test"]},
                         f"labels/train{fold}.txt + val{fold}.txt", f"labels/test{fold}.txt",
                         split=f"official, fold {fold}")


DATASET = DatasetInfo(
    name="dtd", aliases=("describable-textures", "describabletextures"), title="DTD (Describable Textures)",
    classes=47, order=9, page="https://www.robots.ox.ac.uk/~vgg/data/dtd/", archives="dtd-r1.0.1.tar.gz",
    layout=("  dtd/\n    images/banded/banded_0002.jpg ...\n"
            "    labels/train1.txt  labels/val1.txt  labels/test1.txt  ... (folds 1-10)\n"
            "    split_zhou_DescribableTextures.json   (for --split coop)"),
    files="`images/`, `labels/train<N>.txt`, `labels/val<N>.txt`, `labels/test<N>.txt` (`--fold N`, 1-10)",
    class_names="the image folders (`banded`)",
    split="`train<N>` + `val<N>` / `test<N>`: 3,760 / 1,880 per fold", folders=("dtd",), reader=read_dtd,
    coop=CoopSplit("split_zhou_DescribableTextures.json", "images"), folds=10,
)
