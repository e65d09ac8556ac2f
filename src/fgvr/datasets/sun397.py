"""SUN397: `ClassName.txt` and the partitions `Training_<NN>.txt` / `Testing_<NN>.txt` (50 / 50 per class)."""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def sun_class_name(path: str) -> str:
    """`/b/bakery/shop` -> `shop bakery`, `/a/apartment_building/outdoor` -> `outdoor apartment building`:
    the letter folder dropped, the parts reversed and `_` as a space, as CoOp names them."""
    parts = path.strip().strip("/").split("/")[1:]
    return " ".join(parts[::-1]).replace("_", " ")


def _find(info: DatasetInfo, root: Path | None, fold: int) -> tuple[Path, Path]:
    """(the folder of the partition lists, the image folder holding a/abbey/...)."""
    marker = f"Training_{fold:02d}.txt"
    folders = (*info.folders, "Partitions", *(f"{f}/Partitions" for f in info.folders))
    lists = L.locate(info, root, marker, folders)
    for images in (lists / "SUN397", lists, lists.parent / "SUN397", lists.parent):
        if (images / "ClassName.txt").is_file() or (images / "a").is_dir():
            return lists, images
    raise L.layout_error(info, f"{lists / 'SUN397'} not found (the image archive SUN397.tar.gz unpacks to it)")


def read_sun397(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    fold = L.fold_number(info, options)
    lists, images = _find(info, root, fold)
    class_file = L.first(lists, "ClassName.txt") or L.need(info, images / "ClassName.txt")
    names = {c: sun_class_name(c) for c in L.read_names(info, class_file)}
    L.unique_names(info, names, "ClassName.txt")
    parts = {}
    for part, file in (("train", f"Training_{fold:02d}.txt"), ("test", f"Testing_{fold:02d}.txt")):
        samples = []
        for n, rel in enumerate(L.read_names(info, lists / file), 1):
            cls = "/" + rel.strip("/").rsplit("/", 1)[0]
            if cls not in names:
                raise L.layout_error(info, f"{file}, line {n}: class {cls!r} is not in ClassName.txt")
            samples.append(Sample(images / rel.strip("/"), names[cls]))
        parts[part] = samples
    return L.make_splits(info, lists, parts["train"], parts["test"], names.values(), f"Training_{fold:02d}.txt",
                         f"Testing_{fold:02d}.txt", split=f"official, fold {fold}")


DATASET = DatasetInfo(
    name="sun397", aliases=("sun", "sun-397"), title="SUN397", classes=397, order=11,
    page="https://vision.princeton.edu/projects/2010/SUN/", archives="SUN397.tar.gz, Partitions.zip",
    layout=("  sun397/   (CoOp's folder; or the folder holding both)\n"
            "    ClassName.txt  Training_01.txt  Testing_01.txt  ... (folds 01-10, from Partitions.zip)\n"
            "    SUN397/a/abbey/sun_aaalbzqrimafwbiv.jpg ...\n    split_zhou_SUN397.json   (for --split coop)"),
    files="`ClassName.txt`, `Training_<NN>.txt`, `Testing_<NN>.txt` (`--fold N`, 1-10), `SUN397/a/abbey/...`",
    class_names="`ClassName.txt`, the parts reversed as CoOp does (`/b/bakery/shop` -> `shop bakery`)",
    split="`Training_01.txt` / `Testing_01.txt`: 19,850 / 19,850 per fold", folders=("sun397", "SUN397"),
    reader=read_sun397, coop=CoopSplit("split_zhou_SUN397.json", "SUN397"), folds=10,
)
