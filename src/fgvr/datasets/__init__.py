"""The field's benchmark datasets by name, read from the layout each one is published in.

    splits = load_splits("cub-200-2011", "/data/CUB_200_2011")
    splits.train, splits.test            # fgvr `Dataset`s: the official train and test splits
    load_splits("oxford-pets", "/data", split="coop")   # CoOp's split_zhou_OxfordPets.json instead

Nothing is downloaded: the user fetches a dataset from its official page and points `root` at the folder
the archive unpacks to (or the folder above it: one root may hold several datasets, each under its usual
folder name). Each module of this package declares one dataset (`DATASET = DatasetInfo(...)`, see
`_layout`): its page, layout, class names, splits and reader. They are found by listing the package, so
adding a dataset is one new file, and `fgvr bench --list`, the CLI's help and the README's table are made
from the declarations (`describe_datasets`, `readme_table`).

Splits: `official` is the publisher's (its lists, its folds); `coop` is CoOp's re-split file
(`split_zhou_<Name>.json`, which CoOp, Tip-Adapter, TDA and their successors use), for the datasets CoOp
published one for. A dataset without one of the two is a clear error for that split.

A root that lacks a file raises `DatasetLayoutError` naming that file and showing the expected layout; a
list that names images which are not on disk raises it too (with a count and examples), since a partly
extracted archive would otherwise quietly change the test set. Birdsnap alone is read partially (its
images come from Flickr URLs, many dead): what is missing is counted in `Splits.test_missing` and every
table reports it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path

from fgvr.data import DataError
from fgvr.datasets._layout import SPLITS, DatasetInfo, DatasetLayoutError, ReadOptions, Splits, read_coop

__all__ = ["SPLITS", "DatasetInfo", "DatasetLayoutError", "ReadOptions", "Splits", "all_datasets", "dataset_info",
           "describe_datasets", "load_splits", "readme_table"]


@functools.cache
def all_datasets() -> tuple[DatasetInfo, ...]:
    """Every dataset declared by a module of this package, in listing order."""
    found = []
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_"):
            continue
        declared = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "DATASET", None)
        if declared is not None:
            found.append(declared)
    names = [d.name for d in found]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RuntimeError(f"datasets declared twice: {sorted(dupes)}")
    return tuple(sorted(found, key=lambda d: (d.order, d.name)))


def dataset_info(name: str) -> DatasetInfo:
    """The dataset called `name` or one of its aliases (case and `_`/`-` do not matter)."""
    for info in all_datasets():
        if info.matches(name):
            return info
    raise DataError(f"unknown dataset {name!r}: fgvr reads {', '.join(d.name for d in all_datasets())} "
                    "(see `fgvr bench --list`)")


def load_splits(name: str, root: str | Path | None = None, *, split: str = "official", fold: int | None = None,
                cache_dir: str | Path | None = None) -> Splits:
    """The train and test splits of the dataset `name`, read from `root` (see the module docstring)."""
    info = dataset_info(name)
    root = Path(root) if root is not None else None
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if fold is not None and (split != "official" or not info.folds):
        raise DataError(f"{info.title}: --fold applies only to the official split of datasets published in folds "
                        f"({', '.join(d.name for d in all_datasets() if d.folds)})")
    if split == "coop":
        if info.coop is None:
            raise DataError(f"{info.title} has no CoOp split file (CoOp published split_zhou files for "
                            f"{', '.join(d.name for d in all_datasets() if d.coop)}); use --split official")
        return read_coop(info, root)
    if not info.official:
        raise DataError(f"{info.title} publishes no train/test split: use --split coop with "
                        f"{info.coop.file if info.coop else 'a re-split'} in its folder")
    return info.reader(info, root, ReadOptions(split=split, fold=fold,
                                               cache_dir=Path(cache_dir) if cache_dir is not None else None))


def _splits_word(info: DatasetInfo) -> str:
    words = (["official" + (f" (folds 1-{info.folds})" if info.folds else "")] if info.official else [])
    return ", ".join(words + ([f"coop (`{info.coop.file}`)"] if info.coop else []))


def describe_datasets() -> str:
    """What `fgvr bench --list` prints: name, classes, splits, page, class names and the layout."""
    lines = []
    for i in all_datasets():
        lines += [f"{i.name}  ({i.title}, {i.classes} classes; also: {', '.join(i.aliases) or '-'})",
                  f"  published: {i.published}", f"  split: {i.split}",
                  f"  --split: {_splits_word(i).replace('`', '')}", f"  class names: {i.class_names}", i.layout, ""]
    return "\n".join(lines).rstrip()


README_BEGIN = "<!-- dataset table: generated by scripts/dataset_table.py from src/fgvr/datasets/ -->"
README_END = "<!-- end of dataset table -->"


def readme_table() -> str:
    """The README's dataset table (between README_BEGIN and README_END), one row per declaration."""
    rows = [README_BEGIN, "",
            "| name | dataset, page (archives) | layout under `--root` | official split (train / test) | `--split` | class names |",
            "| --- | --- | --- | --- | --- | --- |"]
    for i in all_datasets():
        cell = [f"`{i.name}`", f"{i.title}, {i.classes} classes: {i.page} ({i.archives})", i.files,
                i.split if i.official else "none published", _splits_word(i), i.class_names]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cell) + " |")
    return "\n".join(rows + ["", README_END])


def bench_help() -> str:
    """The dataset names, for the CLI's help."""
    return ", ".join(d.name for d in all_datasets())
