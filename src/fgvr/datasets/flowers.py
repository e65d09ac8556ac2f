"""Oxford Flowers-102: `setid.mat` (trnid + valid / tstid) over `imagelabels.mat`; CLIP's names."""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


# Label 1..102 -> name: the list of CLIP's data/prompts.md (also CoOp's), in label order.
FLOWERS_102_CLASSES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy",
    "daffodil", "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink and yellow dahlia", "cautleya spicata",
    "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus",
    "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea", "camellia", "mallow",
    "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)


def read_flowers(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    base = L.locate(info, root, "imagelabels.mat")
    labels = L.mat_ints(L.loadmat(info, base / "imagelabels.mat", ("labels",))["labels"])
    setid = L.loadmat(info, base / "setid.mat", ("trnid", "valid", "tstid"))
    jpg = L.need(info, base / "jpg")
    bad = sorted({v for v in labels if not 1 <= v <= len(FLOWERS_102_CLASSES)})
    if bad:
        raise L.layout_error(info, f"imagelabels.mat: labels {bad[:5]} outside 1..{len(FLOWERS_102_CLASSES)}")

    def samples(ids) -> list[Sample]:
        out = []
        for i in L.mat_ints(ids):
            if not 1 <= i <= len(labels):
                raise L.layout_error(info, f"setid.mat: image id {i} outside 1..{len(labels)} (imagelabels.mat)")
            out.append(Sample(jpg / f"image_{i:05d}.jpg", FLOWERS_102_CLASSES[labels[i - 1] - 1]))
        return out

    train = samples(setid["trnid"]) + samples(setid["valid"])
    return L.make_splits(info, base, train, samples(setid["tstid"]), (FLOWERS_102_CLASSES[v - 1] for v in set(labels)),
                     "setid.mat trnid + valid", "setid.mat tstid")


DATASET = DatasetInfo(
    name="flowers-102", aliases=("flowers", "flowers102", "oxford-flowers-102", "oxford_flowers"),
    title="Oxford Flowers-102", classes=102, order=2, page="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    archives="102flowers.tgz, imagelabels.mat, setid.mat",
    layout=("  <root>/\n    imagelabels.mat  setid.mat\n    jpg/image_00001.jpg ...\n"
            "    split_zhou_OxfordFlowers.json   (for --split coop)"),
    files="`imagelabels.mat`, `setid.mat`, `jpg/image_00001.jpg ...`",
    class_names="CLIP's and CoOp's list, in label order (the files give numbers only)",
    split="`trnid` + `valid` / `tstid`: 2,040 / 6,149", folders=("flowers-102", "flowers102", "oxford_flowers"),
    reader=read_flowers, coop=CoopSplit("split_zhou_OxfordFlowers.json", "jpg"),
)
