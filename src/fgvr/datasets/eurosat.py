"""EuroSAT (RGB): one folder per land-use class and no published split; CoOp's re-split is the one used."""

from __future__ import annotations

from pathlib import Path

from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def read_eurosat(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    return L.read_coop(info, root)


DATASET = DatasetInfo(
    name="eurosat", title="EuroSAT", classes=10, order=20, page="https://github.com/phelber/EuroSAT",
    archives="EuroSAT.zip (RGB), split_zhou_EuroSAT.json from CoOp's DATASETS.md",
    layout="  eurosat/\n    2750/AnnualCrop/AnnualCrop_1.jpg ...\n    split_zhou_EuroSAT.json",
    files="`2750/<class>/...`, `split_zhou_EuroSAT.json`",
    class_names="CoOp's (`Annual Crop Land`), from the split file", split="none published (CoOp's: 13,500 / 8,100)",
    folders=("eurosat", "EuroSAT"), reader=read_eurosat, official=False,
    coop=CoopSplit("split_zhou_EuroSAT.json", "2750"),
)
