"""FGVC-Aircraft: `data/images_variant_{trainval,test}.txt` at the variant level (100 classes)."""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import DatasetInfo, ReadOptions, Splits


def read_aircraft(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    try:
        top = L.locate(info, root, "data/images_variant_trainval.txt", info.folders[:1])
        data = top / "data"
    except L.DatasetLayoutError:  # CoOp's layout: the archive's data/ folder alone, renamed fgvc_aircraft/
        try:
            top = data = L.locate(info, root, "images_variant_trainval.txt", info.folders[1:])
        except L.DatasetLayoutError:
            raise L.layout_error(info, f"{Path(root or '.') / 'data/images_variant_trainval.txt'} not found") from None
    L.need(info, data / "images")
    variants = [line.strip() for line in L.need(info, data / "variants.txt").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    known = set(variants)
    splits = {}
    for split in ("trainval", "test"):
        samples = []
        for image_id, variant in L.read_lines(info, data / f"images_variant_{split}.txt", 2):
            if variant not in known:
                raise L.layout_error(info, f"images_variant_{split}.txt: variant {variant!r} of image "
                                               f"{image_id} is not in variants.txt")
            samples.append(Sample(data / "images" / f"{image_id}.jpg", variant))
        splits[split] = samples
    return L.make_splits(info, top, splits["trainval"], splits["test"], variants, "data/images_variant_trainval.txt",
                     "data/images_variant_test.txt")


DATASET = DatasetInfo(
    name="fgvc-aircraft", aliases=("aircraft", "fgvc_aircraft", "fgvc-aircraft-2013b"), title="FGVC-Aircraft",
    classes=100, order=6, page="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
    archives="fgvc-aircraft-2013b.tar.gz",
    layout=("  fgvc-aircraft-2013b/\n    data/variants.txt  data/images_variant_trainval.txt  "
            "data/images_variant_test.txt\n    data/images/0034309.jpg ...\n"
            "  (or CoOp's fgvc_aircraft/: the data/ folder alone)"),
    files="`data/variants.txt`, `data/images_variant_trainval.txt`, `data/images_variant_test.txt`, `data/images/`",
    class_names="`variants.txt`, as published (CLIP's list)",
    split="variant level: 6,667 / 3,333 (CoOp uses this split too)",
    folders=("fgvc-aircraft-2013b", "fgvc_aircraft"), reader=read_aircraft,
)
