"""The CoOp-family datasets, read from a user's existing `$DATA` exactly as the reference code reads them.

The fifteen datasets differ only in data (folder, image folder, split file, renames), so they
are one table, `DATASETS`, read by four small readers chosen by `DatasetSpec.kind` (their
hand-crafted prompts, which differ between reference repositories, are `core/templates.py`):

- ``split_json``: `split_zhou_*.json` = {"train"|"val"|"test": [[relpath, label, classname], ...]}
  with relpath relative to the image folder (nine datasets). DTD, EuroSAT, Food101 and Caltech101
  can have a missing split file generated the CoOp way (`generate_split`).
- ``aircraft``: FGVCAircraft's `variants.txt` + `images_variant_{train,val,test}.txt`.
- ``imagenet``: `classnames.txt` ("wnid name" lines) + `images/{train,val}/<wnid>/`; the val set
  is the test set (and CoOp's "val" too).
- ``folders``: ImageNet-Sketch/-A/-R (sorted wnid folders) and ImageNet-V2 (folders 0..999):
  test-only sets whose labels come from `classnames.txt`.

Every `Item.path` is relative to the dataset's folder (`$DATA/<folder>`), the key the
stage-one cache uses. Differences from the reference, for determinism: directory listings are
sorted (CoOp's `listdir_nohidden` is filesystem-ordered for ImageNet images and DTD splits).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mugcp.core.errors import UserError
from mugcp.core.files import write_json_atomic


@dataclass(frozen=True)
class Item:
    path: str  # relative to the dataset folder, e.g. "images/banded/banded_0002.jpg"
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # the CLI name
    folder: str  # under $DATA
    image_dir: str  # under the folder; split paths are relative to it
    kind: str = "split_json"
    split_file: str | None = None
    generate_split: bool = False  # CoOp builds a missing split from the class folders
    ignored: tuple[str, ...] = ()
    renames: dict = field(default_factory=dict)
    test_only: bool = False


_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}
_CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("imagenet", "imagenet", "images", kind="imagenet"),
    DatasetSpec("caltech101", "caltech-101", "101_ObjectCategories",
                split_file="split_zhou_Caltech101.json", generate_split=True,
                ignored=("BACKGROUND_Google", "Faces_easy"), renames=_CALTECH_NAMES),
    DatasetSpec("oxford_pets", "oxford_pets", "images", split_file="split_zhou_OxfordPets.json"),
    DatasetSpec("stanford_cars", "stanford_cars", "", split_file="split_zhou_StanfordCars.json"),
    DatasetSpec("oxford_flowers", "oxford_flowers", "jpg", split_file="split_zhou_OxfordFlowers.json"),
    DatasetSpec("food101", "food-101", "images", split_file="split_zhou_Food101.json", generate_split=True),
    DatasetSpec("fgvc_aircraft", "fgvc_aircraft", "images", kind="aircraft"),
    DatasetSpec("sun397", "sun397", "SUN397", split_file="split_zhou_SUN397.json"),
    DatasetSpec("dtd", "dtd", "images", split_file="split_zhou_DescribableTextures.json", generate_split=True),
    DatasetSpec("eurosat", "eurosat", "2750",
                split_file="split_zhou_EuroSAT.json", generate_split=True, renames=_EUROSAT_NAMES),
    DatasetSpec("ucf101", "ucf101", "UCF-101-midframes", split_file="split_zhou_UCF101.json"),
    DatasetSpec("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                kind="folders", test_only=True),
    DatasetSpec("imagenet_sketch", "imagenet-sketch", "images", kind="folders", test_only=True),
    DatasetSpec("imagenet_a", "imagenet-adversarial", "imagenet-a", kind="folders",
                test_only=True, ignored=("README.txt",)),
    DatasetSpec("imagenet_r", "imagenet-rendition", "imagenet-r", kind="folders",
                test_only=True, ignored=("README.txt",)),
]}

# The eleven datasets of the base-to-novel and cross-dataset benchmarks, in the papers' order.
BASE_TO_NOVEL = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
# Cross-dataset transfer: prompts learned on ImageNet, tested on the ten others' test classes.
TRANSFER_TARGETS = BASE_TO_NOVEL[1:]
# Domain generalisation: the same prompts on ImageNet's shifted test sets (-A and -R hold 200 of its classes).
DOMAIN_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


@dataclass
class Splits:
    """A dataset as read: three item lists (val may equal test, as ImageNet's does) and its folder."""

    spec: DatasetSpec
    root: Path  # the dataset folder, $DATA/<folder>
    train: list[Item]
    val: list[Item]
    test: list[Item]
    notes: list[str] = field(default_factory=list)  # things the user should be told (e.g. a generated split)
    source: Optional[Path] = None  # the split file read, if any

    def abspath(self, item: Item) -> Path:
        return self.root / item.path

    def digest(self) -> str:
        """What the split holds, in order (each item's path, label and class name, per split): a run records it,
        so that evaluating or resuming it on a split that changed (another generated split, images added or
        moved) is refused instead of silently testing on other images. The images' bytes are not read."""
        h = hashlib.sha256()
        for name, items in (("train", self.train), ("val", self.val), ("test", self.test)):
            h.update(json.dumps([name, [(i.path, i.label, i.classname) for i in items]]).encode())
        return h.hexdigest()[:16]


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def prompt_name(classname: str) -> str:
    """Class names go into prompts with underscores as spaces, as in CoOp."""
    return classname.replace("_", " ")


def classnames_of(items: list[Item]) -> list[str]:
    """Class names ordered by label (Dassl's `lab2cname`), from the items that carry them."""
    names = {}
    for it in items:
        names.setdefault(it.label, it.classname)
    return [names[k] for k in sorted(names)]


def mugcp_home() -> Path:
    """Where mugcp writes things that belong to no run: generated splits, tool environments."""
    return Path(os.environ.get("MUGCP_HOME", Path.home() / ".cache" / "mugcp"))


def dataset_folder(spec: DatasetSpec, root: str | Path) -> Path:
    """`root` is `$DATA` (holding `<folder>/`), or the dataset folder itself."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset root not found: {root} (give --root the folder that holds '{spec.folder}/', i.e. $DATA)")
    if (root / spec.folder).is_dir():
        return (root / spec.folder).resolve()
    if root.name == spec.folder or (spec.split_file and (root / spec.split_file).is_file()):
        return root.resolve()
    raise UserError(f"no '{spec.folder}/' folder under {root}: lay the dataset out as CoOp does ($DATA/{spec.folder}/...)")


def load_dataset(name: str, root: str | Path, check_files: bool = True) -> Splits:
    """Read a dataset from `$DATA` the way CoOp does; check every listed image exists."""
    spec = get_spec(name)
    folder = dataset_folder(spec, root)
    reader = {"split_json": _read_split_json, "aircraft": _read_aircraft,
              "imagenet": _read_imagenet, "folders": _read_folders}[spec.kind]
    splits = reader(spec, folder)
    if check_files:
        _check_files(splits)
    for name, part in (("training", splits.train), ("test", splits.test)):
        if not part and not (name == "training" and spec.test_only):
            raise UserError(f"{splits.source or splits.root} lists no {name} images: restore it from the dataset's "
                            f"release" + (" or delete it to regenerate" if spec.generate_split else ""))
    if not spec.test_only:  # a test-only variant's classes come from its class list, whatever images it holds
        _check_labels(splits)
    return splits


def _check_labels(splits: Splits) -> None:
    """Labels 0..n-1 without a gap, one class name each, and every tested class with training images: the
    protocol indexes classes by label, so a gap or a tested class without shots would shift or drop classes."""
    names: dict[int, str] = {}
    for item in (*splits.train, *splits.val, *splits.test):
        if names.setdefault(item.label, item.classname) != item.classname:
            raise UserError(f"{splits.source or splits.root} gives label {item.label} two class names "
                            f"('{names[item.label]}', '{item.classname}'): restore it from the dataset's release")
    gaps = sorted(set(range(len(names))) - set(names))
    if gaps:
        raise UserError(f"{splits.source or splits.root} has no class with label {gaps[0]} (labels run to "
                        f"{max(names)}): labels must run from 0 without a gap; restore it from the dataset's release")
    trained = {item.label for item in splits.train}
    untrained = sorted({item.label for item in splits.test} - trained)
    if untrained:
        raise UserError(f"{splits.source or splits.root} lists no training image of class '{names[untrained[0]]}' "
                        f"(label {untrained[0]}): restore it from the dataset's release")


def _check_files(splits: Splits) -> None:
    seen = {it.path for part in (splits.train, splits.val, splits.test) for it in part}
    missing = sorted(p for p in seen if not (splits.root / p).is_file())
    odd = [p for p in missing if (splits.root / p).exists()]  # a folder, a FIFO, a socket where a file should be
    if odd:
        raise UserError(f"{len(odd)} image(s) listed for {splits.spec.name} are not files under {splits.root}, "
                        f"e.g. {odd[0]}: put the image there")
    if missing:
        raise UserError(f"{len(missing)} image(s) listed for {splits.spec.name} are missing under {splits.root}, "
                        f"e.g. {missing[0]}: restore them or fix the split file")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}): restore it from the dataset's "
                        f"release") from None


def _load_json(path: Path) -> dict:
    try:
        return json.loads(_read_text(path, "split file"))
    except json.JSONDecodeError as e:
        raise UserError(f"split file {path} is not valid JSON ({e.msg} at line {e.lineno}): restore it from the "
                        f"CoOp release or delete it to regenerate") from None


def _safe_relpath(base: str, rel: str, source: Path) -> str:
    """Join a split path onto the image folder, refusing a path that leaves the dataset folder by its name.

    The rule, for split files and folder listings alike: a path names a place inside the dataset
    folder (no absolute path, no `..`); the file system may then link it anywhere (CoOp's own
    instructions link `$DATA/imagenet/images` to an existing copy), and links are followed.
    """
    p = Path(base) / rel if base else Path(rel)
    if Path(rel).is_absolute() or ".." in p.parts:
        raise UserError(f"split file {source} lists '{rel}', which points outside the dataset folder")
    return p.as_posix()


def _label(value, source: Path, key: str) -> int:
    """A split's label: a whole number, not negative (1.7 or "3" or -1 is an error, never truncated)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"split file {source}: '{key}' has the label {value!r}; labels are whole numbers from 0")
    return value


def _split_path(spec: DatasetSpec, folder: Path) -> Path:
    return folder / spec.split_file


def generated_split_path(spec: DatasetSpec, folder: Path, split: dict) -> Path:
    """Generated splits live outside the user's data, keyed by the dataset folder's absolute path and by the
    split itself: a folder whose images changed gets a split of its own, and a run's record names the one it read."""
    folder_key = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    split_key = hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:12]
    return mugcp_home() / "splits" / f"{spec.name}-{folder_key}" / split_key / spec.split_file


