"""Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist`); its PNGs are written on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fgvr.data import Dataset, Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import DatasetInfo, ReadOptions, Splits


def read_fashion_mnist(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    """Both splits from the IDX files (Debian: /usr/share/datasets/fashion-mnist); sample paths point into
    `options.cache_dir` and `Splits.prepare` writes the PNGs of the samples asked for."""
    from fgvr import fashion_mnist as fm

    cache_dir = options.cache_dir
    if cache_dir is None:
        raise ValueError("fashion-mnist needs a cache_dir: its images are written there as they are needed")
    under = [root / f for f in info.folders] if root is not None else []
    d = next((u for u in under if u.is_dir()), None) or fm.data_dir(root)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if not ((d / stem).is_file() or (d / f"{stem}.gz").is_file()):
            raise L.layout_error(info, f"{d / stem}(.gz) not found (install it with: {fm.INSTALL_HINT})")
    arrays = {s: fm.load_split(s, d) for s in ("train", "test")}
    where: dict[Path, tuple[str, int]] = {}
    split_samples: dict[str, list[Sample]] = {}
    for split, arr in arrays.items():
        out = []
        for i, lab in enumerate(arr.labels.tolist()):
            name = fm.CLASSES[lab]
            p = cache_dir / split / fm.folder_name(name) / f"{split}-{i:05d}.png"
            where[p] = (split, i)
            out.append(Sample(p, name))
        split_samples[split] = out

    def prepare(samples: Sequence[Sample]) -> None:
        for split, arr in arrays.items():
            idx = [where[s.path][1] for s in samples if s.path in where and where[s.path][0] == split]
            if idx:
                fm.export_image_folder(arr, idx, cache_dir / split, prefix=split)

    classes = list(fm.CLASSES)
    return Splits(name=info.name, root=d, train=Dataset(root=cache_dir, classes=sorted(classes), samples=split_samples["train"]),
                  test=Dataset(root=cache_dir, classes=sorted(classes), samples=split_samples["test"]),
                  note=info.split, _prepare=prepare)


DATASET = DatasetInfo(
    name="fashion-mnist", aliases=("fashion_mnist", "fmnist"), title="Fashion-MNIST", classes=10, order=40,
    page="https://github.com/zalandoresearch/fashion-mnist", archives="Debian package dataset-fashion-mnist",
    layout=("  <root>/ (default /usr/share/datasets/fashion-mnist, or $FGVR_FASHION_MNIST)\n"
            "    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  t10k-images-idx3-ubyte.gz  "
            "t10k-labels-idx1-ubyte.gz"),
    files="the four IDX files (default `/usr/share/datasets/fashion-mnist`)",
    class_names="the dataset's README (`T-shirt/top`, ...)", split="the IDX files: 60,000 / 10,000",
    folders=("fashion-mnist",), reader=read_fashion_mnist, needs_root=False,
)
