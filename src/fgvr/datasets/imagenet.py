"""ImageNet-1k (ILSVRC-2012): the train folder of synsets and the 50,000 validation images as the test split.

The layouts users have, all read:

* torchvision's `ImageNet` (and CoOp's `imagenet/images/`): `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`;
* the raw archives: `train/<wnid>/`, a flat `val/ILSVRC2012_val_00000001.JPEG ...` and the devkit's
  `ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt` (+ `meta.mat` for the ids);
* Kaggle's ILSVRC release: `ILSVRC/Data/CLS-LOC/{train,val}/`, `LOC_val_solution.csv`, `LOC_synset_mapping.txt`.

Readable names, first found: CoOp's `classnames.txt` (CLIP's curated names, `n01440764 tench`), then
`LOC_synset_mapping.txt`, then the devkit's `meta.mat`; from the last two the first synonym, with the
second added where two synsets share a first word (`crane (bird)`... `crane`, `crane, derrick`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import DatasetInfo, ReadOptions, Splits

_IMAGES = ("", "images", "ILSVRC/Data/CLS-LOC")
_DEVKIT = "ILSVRC2012_devkit_t12/data"


def _find(info: DatasetInfo, root: Path | None) -> tuple[Path, Path]:
    """(the dataset's top folder, the folder holding train/ and val/)."""
    base = L.locate(info, root, "", ())
    for top in (base, *(base / f for f in info.folders)):
        for sub in _IMAGES:
            if (top / sub / "train").is_dir():
                return top, top / sub
    raise L.layout_error(info, f"{base / 'train'} not found (nor images/train, ILSVRC/Data/CLS-LOC/train)")


def _devkit_synsets(info: DatasetInfo, top: Path) -> dict[int, tuple[str, str]]:
    """meta.mat's leaf synsets: ILSVRC2012_ID -> (wnid, words)."""
    mat = L.loadmat(info, top / _DEVKIT / "meta.mat", ("synsets",))
    rec = mat["synsets"].ravel()
    out = {}
    for r in rec:
        if L.mat_ints(r["num_children"])[0] == 0:
            out[L.mat_ints(r["ILSVRC2012_ID"])[0]] = (L.mat_strings([r["WNID"]])[0], L.mat_strings([r["words"]])[0])
    return out


def _synonyms_to_names(words: dict[str, str]) -> dict[str, str]:
    """wnid -> its first synonym; where two share it, `first (second)` (or the wnid, lacking a second)."""
    firsts = {w: s.split(",")[0].strip() for w, s in words.items()}
    count: dict[str, int] = {}
    for f in firsts.values():
        count[f] = count.get(f, 0) + 1
    out = {}
    for w, f in firsts.items():
        rest = [x.strip() for x in words[w].split(",")[1:] if x.strip()]
        out[w] = f if count[f] == 1 else f"{f} ({rest[0] if rest else w})"
    return out


def _class_names(info: DatasetInfo, top: Path) -> tuple[dict[str, str], str]:
    cn = L.first(top, "classnames.txt", "../classnames.txt")
    if cn is not None:  # CoOp's: `n01440764 tench`
        return {w: n for w, n in L.read_lines(info, cn, 2)}, "classnames.txt"
    loc = L.first(top, "LOC_synset_mapping.txt")
    if loc is not None:
        return _synonyms_to_names({w: s for w, s in L.read_lines(info, loc, 2)}), "LOC_synset_mapping.txt"
    if (top / _DEVKIT / "meta.mat").is_file():
        return _synonyms_to_names(dict(_devkit_synsets(info, top).values())), f"{_DEVKIT}/meta.mat"
    raise L.layout_error(info, f"no class names: none of {top / 'classnames.txt'} (CoOp's), "
                               f"{top / 'LOC_synset_mapping.txt'} or {top / _DEVKIT / 'meta.mat'} found")


def _val_labels(info: DatasetInfo, top: Path, val: Path) -> tuple[list[tuple[Path, str]], str]:
    """(image, wnid) of every validation image, and where the labels came from."""
    folders = sorted(e.name for e in os.scandir(val) if e.is_dir())
    if folders:
        return [(val / w / f, w) for w in folders for f in sorted(os.listdir(val / w)) if not f.startswith(".")], "val/<wnid>/"
    sol = L.first(top, "LOC_val_solution.csv")
    if sol is not None:
        rows = list(csv.reader(sol.read_text(encoding="utf-8-sig").splitlines()))[1:]
        return sorted((val / f"{r[0]}.JPEG", r[1].split()[0]) for r in rows if len(r) == 2 and r[1].strip()), sol.name
    truth = top / _DEVKIT / "ILSVRC2012_validation_ground_truth.txt"
    if truth.is_file():
        ids = _devkit_synsets(info, top)
        out = []
        for n, line in enumerate(L.read_names(info, truth), 1):
            if int(line) not in ids:
                raise L.layout_error(info, f"{truth}, line {n}: ILSVRC2012_ID {line} is not a leaf synset of meta.mat")
            out.append((val / f"ILSVRC2012_val_{n:08d}.JPEG", ids[int(line)][0]))
        return out, truth.name
    raise L.layout_error(info, f"{val} holds no synset folders, and neither {top / 'LOC_val_solution.csv'} nor "
                               f"{truth} gives the labels of its images")


def read_imagenet(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    top, images = _find(info, root)
    val = L.need(info, images / "val")
    names, names_from = _class_names(info, top)
    wnids = sorted(e.name for e in os.scandir(images / "train") if e.is_dir())
    if not wnids:
        raise L.layout_error(info, f"{images / 'train'} holds no synset folders (n01440764/ ...)")
    lacking = [w for w in wnids if w not in names]
    if lacking:
        raise L.layout_error(info, f"{names_from} names no class for {len(lacking)} train folder(s) (e.g. {lacking[0]})")
    L.unique_names(info, {w: names[w] for w in wnids}, names_from)
    train = [Sample(images / "train" / w / f, names[w]) for w in wnids
             for f in sorted(os.listdir(images / "train" / w)) if not f.startswith(".")]
    known = set(wnids)
    labelled, labels_from = _val_labels(info, top, val)
    stray = [w for _, w in labelled if w not in known]
    if stray:
        raise L.layout_error(info, f"{labels_from} gives validation images the synset {stray[0]}, which train/ lacks")
    test = [Sample(p, names[w]) for p, w in labelled]
    s = L.make_splits(info, top, train, test, (names[w] for w in wnids), "train/<wnid>/",
                      f"val/ ({labels_from})")
    s.note += f"; class names from {names_from}"
    return s


DATASET = DatasetInfo(
    name="imagenet-1k", aliases=("imagenet", "ilsvrc2012", "ilsvrc-2012", "in1k"), title="ImageNet-1k", classes=1000,
    order=10, page="https://image-net.org/challenges/LSVRC/2012/",
    archives="ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz",
    layout=("  imagenet/\n    train/n01440764/n01440764_10026.JPEG ...\n"
            "    val/n01440764/ILSVRC2012_val_00000293.JPEG ...  (torchvision's ImageNet, CoOp's images/)\n"
            "      or val/ILSVRC2012_val_00000001.JPEG ... with ILSVRC2012_devkit_t12/data/"
            "ILSVRC2012_validation_ground_truth.txt + meta.mat,\n"
            "      or Kaggle's ILSVRC/Data/CLS-LOC/{train,val}/ with LOC_val_solution.csv\n"
            "    class names: classnames.txt (CoOp's, CLIP's names) or LOC_synset_mapping.txt or the devkit's meta.mat"),
    files=("`train/<wnid>/`, `val/<wnid>/` (torchvision's) or a flat `val/` with the devkit's ground truth or "
           "`LOC_val_solution.csv`; names from `classnames.txt`, `LOC_synset_mapping.txt` or `meta.mat`"),
    class_names="CoOp's `classnames.txt` (CLIP's), else the first WordNet synonym, disambiguated",
    split="train folders / the validation images: 1,281,167 / 50,000 (CoOp uses this split too)",
    folders=("imagenet", "ILSVRC2012", "imagenet-1k"), reader=read_imagenet,
)