def _read_split_json(spec: DatasetSpec, folder: Path) -> Splits:
    path = _split_path(spec, folder)
    notes = []
    if not path.is_file():
        if not spec.generate_split:
            raise UserError(f"split file {path} not found: download {spec.split_file} (CoOp's DATASETS.md links it) "
                            f"into {folder}")
        split = make_coop_split(spec, folder)  # from the folder as it is now: a listing, cheap next to any run
        generated = generated_split_path(spec, folder, split)
        if not generated.is_file():
            earlier = [p for p in generated.parent.parent.glob(f"*/{spec.split_file}") if p != generated]
            write_json_atomic(generated, split)
            changed = f" (the folder's images changed since {earlier[0]} was made)" if earlier else ""
            notes.append(f"{path.name} not found in {folder}: generated a CoOp-style split (seed 1) at "
                         f"{generated}{changed}; its test set is not the papers': put CoOp's {path.name} there for "
                         f"numbers comparable with theirs")
        else:
            notes.append(f"{path.name} not found in {folder}: using the generated split {generated} (not the papers' "
                         f"test set)")
        path = generated
    data = _load_json(path)
    if not isinstance(data, dict) or not all(k in data for k in ("train", "val", "test")):
        raise UserError(f"split file {path} lacks the train/val/test lists of a CoOp split file")
    parts = []
    for key in ("train", "val", "test"):
        try:
            parts.append([Item(_safe_relpath(spec.image_dir, str(rel), path), _label(label, path, key), str(cname))
                          for rel, label, cname in data[key]])
        except (TypeError, ValueError):
            raise UserError(f"split file {path}: '{key}' entries must be [relpath, label, classname]") from None
    return Splits(spec, folder, *parts, notes=notes, source=path)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _list_visible(path: Path, ignored=()) -> list[str]:
    return sorted(p for p in os.listdir(path) if not p.startswith(".") and p not in ignored)


