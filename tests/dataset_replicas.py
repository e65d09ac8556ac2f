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


def _colour(cls: int, n_colours: int | None) -> tuple[int, int, int]:
    """COLOURS (cycled) by default; with `n_colours`, one hue of n spread round the colour wheel per class,
    so a replica of many classes still has a colour per class (the open-set benchmark's CUB replica)."""
    if n_colours is None:
        return COLOURS[cls % len(COLOURS)]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(cls / n_colours, 0.85 if cls % 2 else 0.55, 0.9 if cls % 3 else 0.6)
    return int(255 * r), int(255 * g), int(255 * b)


def _image(path: Path, cls: int, i: int, n_colours: int | None = None) -> None:
    rng = np.random.default_rng(1000 * cls + i)
    base = np.array(_colour(cls, n_colours), dtype=np.int16)
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


def make_cub(tmp: Path, n_classes: int | None = None, train_per_class: int = TRAIN_PER_CLASS,
             test_per_class: int = TEST_PER_CLASS) -> Path:
    """The CUB layout with its three classes, or `n_classes` made-up ones ("001.Bird_001", ...; a hue each)."""
    folders = CUB_FOLDERS if n_classes is None else [f"{c:03d}.Bird_{c:03d}" for c in range(1, n_classes + 1)]
    root = tmp / "CUB_200_2011"
    root.mkdir(parents=True)
    images, labels, split = [], [], []
    items = [(c, i, i < train_per_class) for c in range(len(folders)) for i in range(train_per_class + test_per_class)]
    for n, (c, i, train) in enumerate(items, 1):
        rel = f"{folders[c]}/{folders[c].split('.', 1)[1]}_{i:04d}_{n}.jpg"
        _image(root / "images" / rel, c, i, n_classes)
        images.append(f"{n} {rel}")
        labels.append(f"{n} {int(folders[c][:3])}")
        split.append(f"{n} {int(train)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("".join(f"{int(f[:3])} {f}\n" for f in folders))
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


# ----------------------------------------------------------------------------------------------------------
# the paper's other six, and CoOp's split files


def write_coop(folder: Path, file: str, image_dir: str, items: list[tuple[str, int, str]]) -> None:
    """CoOp's split_zhou_<Name>.json over `items` ([path under image_dir, class index, class name] for every
    image, class by class): a re-split unlike the official one (per class: image 0 and the last in test,
    image 1 in val, the rest in train), so a test can tell which split a reader took."""
    import json

    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(list(item))
    split = {"train": [], "val": [], "test": []}
    for rows in by_class.values():
        split["test"] += [rows[0], rows[-1]]
        split["val"].append(rows[1])
        split["train"] += rows[2:-1]
    (folder / file).write_text(json.dumps(split))


COOP_TRAIN_PER_CLASS = TRAIN_PER_CLASS + TEST_PER_CLASS - 3
COOP_TEST_PER_CLASS = 2

BIRDSNAP_SPECIES = [("1", "Acadian Flycatcher", "Empidonax virescens", "Acadian_Flycatcher"),
                    ("2", "Chuck-will's-widow", "Antrostomus carolinensis", "Chuck_wills_widow"),
                    ("3", "Blue Jay", "Cyanocitta cristata", "Blue_Jay")]


def make_birdsnap(tmp: Path) -> Path:
    root = tmp / "birdsnap"
    root.mkdir(parents=True)
    (root / "species.txt").write_text("id\tcommon\tscientific\tdir\n" + "".join("\t".join(s) + "\n" for s in BIRDSNAP_SPECIES))
    images, test = ["url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2"], ["path"]
    for n, (c, i, train) in enumerate(_split(len(BIRDSNAP_SPECIES)), 1):
        rel = f"{BIRDSNAP_SPECIES[c][3]}/{1000 + n}.jpg"
        _image(root / "download" / "images" / rel, c, i)
        images.append(f"http://farm.example/{n}.jpg\t0\t{rel}\t{BIRDSNAP_SPECIES[c][0]}\t1\t1\t15\t15")
        if not train:
            test.append(rel)
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "test_images.txt").write_text("\n".join(test) + "\n")
    return tmp


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "pho"]


