"""Small replicas of the benchmark datasets' published layouts, written by the tests themselves.

Each builder writes a few classes with a few tiny images, in the same file formats as the real archive
(text lists, `.mat` files written with scipy.io.savemat in the real variables and struct fields, CSVs),
and returns the root a user would pass as `--root`. Every class has its own colour, so a benchmark on a
replica has something to learn. `REQUIRED[name]` lists, per layout, the paths (relative to that root) a
reader must insist on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

COLOURS = [(200, 30, 30), (30, 170, 40), (40, 60, 210), (210, 200, 40)]
TRAIN_PER_CLASS = 3
TEST_PER_CLASS = 2


def _image(path: Path, cls: int, i: int) -> None:
    rng = np.random.default_rng(1000 * cls + i)
    base = np.array(COLOURS[cls % len(COLOURS)], dtype=np.int16)
    a = np.clip(base + rng.integers(-25, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="JPEG", quality=95)


def _cells(strings: list[str], shape: str = "column") -> np.ndarray:
    """A MATLAB cell array of strings as savemat writes one: an object array of str."""
    arr = np.empty((len(strings), 1) if shape == "column" else (1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        arr.flat[i] = s
    return arr


def _structs(rows: list[dict], fields: list[str]) -> np.ndarray:
    """A 1xN MATLAB struct array (what the Cars annotation files hold)."""
    arr = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows):
        for f in fields:
            v = r[f]
            arr[0, i][f] = v if isinstance(v, str) else np.array([[v]], dtype=np.uint16 if f != "test" else np.uint8)
    return arr


def _split(n_classes: int):
    """(class index, image index within class, is_train) for every image."""
    for c in range(n_classes):
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            yield c, i, i < TRAIN_PER_CLASS


# ----------------------------------------------------------------------------------------------------------

CUB_FOLDERS = ["001.Black_footed_Albatross", "022.Chuck_will_Widow", "182.Yellow_Warbler"]
CUB_NAMES = ["Black-footed Albatross", "Chuck-will's-widow", "Yellow Warbler"]


def make_cub(tmp: Path) -> Path:
    root = tmp / "CUB_200_2011"
    root.mkdir(parents=True)
    images, labels, split = [], [], []
    for n, (c, i, train) in enumerate(_split(len(CUB_FOLDERS)), 1):
        rel = f"{CUB_FOLDERS[c]}/{CUB_FOLDERS[c].split('.', 1)[1]}_{i:04d}_{n}.jpg"
        _image(root / "images" / rel, c, i)
        images.append(f"{n} {rel}")
        labels.append(f"{n} {int(CUB_FOLDERS[c][:3])}")
        split.append(f"{n} {int(train)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("".join(f"{int(f[:3])} {f}\n" for f in CUB_FOLDERS))
    return tmp  # the folder above CUB_200_2011/: the reader finds it


DOGS_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu"]
DOGS_NAMES = ["Chihuahua", "Japanese spaniel", "Shih-Tzu"]


def make_dogs(tmp: Path) -> Path:
    root = tmp / "dogs"
    rows = {"train": [], "test": []}
    for c, i, train in _split(len(DOGS_FOLDERS)):
        wnid = DOGS_FOLDERS[c].split("-", 1)[0]
        rel = f"{DOGS_FOLDERS[c]}/{wnid}_{100 + i}.jpg"
        _image(root / "Images" / rel, c, i)
        rows["train" if train else "test"].append((rel, c + 1))
    (root / "lists").mkdir(parents=True)
    for split, r in rows.items():
        savemat(root / "lists" / f"{split}_list.mat", {
            "file_list": _cells([p for p, _ in r]),
            "annotation_list": _cells([p[:-4] for p, _ in r]),
            "labels": np.array([[c] for _, c in r], dtype=np.float64),
        })
    return root


CARS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
_BOX = {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 15, "bbox_y2": 15}


def make_cars_devkit(tmp: Path) -> Path:
    root = tmp / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cells(CARS_NAMES, "row")})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    rows = {"train": [], "test": []}
    for c, i, train in _split(len(CARS_NAMES)):
        split = "train" if train else "test"
        fname = f"{len(rows[split]) + 1:05d}.jpg"
        _image(root / f"cars_{split}" / fname, c, i)
        rows[split].append({**_BOX, "class": c + 1, "fname": fname})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _structs(rows["train"], fields)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _structs(rows["test"], fields)})
    return tmp  # the reader looks inside stanford_cars/ (torchvision's folder name)


def make_cars_annos(tmp: Path) -> Path:
    root = tmp / "cars_all"
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    for n, (c, i, train) in enumerate(_split(len(CARS_NAMES)), 1):
        rel = f"car_ims/{n:06d}.jpg"
        _image(root / rel, c, i)
        rows.append({**_BOX, "relative_im_path": rel, "class": c + 1, "test": int(not train)})
    savemat(root / "cars_annos.mat", {"annotations": _structs(rows, fields), "class_names": _cells(CARS_NAMES, "row")})
    return root


def make_cars_csv(tmp: Path) -> Path:
    root = tmp / "cars_csv"
    root.mkdir(parents=True)
    rows = {"train": [], "test": []}
    for c, i, train in _split(len(CARS_NAMES)):
        split = "train" if train else "test"
        fname = f"{len(rows[split]) + 1:05d}.jpg"
        folder = CARS_NAMES[c].replace("/", "-")  # the re-packaging's folder names lose the '/'
        _image(root / "car_data" / "car_data" / split / folder / fname, c, i)
        rows[split].append(f"{fname},1,1,15,15,{c + 1}")
    (root / "names.csv").write_text("\n".join(CARS_NAMES) + "\n")
    for split, r in rows.items():
        (root / f"anno_{split}.csv").write_text("\n".join(r) + "\n")
    return root


PETS_IDS = ["Abyssinian", "american_pit_bull_terrier", "British_Shorthair"]
PETS_NAMES = ["Abyssinian", "american pit bull terrier", "British Shorthair"]


def make_pets(tmp: Path) -> Path:
    root = tmp / "oxford-iiit-pet"
    (root / "annotations").mkdir(parents=True)
    rows = {"trainval": [], "test": []}
    for c, i, train in _split(len(PETS_IDS)):
        image_id = f"{PETS_IDS[c]}_{i + 1}"
        _image(root / "images" / f"{image_id}.jpg", c, i)
        species = 1 if PETS_IDS[c][0].isupper() else 2
        rows["trainval" if train else "test"].append(f"{image_id} {c + 1} {species} {c + 1}")
    for split, r in rows.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(r) + "\n")
    return tmp


AIRCRAFT_VARIANTS = ["707-320", "F/A-18", "Cessna 172"]


def make_aircraft(tmp: Path) -> Path:
    root = tmp / "fgvc-aircraft-2013b"
    data = root / "data"
    data.mkdir(parents=True)
    rows = {"trainval": [], "test": []}
    for n, (c, i, train) in enumerate(_split(len(AIRCRAFT_VARIANTS)), 1):
        image_id = f"{1000000 + n:07d}"
        _image(data / "images" / f"{image_id}.jpg", c, i)
        rows["trainval" if train else "test"].append(f"{image_id} {AIRCRAFT_VARIANTS[c]}")
    (data / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    for split, r in rows.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(r) + "\n")
    return root


FLOWERS_LABELS = [1, 12, 77]
FLOWERS_NAMES = ["pink primrose", "colt's foot", "passion flower"]


def make_flowers(tmp: Path) -> Path:
    root = tmp / "flowers"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for n, (c, i, train) in enumerate(_split(len(FLOWERS_LABELS)), 1):
        _image(root / "jpg" / f"image_{n:05d}.jpg", c, i)
        labels.append(FLOWERS_LABELS[c])
        ids["tstid" if not train else ("trnid" if i < 2 else "valid")].append(n)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


def make_fashion_mnist(tmp: Path) -> Path:
    from fgvr import fashion_mnist as fm

    root = tmp / "fashion"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        ims = []
        for c in labels:
            im = rng.integers(0, 40, (28, 28)).astype(np.uint8)
            im[2 + 2 * int(c): 5 + 2 * int(c), 4:24] = 230  # the class decides where a bright bar sits
            ims.append(im)
        fm.write_idx(root / f"{split}-images-idx3-ubyte.gz", np.stack(ims))
        fm.write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


# name -> (builder, readable class names, paths under the returned root a reader must insist on)
REPLICAS = {
    "cub-200-2011": (make_cub, CUB_NAMES, ["CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt",
                                           "CUB_200_2011/train_test_split.txt", "CUB_200_2011/classes.txt",
                                           "CUB_200_2011/images"]),
    "stanford-dogs": (make_dogs, DOGS_NAMES, ["lists/train_list.mat", "lists/test_list.mat", "Images"]),
    "stanford-cars": (make_cars_devkit, CARS_NAMES, ["stanford_cars/devkit/cars_meta.mat",
                                                     "stanford_cars/devkit/cars_train_annos.mat",
                                                     "stanford_cars/cars_test_annos_withlabels.mat",
                                                     "stanford_cars/cars_train", "stanford_cars/cars_test"]),
    "stanford-cars/annos": (make_cars_annos, CARS_NAMES, ["cars_annos.mat", "car_ims"]),
    "stanford-cars/csv": (make_cars_csv, CARS_NAMES, ["names.csv", "anno_train.csv", "anno_test.csv",
                                                      "car_data/car_data/train", "car_data/car_data/test"]),
    "oxford-pets": (make_pets, PETS_NAMES, ["oxford-iiit-pet/annotations/trainval.txt",
                                            "oxford-iiit-pet/annotations/test.txt", "oxford-iiit-pet/images"]),
    "fgvc-aircraft": (make_aircraft, AIRCRAFT_VARIANTS, ["data/images_variant_trainval.txt",
                                                         "data/images_variant_test.txt", "data/variants.txt",
                                                         "data/images"]),
    "flowers-102": (make_flowers, FLOWERS_NAMES, ["imagelabels.mat", "setid.mat", "jpg"]),
}