def _list_images(path: Path) -> list[str]:
    """Image files of a class folder (a README or a thumbs file beside the images is not an image)."""
    return [p for p in _list_visible(path) if Path(p).suffix.lower() in IMAGE_SUFFIXES]


def make_coop_split(spec: DatasetSpec, folder: Path, seed: int = 1, p_train: float = 0.5, p_val: float = 0.2) -> dict:
    """CoOp's `read_and_split_data`: per sorted class folder, shuffle, 50/20/30 (rounded), label = folder index."""
    image_dir = folder / spec.image_dir
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} not found: lay {spec.name} out as CoOp does")
    rng = random.Random(seed)
    out = {"train": [], "val": [], "test": []}
    entries = _list_visible(image_dir, spec.ignored)
    broken = [c for c in entries if (image_dir / c).is_symlink() and not (image_dir / c).exists()]
    if broken:  # a class folder on a disk that is not there: left out, every later label would shift
        raise UserError(f"{image_dir / broken[0]} links to {os.readlink(image_dir / broken[0])}, which is not there: "
                        f"mount it, or remove the link")
    classes = [c for c in entries if (image_dir / c).is_dir()]  # a stray file (Thumbs.db) is no class
    for label, category in enumerate(classes):
        images = [f"{category}/{im}" for im in _list_images(image_dir / category)]
        rng.shuffle(images)
        n_train, n_val = round(len(images) * p_train), round(len(images) * p_val)
        if n_train == 0 or n_val == 0 or len(images) - n_train - n_val == 0:
            raise UserError(f"class folder {image_dir / category} has {len(images)} image(s): too few for a 50/20/30 split")
        name = spec.renames.get(category, category)
        for key, chunk in (("train", images[:n_train]), ("val", images[n_train:n_train + n_val]),
                           ("test", images[n_train + n_val:])):
            out[key].extend([im, label, name] for im in chunk)
    return out


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} not found: it is part of the dataset's standard release")
    return [ln.strip() for ln in _read_text(path, "list").splitlines() if ln.strip()]