def make_food101(tmp: Path) -> Path:
    root = tmp / "food-101"
    (root / "meta").mkdir(parents=True)
    rows, items = {"train": [], "test": []}, []
    for n, (c, i, train) in enumerate(_split(len(FOOD_CLASSES)), 1):
        rel = f"{FOOD_CLASSES[c]}/{100000 + n}"
        _image(root / "images" / f"{rel}.jpg", c, i)
        rows["train" if train else "test"].append(rel)
        items.append((f"{rel}.jpg", c, FOOD_CLASSES[c]))
    (root / "meta" / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    (root / "meta" / "labels.txt").write_text("\n".join(c.replace("_", " ").capitalize() for c in FOOD_CLASSES) + "\n")
    for split, r in rows.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(r) + "\n")
    write_coop(root, "split_zhou_Food101.json", "images", items)
    return tmp


DTD_CLASSES = ["banded", "blotchy", "zigzagged"]


def make_dtd(tmp: Path) -> Path:
    """Two folds: fold 1 puts images 0-2 in train+val and 3-4 in test; fold 2 the other way round."""
    root = tmp / "dtd"
    (root / "labels").mkdir(parents=True)
    lists: dict[str, list[str]] = {f"{p}{f}": [] for p in ("train", "val", "test") for f in (1, 2)}
    items = []
    for c, i, train in _split(len(DTD_CLASSES)):
        rel = f"{DTD_CLASSES[c]}/{DTD_CLASSES[c]}_{i:04d}.jpg"
        _image(root / "images" / rel, c, i)
        lists[("train1" if i < 2 else "val1") if train else "test1"].append(rel)
        lists[("train2" if i >= 3 else "val2") if i >= 2 else "test2"].append(rel)
        items.append((rel, c, DTD_CLASSES[c]))
    for name, r in lists.items():
        (root / "labels" / f"{name}.txt").write_text("\n".join(r) + "\n")
    write_coop(root, "split_zhou_DescribableTextures.json", "images", items)
    return tmp


SUN_CLASSES = ["/a/abbey", "/b/bakery/shop", "/a/apartment_building/outdoor"]
SUN_NAMES = ["abbey", "shop bakery", "outdoor apartment building"]


def make_sun397(tmp: Path) -> Path:
    root = tmp / "sun397"
    (root / "SUN397").mkdir(parents=True)
    rows, items = {"Training_01": [], "Testing_01": []}, []
    for n, (c, i, train) in enumerate(_split(len(SUN_CLASSES)), 1):
        rel = f"{SUN_CLASSES[c].strip('/')}/sun_{n:04d}.jpg"
        _image(root / "SUN397" / rel, c, i)
        rows["Training_01" if train else "Testing_01"].append("/" + rel)
        items.append((rel, c, SUN_NAMES[c]))
    (root / "ClassName.txt").write_text("\n".join(SUN_CLASSES) + "\n")
    for name, r in rows.items():
        (root / f"{name}.txt").write_text("\n".join(r) + "\n")
    write_coop(root, "split_zhou_SUN397.json", "SUN397", items)
    return tmp


UCF_ACTIONS = ["ApplyEyeMakeup", "Basketball", "YoYo"]
UCF_NAMES = ["Apply Eye Makeup", "Basketball", "Yo Yo"]


def make_ucf101(tmp: Path) -> Path:
    root = tmp / "ucf101"
    (root / "ucfTrainTestlist").mkdir(parents=True)
    rows, items = {"trainlist01": [], "testlist01": []}, []
    for c, i, train in _split(len(UCF_ACTIONS)):
        video = f"v_{UCF_ACTIONS[c]}_g{i + 1:02d}_c01"
        folder = UCF_NAMES[c].replace(" ", "_")
        _image(root / "UCF-101-midframes" / folder / f"{video}.jpg", c, i)
        rows["trainlist01" if train else "testlist01"].append(
            f"{UCF_ACTIONS[c]}/{video}.avi" + (f" {c + 1}" if train else ""))
        items.append((f"{folder}/{video}.jpg", c, folder))
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("".join(f"{c + 1} {a}\n" for c, a in enumerate(UCF_ACTIONS)))
    for name, r in rows.items():
        (root / "ucfTrainTestlist" / f"{name}.txt").write_text("\n".join(r) + "\n")
    write_coop(root, "split_zhou_UCF101.json", "UCF-101-midframes", items)
    return tmp


