"""The benchmark datasets' readers, on small replicas of each published layout that the tests write: official
splits, readable class names, and one clear error for every missing file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import savemat

import dataset_replicas as R
from fgvr.cli import cli
from fgvr.data import DataError
from fgvr.datasets import DatasetLayoutError, all_datasets, dataset_info, load_splits, readme_table
from fgvr.datasets.cub import cub_class_name
from fgvr.datasets.dogs import dogs_class_name
from fgvr.datasets.flowers import FLOWERS_102_CLASSES
from fgvr.datasets.pets import pets_class_name


def _build(name: str, tmp_path: Path) -> Path:
    return R.REPLICAS[name][0](tmp_path)


@pytest.mark.parametrize("name", list(R.REPLICAS))
def test_reader_gives_the_official_splits_with_readable_names(name, tmp_path):
    root = _build(name, tmp_path)
    s = load_splits(name.split("/")[0], root)
    names = R.REPLICAS[name][1]
    assert s.train.classes == sorted(names) == s.test.classes
    assert len(s.train.samples) == len(names) * R.TRAIN_PER_CLASS
    assert len(s.test.samples) == len(names) * R.TEST_PER_CLASS
    # every class in both splits, no image in both, every file on disk
    assert {x.label for x in s.train.samples} == {x.label for x in s.test.samples} == set(names)
    assert not {x.path for x in s.train.samples} & {x.path for x in s.test.samples}
    assert all(x.path.is_file() for x in s.train.samples + s.test.samples)
    # the split is the published one: the replicas put the first TRAIN_PER_CLASS images of a class in train,
    # and the images of one class have one colour, so the colour must match the label (no shuffled labels)
    from PIL import Image

    for x in s.train.samples + s.test.samples:
        mean = np.asarray(Image.open(x.path).convert("RGB")).reshape(-1, 3).mean(0)
        assert int(np.argmax(mean)) == int(np.argmax(R.COLOURS[names.index(x.label)])), x


@pytest.mark.parametrize("name", list(R.REPLICAS))
def test_each_missing_file_is_one_clear_error(name, tmp_path):
    _, _, required = R.REPLICAS[name]
    for rel in required:
        case = tmp_path / rel.replace("/", "_")
        root = _build(name, case)
        target = root / rel
        assert target.exists(), target
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(DatasetLayoutError) as e:
            load_splits(name.split("/")[0], root)
        msg = str(e.value)
        assert Path(rel).name in msg, (rel, msg)
        assert "Expected the layout" in msg and dataset_info(name.split("/")[0]).published in msg


@pytest.mark.parametrize("name", [n for n in R.REPLICAS if n not in ("birdsnap", "imagenet-1k/folders")])  # no list there
def test_an_image_missing_from_disk_is_counted_and_named(name, tmp_path):
    root = _build(name, tmp_path)
    victim = sorted(load_splits(name.split("/")[0], root).test.samples, key=lambda x: str(x.path))[0].path
    victim.unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of the \d+ images listed in .* not on disk") as e:
        load_splits(name.split("/")[0], root)
    assert victim.name in str(e.value)


def test_wrong_root_and_unknown_names(tmp_path):
    with pytest.raises(DatasetLayoutError, match="images.txt not found"):
        load_splits("cub", tmp_path)
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        load_splits("oxford-pets", tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset 'imagenet-21k'.*cub-200-2011"):
        dataset_info("imagenet-21k")
    assert dataset_info("CUB").name == "cub-200-2011" and dataset_info("Flowers_102").name == "flowers-102"
    assert dataset_info("cars").name == "stanford-cars" and dataset_info("pets").name == "oxford-pets"


def test_class_name_rules():
    assert cub_class_name("001.Black_footed_Albatross") == "Black-footed Albatross"
    assert cub_class_name("020.Yellow_breasted_Chat") == "Yellow-breasted Chat"
    assert cub_class_name("095.Baltimore_Oriole") == "Baltimore Oriole"
    assert cub_class_name("104.American_Pipit") == "American Pipit"
    assert cub_class_name("162.Canada_Warbler") == "Canada Warbler"
    assert cub_class_name("160.Black_throated_Blue_Warbler") == "Black-throated Blue Warbler"
    assert cub_class_name("163.Cape_May_Warbler") == "Cape May Warbler"
    assert cub_class_name("158.Bay_breasted_Warbler") == "Bay-breasted Warbler"
    assert cub_class_name("165.Chestnut_sided_Warbler") == "Chestnut-sided Warbler"
    assert cub_class_name("159.Black_and_white_Warbler") == "Black-and-white Warbler"
    assert cub_class_name("115.Brewer_Sparrow") == "Brewer Sparrow"
    assert cub_class_name("105.Whip_poor_Will") == "Whip-poor-will"
    assert dogs_class_name("n02085782-Japanese_spaniel") == "Japanese spaniel"
    assert dogs_class_name("n02086240-Shih-Tzu") == "Shih-Tzu"
    assert pets_class_name("american_pit_bull_terrier_12") == "american pit bull terrier"
    assert pets_class_name("Egyptian_Mau_101") == "Egyptian Mau"
    assert len(FLOWERS_102_CLASSES) == 102 == len(set(FLOWERS_102_CLASSES))
    assert FLOWERS_102_CLASSES[0] == "pink primrose" and FLOWERS_102_CLASSES[-1] == "blackberry lily"


def test_dogs_lists_unpacked_into_the_root_are_found(tmp_path):
    root = R.make_dogs(tmp_path)
    for f in ("train_list.mat", "test_list.mat"):
        shutil.move(root / "lists" / f, root / f)
    (root / "lists").rmdir()
    s = load_splits("stanford-dogs", root)
    assert len(s.train.samples) == 9 and s.train.classes == sorted(R.DOGS_NAMES)


def test_dogs_label_given_to_two_breeds_is_refused(tmp_path):
    root = R.make_dogs(tmp_path)
    savemat(root / "lists" / "test_list.mat", {
        "file_list": R._cells(["n02085620-Chihuahua/n02085620_103.jpg", "n02086240-Shih-Tzu/n02086240_103.jpg"]),
        "annotation_list": R._cells(["a", "b"]), "labels": np.array([[1.0], [1.0]])})
    with pytest.raises(DatasetLayoutError, match="label 1 is given to folders of"):
        load_splits("stanford-dogs", root)


def test_cars_test_annotations_without_labels_say_which_file_to_get(tmp_path):
    root = R.make_cars_devkit(tmp_path) / "stanford_cars"
    (root / "cars_test_annos_withlabels.mat").rename(root / "devkit" / "cars_test_annos.mat")
    with pytest.raises(DatasetLayoutError, match="has no labels.*cars_test_annos_withlabels.mat"):
        load_splits("stanford-cars", root)


def test_cars_annotation_with_a_class_out_of_range(tmp_path):
    root = R.make_cars_csv(tmp_path)
    (root / "anno_test.csv").write_text("00001.jpg,1,1,15,15,7\n")
    with pytest.raises(DatasetLayoutError, match="anno_test.csv, line 1: class 7 outside 1..3"):
        load_splits("stanford-cars", root)


def test_cub_lists_that_disagree_are_refused(tmp_path):
    root = R.make_cub(tmp_path) / "CUB_200_2011"
    lines = (root / "train_test_split.txt").read_text().splitlines()
    (root / "train_test_split.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"image 15 of images.txt is missing from train_test_split.txt"):
        load_splits("cub-200-2011", root)


def test_aircraft_variant_not_in_variants_txt(tmp_path):
    root = R.make_aircraft(tmp_path)
    (root / "data" / "variants.txt").write_text("707-320\nCessna 172\n")
    with pytest.raises(DatasetLayoutError, match="'F/A-18' of image .* is not in variants.txt"):
        load_splits("fgvc-aircraft", root)


def test_flowers_train_is_trnid_plus_valid(tmp_path):
    root = R.make_flowers(tmp_path)
    s = load_splits("flowers-102", root)
    names = sorted(int(x.path.stem.split("_")[1]) for x in s.train.samples)
    from scipy.io import loadmat

    ids = loadmat(root / "setid.mat")
    assert names == sorted(ids["trnid"].ravel().tolist() + ids["valid"].ravel().tolist())
    assert sorted(int(x.path.stem.split("_")[1]) for x in s.test.samples) == sorted(ids["tstid"].ravel().tolist())


def test_fashion_mnist_writes_only_the_images_asked_for(tmp_path):
    root = R.make_fashion_mnist(tmp_path)
    cache = tmp_path / "cache"
    s = load_splits("fashion-mnist", root, cache_dir=cache)
    assert s.on_demand and len(s.train.samples) == 30 and len(s.test.samples) == 20
    assert "T-shirt/top" in s.train.classes and "Ankle boot" in s.test.classes
    assert not cache.exists()  # nothing written yet
    s.prepare(s.test.samples[:3] + s.train.samples[-1:])
    written = sorted(p.name for p in cache.rglob("*.png"))
    assert written == ["test-00000.png", "test-00001.png", "test-00002.png", "train-00029.png"]
    assert all(x.path.is_file() for x in s.test.samples[:3])
    assert not s.test.samples[3].path.exists()
    with pytest.raises(DatasetLayoutError, match="t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
        load_splits("fashion-mnist", root, cache_dir=cache)


def test_bench_list_and_missing_root(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "--list"])
    assert r.exit_code == 0
    for info in all_datasets():
        assert info.name in r.output and info.published in r.output
    r = CliRunner().invoke(cli, ["bench", "cub", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "--root DIR is required for cub-200-2011" in r.output
    r = CliRunner().invoke(cli, ["bench", "cub", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and "images.txt not found" in r.output and "Traceback" not in r.output  # an InputError


def test_a_file_that_is_not_a_mat_file(tmp_path):
    root = R.make_flowers(tmp_path)
    (root / "setid.mat").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DatasetLayoutError, match="setid.mat is not a readable .mat file") as e:
        load_splits("flowers-102", root)
    assert str(e.value).count("Expected the layout") == 1
    (root / "setid.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="setid.mat not found") as e:
        load_splits("flowers-102", root)
    assert "readable" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# CoOp's split files, folds, partial downloads, the generated listings


def _coop_lists(root: Path, info) -> dict:
    import json

    base = next(p for p in (root, *(root / f for f in info.folders)) if (p / info.coop.file).is_file())
    images = base / info.coop.image_dir if info.coop.image_dir else base
    split = json.loads((base / info.coop.file).read_text())
    return {part: [(images / rel, name.replace("_", " ")) for rel, _, name in split[part]] for part in split}


@pytest.mark.parametrize("name", list(R.COOP))
def test_coop_split_reads_exactly_the_split_file(name, tmp_path):
    build, names = R.COOP[name]
    root = build(tmp_path)
    s = load_splits(name, root, split="coop")
    info = dataset_info(name)
    lists = _coop_lists(root, info)
    assert s.split == f"coop: {info.coop.file}"
    assert [(x.path, x.label) for x in s.test.samples] == lists["test"]  # exactly CoOp's test list, in order
    assert [(x.path, x.label) for x in s.train.samples] == lists["train"]  # val is not drawn from
    assert s.train.classes == sorted(names) == s.test.classes
    assert len(s.test.samples) == len(names) * R.COOP_TEST_PER_CLASS
    assert all(x.path.is_file() for x in s.train.samples + s.test.samples)
    # the file missing: one error naming it; a file that is not JSON: one error too
    (lists["test"][0][0]).unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of the \d+ images listed in .*test are not on disk"):
        load_splits(name, root, split="coop")
    coop_file = next(p for p in root.rglob(info.coop.file))
    coop_file.write_text("<html>")
    with pytest.raises(DatasetLayoutError, match=f"{info.coop.file} is not a readable JSON file"):
        load_splits(name, root, split="coop")
    coop_file.unlink()
    with pytest.raises(DatasetLayoutError, match=f"{info.coop.file} not found"):
        load_splits(name, root, split="coop")


@pytest.mark.parametrize("name", [n for n in R.REPLICAS if "/" not in n and n not in R.COOP])
def test_official_test_list_is_exactly_the_publishers(name, tmp_path):
    """The test images are the official test list's, one for one (the replicas' lists name them in order)."""
    root = R.REPLICAS[name][0](tmp_path)
    s = load_splits(name, root)
    assert len(s.test.samples) == len(set(x.path for x in s.test.samples)) == len(R.REPLICAS[name][1]) * R.TEST_PER_CLASS
    assert s.test_missing == 0 and s.test_listed == len(s.test.samples) and s.split == "official"


def test_split_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="Stanford Dogs has no CoOp split file.*use --split official"):
        load_splits("stanford-dogs", tmp_path, split="coop")
    with pytest.raises(DataError, match="EuroSAT publishes no train/test split: use --split coop with split_zhou_EuroSAT.json"):
        load_splits("eurosat", tmp_path)
    with pytest.raises(DataError, match="--fold applies only"):
        load_splits("cub", tmp_path, fold=2)
    with pytest.raises(DataError, match="--split 'zhou'"):
        load_splits("cub", tmp_path, split="zhou")


def test_dtd_folds_are_named_and_differ(tmp_path):
    root = R.make_dtd(tmp_path)
    one, two = load_splits("dtd", root), load_splits("dtd", root, fold=2)
    assert one.split == "official, fold 1" and two.split == "official, fold 2"
    assert {x.path.name for x in two.test.samples} == {f"{c}_{i:04d}.jpg" for c in R.DTD_CLASSES for i in (0, 1)}
    assert not {x.path for x in one.test.samples} & {x.path for x in two.test.samples}
    with pytest.raises(DatasetLayoutError, match="--fold 11 is outside 1..10"):
        load_splits("dtd", root, fold=11)
    with pytest.raises(DatasetLayoutError, match="train3.txt not found"):
        load_splits("dtd", root, fold=3)


def test_birdsnap_partial_download_is_read_and_counted(tmp_path):
    root = R.make_birdsnap(tmp_path)
    s = load_splits("birdsnap", root)
    assert (s.test_listed, s.test_missing, len(s.test.samples)) == (6, 0, 6)
    victims = [s.test.samples[0].path, s.train.samples[0].path, s.train.samples[1].path]
    for v in victims:
        v.unlink()
    s = load_splits("birdsnap", root)
    assert (s.test_listed, s.test_missing, len(s.test.samples)) == (6, 1, 5)
    assert s.train_missing == 2 and len(s.train.samples) == 7
    assert "5 of 6 on disk (1 missing)" in s.note
    for x in s.test.samples:
        x.path.unlink()
    with pytest.raises(DatasetLayoutError, match="none of the 6 images of test_images.txt"):
        load_splits("birdsnap", root)


def test_imagenet_names_are_readable_and_unique(tmp_path):
    for build in (R.make_imagenet_devkit, R.make_imagenet_kaggle, R.make_imagenet_folders):
        s = load_splits("imagenet-1k", build(tmp_path / build.__name__))
        assert s.test.classes == sorted(R.IMAGENET_NAMES), build.__name__
        assert len(s.test.samples) == 6 and {x.path.suffix for x in s.test.samples} == {".JPEG"}


def test_every_declaration_is_listed_and_the_readme_table_is_generated():
    names = [d.name for d in all_datasets()]
    paper = ["stanford-dogs", "flowers-102", "cub-200-2011", "stanford-cars", "oxford-pets", "fgvc-aircraft",
             "birdsnap", "food-101", "dtd", "imagenet-1k", "sun397", "ucf101"]
    assert names[:12] == paper and set(names[12:]) == {"eurosat", "caltech-101", "fashion-mnist"}
    r = CliRunner().invoke(cli, ["bench", "--help"])
    assert r.exit_code == 0 and all(n in r.output for n in names)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert readme_table() in readme, "README's dataset table is stale: run scripts/dataset_table.py"