def _read_aircraft(spec: DatasetSpec, folder: Path) -> Splits:
    classnames = _read_lines(folder / "variants.txt")
    cname2lab = {c: i for i, c in enumerate(classnames)}
    parts = []
    for split in ("train", "val", "test"):
        src = folder / f"images_variant_{split}.txt"
        items = []
        for line in _read_lines(src):
            imname, _, cname = line.partition(" ")
            if cname not in cname2lab:
                raise UserError(f"{src}: variant '{cname}' is not in variants.txt")
            items.append(Item(_safe_relpath(spec.image_dir, imname + ".jpg", src), cname2lab[cname], cname))
        parts.append(items)
    return Splits(spec, folder, *parts)


def read_classnames(folder: Path) -> dict[str, str]:
    """ImageNet's `classnames.txt`: "n01440764 tench" per line, in label order."""
    out = {}
    for line in _read_lines(folder / "classnames.txt"):
        wnid, _, name = line.partition(" ")
        out[wnid] = name
    return out


def _read_class_folders(folder: Path, sub: str, classes: list[tuple[int, str, str]]) -> list[Item]:
    """Items of `folder/sub/<class folder>/*` for (label, class folder, class name) triples."""
    return [Item(f"{sub}/{cls}/{im}", label, name)
            for label, cls, name in classes for im in _list_images(folder / sub / cls)]


def _named(folders: list[str], classnames: dict[str, str], folder: Path) -> list[tuple[int, str, str]]:
    unknown = [f for f in folders if f not in classnames]
    if unknown:
        raise UserError(f"class folder '{unknown[0]}' is not in {folder / 'classnames.txt'}")
    return [(label, f, classnames[f]) for label, f in enumerate(folders)]


def _read_imagenet(spec: DatasetSpec, folder: Path) -> Splits:
    classnames = read_classnames(folder)
    parts = []
    for split in ("train", "val"):
        sub = f"{spec.image_dir}/{split}"
        if not (folder / sub).is_dir():
            raise UserError(f"{folder / sub} not found: ImageNet needs images/train/<wnid>/ and images/val/<wnid>/")
        folders = sorted(p.name for p in os.scandir(folder / sub) if p.is_dir())
        parts.append(_read_class_folders(folder, sub, _named(folders, classnames, folder)))
    train, test = parts
    if not train or not test:
        raise UserError(f"no images found under {folder / spec.image_dir / ('train' if not train else 'val')}")
    return Splits(spec, folder, train, test, test)


def _read_folders(spec: DatasetSpec, folder: Path) -> Splits:
    classnames = read_classnames(folder)
    image_dir = folder / spec.image_dir
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} not found: lay {spec.name} out as CoOp does")
    if spec.name == "imagenetv2":  # folder i holds the i-th class of classnames.txt
        names = list(classnames.values())
        classes = [(i, str(i), names[i]) for i in range(len(names))]
    else:  # sorted wnid folders; -A and -R hold 200 of them, relabelled 0..199
        folders = [f for f in _list_visible(image_dir, spec.ignored) if (image_dir / f).is_dir()]
        classes = _named(folders, classnames, folder)
    test = _read_class_folders(folder, spec.image_dir, [c for c in classes if (image_dir / c[1]).is_dir()])
    if not test:
        raise UserError(f"no images found under {image_dir}: lay {spec.name} out as CoOp does")
    held = {item.label for item in test}
    empty = [c for c in classes if c[0] not in held]
    if empty:  # the classifier has a class per label: a class without images would shift every later label
        label, sub, name = empty[0]
        raise UserError(f"{spec.name} has no images of class '{name}' (label {label}, folder {image_dir / sub}"
                        f"{f'; {len(empty) - 1} more class(es) the same' if len(empty) > 1 else ''}): the papers "
                        f"test on every class; restore it from the dataset's release")
    return Splits(spec, folder, [], [], test)
