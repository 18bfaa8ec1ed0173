"""Every dataset reader on a small tree in that dataset's real layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp.core.coop_datasets import DATASETS, classnames_of, load_dataset
from mugcp.core.errors import UserError

WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")  # existence is what the readers check


def make_split_json_dataset(root: Path, name: str, classes=("alpha", "beta_gamma"), per_split=(3, 2, 2)) -> dict:
    spec = DATASETS[name]
    folder = root / spec.folder
    split = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(classes):
        for key, n in zip(split, per_split):
            for i in range(n):
                rel = f"{cname}/{key}_{i}.jpg"
                touch(folder / spec.image_dir / rel)
                split[key].append([rel, label, cname])
    (folder / spec.split_file).write_text(json.dumps(split))
    return split


SPLIT_JSON = [n for n, s in DATASETS.items() if s.kind == "split_json"]


@pytest.mark.parametrize("name", SPLIT_JSON)
def test_split_json_readers(tmp_path, name):
    split = make_split_json_dataset(tmp_path, name)
    spec = DATASETS[name]
    s = load_dataset(name, tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 4, 4)
    first = s.train[0]
    assert first.label == 0 and first.classname == "alpha"
    assert (s.root / first.path) == (tmp_path / spec.folder / spec.image_dir / split["train"][0][0])
    assert classnames_of(s.train) == ["alpha", "beta_gamma"]
    # the dataset folder itself is accepted as --root too
    assert load_dataset(name, tmp_path / spec.folder).test == s.test


def test_aircraft_reader(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, rows in {"train": [("0001", 2), ("0002", 0)], "val": [("0003", 1)], "test": [("0004", 2)]}.items():
        lines = [f"{im} {variants[lab]}" for im, lab in rows]
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for im, _ in rows:
            touch(folder / "images" / f"{im}.jpg")
    s = load_dataset("fgvc_aircraft", tmp_path)
    assert [(i.path, i.label, i.classname) for i in s.train] == [
        ("images/0001.jpg", 2, "Cessna 172"), ("images/0002.jpg", 0, "707-320")]
    assert s.test[0].classname == "Cessna 172" and len(s.val) == 1


def write_classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))


def test_imagenet_reader(tmp_path):
    folder = tmp_path / "imagenet"
    write_classnames(folder)
    for split in ("train", "val"):
        for w in WNIDS:
            for i in range(2):
                touch(folder / "images" / split / w / f"{w}_{i}.JPEG")
    s = load_dataset("imagenet", tmp_path)
    assert len(s.train) == 6 and s.val == s.test and len(s.test) == 6
    assert classnames_of(s.train) == NAMES
    assert s.train[2].path == f"images/train/{WNIDS[1]}/{WNIDS[1]}_0.JPEG" and s.train[2].label == 1


@pytest.mark.parametrize("name", ["imagenet_sketch", "imagenet_a", "imagenet_r"])
def test_wnid_folder_readers(tmp_path, name):
    spec = DATASETS[name]
    folder = tmp_path / spec.folder
    write_classnames(folder)
    for w in WNIDS[1:]:  # a subset of classes, as -A and -R hold 200 of 1,000
        touch(folder / spec.image_dir / w / "x.jpg")
    touch(folder / spec.image_dir / "README.txt") if name != "imagenet_sketch" else None
    s = load_dataset(name, tmp_path)
    assert s.train == [] and [(i.label, i.classname) for i in s.test] == [(0, NAMES[1]), (1, NAMES[2])]


def test_imagenetv2_reader(tmp_path):
    spec = DATASETS["imagenetv2"]
    folder = tmp_path / spec.folder
    write_classnames(folder)
    for label in (0, 2):
        touch(folder / spec.image_dir / str(label) / "a.jpeg")
    with pytest.raises(UserError, match=f"imagenetv2 has no images of class '{NAMES[1]}' \\(label 1, folder "):
        load_dataset("imagenetv2", tmp_path)  # a partly downloaded V2: every later label would shift
    touch(folder / spec.image_dir / "1" / "b.jpeg")
    s = load_dataset("imagenetv2", tmp_path)
    assert [(i.label, i.classname) for i in s.test] == [(0, NAMES[0]), (1, NAMES[1]), (2, NAMES[2])]


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r", "imagenet_sketch"])
def test_a_wnid_folder_without_images_is_refused(tmp_path, name):
    """CoOp labels -A/-R/-Sketch by their sorted class folders, empty or not: an empty one is a class the test
    cannot score, and dropping it would renumber the classes after it."""
    spec = DATASETS[name]
    folder = tmp_path / spec.folder
    write_classnames(folder)
    for w in WNIDS[1:]:
        touch(folder / spec.image_dir / w / "x.jpg")
    (folder / spec.image_dir / WNIDS[1] / "x.jpg").unlink()
    with pytest.raises(UserError, match=f"{name} has no images of class '{NAMES[1]}' \\(label 0, folder "):
        load_dataset(name, tmp_path)


def dtd_without_split(tmp_path, monkeypatch) -> Path:
    """$DATA/dtd with two class folders of 10 images and no split file (mugcp's home under tmp_path)."""
    monkeypatch.setenv("MUGCP_HOME", str(tmp_path / "home"))
    folder = tmp_path / "data" / "dtd"
    for c in ("banded", "zigzagged"):
        for i in range(10):
            touch(folder / "images" / c / f"{c}_{i}.jpg")
    return folder


def test_missing_dtd_split_is_generated_outside_data(tmp_path, monkeypatch):
    folder = dtd_without_split(tmp_path, monkeypatch)
    s = load_dataset("dtd", tmp_path / "data")
    assert (len(s.train), len(s.val), len(s.test)) == (10, 4, 6)  # 50/20/30 of 10 per class
    generated = s.source
    assert generated.is_file() and not (folder / "split_zhou_DescribableTextures.json").exists()
    assert generated.is_relative_to(tmp_path / "home") and str(generated) in s.notes[0]
    again = load_dataset("dtd", tmp_path / "data")  # deterministic, and reused
    assert again.train == s.train and "using the generated split" in again.notes[0] and again.source == generated
    # disjoint parts that cover every image
    paths = [i.path for part in (s.train, s.val, s.test) for i in part]
    assert len(paths) == len(set(paths)) == 20
    # images added to the folder: a split of its own, never the stale one
    for i in range(10):
        touch(folder / "images" / "veined" / f"veined_{i}.jpg")
    grown = load_dataset("dtd", tmp_path / "data")
    assert classnames_of(grown.train) == ["banded", "veined", "zigzagged"] and len(grown.test) == 9
    assert grown.source != generated and generated.is_file() and "changed since" in grown.notes[0]


def test_eurosat_generated_split_renames_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("MUGCP_HOME", str(tmp_path / "home"))
    for c in ("AnnualCrop", "SeaLake"):
        for i in range(5):
            touch(tmp_path / "eurosat" / "2750" / c / f"{c}_{i}.jpg")
    s = load_dataset("eurosat", tmp_path)
    assert classnames_of(s.train) == ["Annual Crop Land", "Sea or Lake"]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"train": [["../../etc/passwd", 0, "a"]], "val": [], "test": []}), "outside the dataset folder"),
    (json.dumps({"train": [["/etc/passwd", 0, "a"]], "val": [], "test": []}), "outside the dataset folder"),
    (json.dumps({"train": []}), "train/val/test"),
    (json.dumps({"train": [["alpha/nope.jpg", 0, "alpha"]], "val": [], "test": []}), "missing"),
])
def test_bad_split_files(tmp_path, bad, message):
    make_split_json_dataset(tmp_path, "dtd")
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(bad)
    with pytest.raises(UserError, match=message):
        load_dataset("dtd", tmp_path)


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'dtdd'"):
        load_dataset("dtdd", tmp_path)
    with pytest.raises(UserError, match="dataset root not found"):
        load_dataset("dtd", tmp_path / "nope")
    with pytest.raises(UserError, match="no 'oxford_pets/' folder"):
        load_dataset("oxford_pets", tmp_path)


