"""Oxford-IIIT Pets: `annotations/trainval.txt` and `annotations/test.txt`; names from the image names."""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def pets_class_name(image_id: str) -> str:
    """`american_pit_bull_terrier_12` -> `american pit bull terrier` (CLIP's spelling)."""
    return image_id.rsplit("_", 1)[0].replace("_", " ")


def read_pets(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    base = L.locate(info, root, "annotations/trainval.txt")
    images = L.need(info, base / "images")
    names: dict[str, str] = {}
    splits = {}
    for split in ("trainval", "test"):
        samples = []
        for image_id, class_id, _species, _breed in L.read_lines(info, base / "annotations" / f"{split}.txt", 4):
            name = pets_class_name(image_id)
            if names.setdefault(class_id, name) != name:
                raise L.layout_error(info, f"annotations/{split}.txt: class id {class_id} is given to "
                                                f"{names[class_id]!r} and {name!r}")
            samples.append(Sample(images / f"{image_id}.jpg", name))
        splits[split] = samples
    L.unique_names(info, names, "annotations/trainval.txt")
    return L.make_splits(info, base, splits["trainval"], splits["test"], names.values(), "annotations/trainval.txt",
                     "annotations/test.txt")


DATASET = DatasetInfo(
    name="oxford-pets", aliases=("pets", "oxford-iiit-pet", "oxford_pets"), title="Oxford-IIIT Pets", classes=37,
    order=5, page="https://www.robots.ox.ac.uk/~vgg/data/pets/", archives="images.tar.gz, annotations.tar.gz",
    layout=("  <root>/\n    annotations/trainval.txt  annotations/test.txt\n    images/Abyssinian_1.jpg ...\n"
            "    split_zhou_OxfordPets.json   (for --split coop)"),
    files="`annotations/trainval.txt`, `annotations/test.txt`, `images/`",
    class_names="the breed in the image name, `_` as a space (CLIP's list)",
    split="`trainval.txt` / `test.txt`: 3,680 / 3,669", folders=("oxford-iiit-pet", "oxford_pets"),
    reader=read_pets, coop=CoopSplit("split_zhou_OxfordPets.json", "images"),
)
