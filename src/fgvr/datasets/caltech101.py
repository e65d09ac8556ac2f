"""Caltech-101: one folder per category and no published split; CoOp's re-split is the one used."""

from __future__ import annotations

from pathlib import Path

from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def read_caltech101(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    return L.read_coop(info, root)


DATASET = DatasetInfo(
    name="caltech-101", aliases=("caltech101", "caltech"), title="Caltech-101", classes=100, order=21,
    page="https://data.caltech.edu/records/mzrjq-6wc02", archives="101_ObjectCategories.tar.gz, split_zhou_Caltech101.json",
    layout=("  caltech-101/\n    101_ObjectCategories/accordion/image_0001.jpg ...\n    split_zhou_Caltech101.json"),
    files="`101_ObjectCategories/<category>/...`, `split_zhou_Caltech101.json`",
    class_names="CoOp's (BACKGROUND_Google and Faces_easy left out), from the split file",
    split="none published (CoOp's: 4,128 / 2,465)", folders=("caltech-101", "caltech101"),
    reader=read_caltech101, official=False, coop=CoopSplit("split_zhou_Caltech101.json", "101_ObjectCategories"),
)