def test_a_stray_file_beside_the_class_folders_is_no_class(tmp_path, monkeypatch):
    """A generated split lists class folders: a file beside them (Thumbs.db) is none; a link to a class folder on
    a disk that is not there is refused (left out, every later label would shift)."""
    folder = dtd_without_split(tmp_path, monkeypatch)
    (folder / "images" / "Thumbs.db").write_bytes(b"x")
    s = load_dataset("dtd", tmp_path / "data")
    assert classnames_of(s.train) == ["banded", "zigzagged"]
    (folder / "images" / "blotchy").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"images/blotchy links to {tmp_path / 'nowhere'}, which is not there"):
        load_dataset("dtd", tmp_path / "data")


def test_an_image_that_is_not_a_file_is_named_as_such(tmp_path):
    split = make_split_json_dataset(tmp_path, "dtd")
    spec = DATASETS["dtd"]
    image = tmp_path / spec.folder / spec.image_dir / split["test"][0][0]
    image.unlink()
    image.mkdir()  # a folder where the image should be
    with pytest.raises(UserError, match=f"1 image\\(s\\) listed for dtd are not files under .*{split['test'][0][0]}"):
        load_dataset("dtd", tmp_path)
    image.rmdir()
    with pytest.raises(UserError, match="are missing under"):
        load_dataset("dtd", tmp_path)
