"""Birdsnap v1.1: `images.txt` and `species.txt` (tab-separated, a header line each), `test_images.txt`.

The archive holds lists only; its `get_birdsnap.py` downloads the images from Flickr, and many of the
URLs are dead, so a partial download is the norm. This reader reads what is on disk and counts what is
not: `Splits.test_missing` (of `test_listed`) goes into every table, so a smaller test set is never silent.
A test image that `images.txt` does not know, or a download with no test image at all, is an error.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from fgvr.data import Dataset, Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import DatasetInfo, ReadOptions, Splits

log = logging.getLogger(__name__)


def _table(info: DatasetInfo, path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """A tab-separated file whose first line names its fields; `columns` must be among them."""
    rows = list(csv.DictReader(L.need(info, path).read_text(encoding="utf-8-sig").splitlines(), delimiter="\t"))
    have = set(rows[0]) if rows else set()
    if not rows or not set(columns) <= have:
        raise L.layout_error(info, f"{path}: expected a tab-separated header with {', '.join(columns)} "
                                   f"(found {sorted(have) or 'no rows'})")
    return rows


def read_birdsnap(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    base = L.locate(info, root, "images.txt")
    species = {r["id"].strip(): r["common"].strip() for r in _table(info, base / "species.txt", ("id", "common"))}
    L.unique_names(info, species, "species.txt")
    test_list = [line.strip() for line in L.read_names(info, base / "test_images.txt")]
    if test_list and test_list[0] == "path":  # the header line
        test_list = test_list[1:]
    images = L.first(base, "images", "download/images")
    if images is None:
        raise L.layout_error(info, f"{base / 'images'} not found (get_birdsnap.py downloads the images there, "
                                   "or into download/images/)")
    labelled: dict[str, str] = {}
    for r in _table(info, base / "images.txt", ("path", "species_id")):
        sid = r["species_id"].strip()
        if sid not in species:
            raise L.layout_error(info, f"images.txt: {r['path']} has species_id {sid}, which species.txt does not list")
        labelled[r["path"].strip()] = species[sid]
    unknown = [p for p in test_list if p not in labelled]
    if unknown:
        raise L.layout_error(info, f"test_images.txt names {len(unknown)} image(s) images.txt does not list "
                                   f"(e.g. {unknown[0]})")
    test_set = set(test_list)
    train_all = [Sample(images / p, labelled[p]) for p in labelled if p not in test_set]
    test_all = [Sample(images / p, labelled[p]) for p in test_list]
    train = [s for s in train_all if s.path.is_file()]
    test = [s for s in test_all if s.path.is_file()]
    if not test:
        raise L.layout_error(info, f"none of the {len(test_all)} images of test_images.txt is under {images}")
    if not train:
        raise L.layout_error(info, f"none of the {len(train_all)} train images of images.txt is under {images}")
    classes = sorted(set(species.values()))
    s = Splits(name=info.name, root=base, train=Dataset(root=images, classes=classes, samples=train),
               test=Dataset(root=images, classes=classes, samples=test), split="official",
               test_listed=len(test_all), test_missing=len(test_all) - len(test),
               train_missing=len(train_all) - len(train))
    s.note = (f"train: images.txt less test_images.txt, {len(train):,} of {len(train_all):,} on disk; test: "
              f"test_images.txt, {len(test):,} of {len(test_all):,} on disk ({s.test_missing:,} missing)")
    if s.test_missing or s.train_missing:
        log.warning("Birdsnap: %d of %d test images and %d of %d train images are not on disk (dead URLs); "
                    "the tables report it", s.test_missing, len(test_all), s.train_missing, len(train_all))
    return s


DATASET = DatasetInfo(
    name="birdsnap", title="Birdsnap", classes=500, order=7, page="https://thomasberg.org/",
    archives="birdsnap.tgz v1.1, images fetched by its get_birdsnap.py",
    layout=("  birdsnap/\n    species.txt  images.txt  test_images.txt  (tab-separated, header lines)\n"
            "    images/Acadian_Flycatcher/182633.jpg ...   (or download/images/, where get_birdsnap.py puts them)\n"
            "  a partial download is read: the missing test images are counted in every table"),
    files="`species.txt`, `images.txt`, `test_images.txt`, `images/` (or `download/images/`); partial downloads are read and counted",
    class_names="the `common` names of `species.txt` (`Acadian Flycatcher`)",
    split="`test_images.txt`: 2,443 test, the rest of `images.txt` (49,829 listed) train",
    folders=("birdsnap",), reader=read_birdsnap,
)