IMAGENET = [("n01440764", "tench, Tinca tinca"), ("n02012849", "crane"), ("n03126707", "crane")]
IMAGENET_NAMES = ["tench", "crane (n02012849)", "crane (n03126707)"]


def _imagenet_train(root: Path) -> list[tuple[int, int, str]]:
    val = []
    for n, (c, i, train) in enumerate(_split(len(IMAGENET)), 1):
        wnid = IMAGENET[c][0]
        if train:
            _image(root / "train" / wnid / f"{wnid}_{n}.JPEG", c, i)
        else:
            val.append((c, i, wnid))
    return val


def make_imagenet_devkit(tmp: Path) -> Path:
    """The raw archives: train/<wnid>/, a flat val/ and the devkit's meta.mat + ground truth."""
    root = tmp / "imagenet"
    val = _imagenet_train(root)
    truth = []
    for n, (c, i, _) in enumerate(val, 1):
        _image(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", c, i)
        truth.append(str(c + 1))
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    syn = np.zeros((len(IMAGENET) + 1, 1), dtype=[(f, object) for f in fields])
    for k, (wnid, words) in enumerate(IMAGENET + [("n00001740", "entity")]):
        syn[k, 0]["ILSVRC2012_ID"] = np.array([[k + 1]], dtype=np.uint16)
        syn[k, 0]["WNID"], syn[k, 0]["words"], syn[k, 0]["gloss"] = wnid, words, "a gloss"
        syn[k, 0]["num_children"] = np.array([[0 if k < len(IMAGENET) else 3]], dtype=np.uint16)
    savemat(data / "meta.mat", {"synsets": syn})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
    return tmp


def make_imagenet_folders(tmp: Path) -> Path:
    """torchvision's / CoOp's: train/<wnid>/ and val/<wnid>/, CoOp's classnames.txt beside images/."""
    root = tmp / "imagenet"
    val = _imagenet_train(root / "images")
    for n, (c, i, wnid) in enumerate(val, 1):
        _image(root / "images" / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG", c, i)
    (root / "classnames.txt").write_text("".join(f"{w} {n}\n" for (w, _), n in zip(IMAGENET, IMAGENET_NAMES)))
    return tmp


def make_imagenet_kaggle(tmp: Path) -> Path:
    root = tmp / "imagenet"
    val = _imagenet_train(root / "ILSVRC" / "Data" / "CLS-LOC")
    sol = ["ImageId,PredictionString"]
    for n, (c, i, wnid) in enumerate(val, 1):
        _image(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", c, i)
        sol.append(f"ILSVRC2012_val_{n:08d},{wnid} 1 1 15 15")
    (root / "LOC_val_solution.csv").write_text("\n".join(sol) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {s}\n" for w, s in IMAGENET))
    return tmp


EUROSAT = [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("SeaLake", "Sea or Lake")]
CALTECH = [("accordion", "accordion"), ("airplanes", "airplane"), ("Faces", "face")]


def _folders_with_coop(tmp: Path, folder: str, image_dir: str, file: str, classes: list[tuple[str, str]]) -> Path:
    root = tmp / folder
    items = []
    for c, i, _ in _split(len(classes)):
        rel = f"{classes[c][0]}/{classes[c][0]}_{i + 1}.jpg"
        _image(root / image_dir / rel, c, i)
        items.append((rel, c, classes[c][1]))
    write_coop(root, file, image_dir, items)
    return tmp


def make_eurosat(tmp: Path) -> Path:
    return _folders_with_coop(tmp, "eurosat", "2750", "split_zhou_EuroSAT.json", EUROSAT)


def make_caltech101(tmp: Path) -> Path:
    return _folders_with_coop(tmp, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", CALTECH)


def _with_coop(builder, folder: str, file: str, image_dir: str, names: list[str]):
    """A replica of the official layout plus CoOp's split file over its images (as CoOp's folder holds it)."""
    def build(tmp: Path) -> Path:
        root = builder(tmp)
        base = next(p for p in (root, root / folder) if p.is_dir() and (p / image_dir if image_dir else p).is_dir()
                    and p.name == folder)
        images = base / image_dir if image_dir else base
        paths = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
        write_coop(base, file, image_dir, [(p, c, names[c]) for c in range(len(names)) for p in paths
                                           if _colour_class(images / p) == c])
        return root
    return build


def _colour_class(path: Path) -> int:
    from PIL import Image

    mean = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).mean(0)
    return next(c for c, col in enumerate(COLOURS) if int(np.argmax(col)) == int(np.argmax(mean)))


REPLICAS.update({
    "birdsnap": (make_birdsnap, [s[1] for s in BIRDSNAP_SPECIES], ["birdsnap/species.txt", "birdsnap/images.txt",
                                                                    "birdsnap/test_images.txt", "birdsnap/download"]),
    "food-101": (make_food101, [c.replace("_", " ") for c in FOOD_CLASSES],
                 ["food-101/meta/classes.txt", "food-101/meta/train.txt", "food-101/meta/test.txt", "food-101/images"]),
    "dtd": (make_dtd, DTD_CLASSES, ["dtd/labels/train1.txt", "dtd/labels/val1.txt", "dtd/labels/test1.txt",
                                    "dtd/images", "dtd/labels"]),
    "imagenet-1k": (make_imagenet_devkit, IMAGENET_NAMES,
                    ["imagenet/train", "imagenet/val", "imagenet/ILSVRC2012_devkit_t12/data/meta.mat",
                     "imagenet/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"]),
    "imagenet-1k/folders": (make_imagenet_folders, IMAGENET_NAMES,
                            ["imagenet/images/train", "imagenet/images/val", "imagenet/classnames.txt"]),
    "imagenet-1k/kaggle": (make_imagenet_kaggle, IMAGENET_NAMES, ["imagenet/LOC_val_solution.csv",
                                                                  "imagenet/LOC_synset_mapping.txt"]),
    "sun397": (make_sun397, SUN_NAMES, ["sun397/ClassName.txt", "sun397/Training_01.txt", "sun397/Testing_01.txt",
                                        "sun397/SUN397"]),
    "ucf101": (make_ucf101, UCF_NAMES, ["ucf101/UCF-101-midframes", "ucf101/ucfTrainTestlist/classInd.txt",
                                        "ucf101/ucfTrainTestlist/trainlist01.txt",
                                        "ucf101/ucfTrainTestlist/testlist01.txt"]),
})

# name -> (builder of a root holding CoOp's split file, readable class names); the official replicas of the
# datasets CoOp re-split get the file written over their images
COOP = {
    "oxford-pets": (_with_coop(make_pets, "oxford-iiit-pet", "split_zhou_OxfordPets.json", "images", PETS_IDS), PETS_NAMES),
    "flowers-102": (_with_coop(make_flowers, "flowers", "split_zhou_OxfordFlowers.json", "jpg", FLOWERS_NAMES),
                    FLOWERS_NAMES),
    "stanford-cars": (_with_coop(make_cars_devkit, "stanford_cars", "split_zhou_StanfordCars.json", "", CARS_NAMES),
                      CARS_NAMES),
    "food-101": (make_food101, [c.replace("_", " ") for c in FOOD_CLASSES]),
    "dtd": (make_dtd, DTD_CLASSES),
    "sun397": (make_sun397, SUN_NAMES),
    "ucf101": (make_ucf101, UCF_NAMES),
    "eurosat": (make_eurosat, [n for _, n in EUROSAT]),
    "caltech-101": (make_caltech101, [n for _, n in CALTECH]),
}
