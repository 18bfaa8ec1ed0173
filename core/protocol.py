"""The CoOp/CoCoOp evaluation protocol, exactly: few-shot draw, base/novel split, harmonic mean.

Numbers are comparable with the published tables only if these give the same images and
labels as the reference code for the same seed:

- `set_seed(seed)` seeds Python's `random`, numpy and torch before anything else draws.
- `draw_fewshot`: for each split, group items by label in order of first appearance and take
  `random.sample(items, k)` per label (all items when fewer than k, drawing nothing, as Dassl's
  `generate_fewshot_dataset` does): train with k shots, then val with min(k, 4). The classes that
  had fewer are recorded in the draw and named on one line (`Draw.note`). ImageNet has no val set:
  its val is its test set and is not drawn.
- `subsample_classes`: sort the train labels; base = the first ceil(n/2), novel = the rest,
  relabelled from 0; applied to train, val and test alike.
- `harmonic_mean` of seed-averaged base and novel accuracies (not a mean of per-seed HMs).

ImageNet is the exception the reference cannot make exact: its reader lists each class folder in the file
system's order (not sorted), caches the list, and draws from that order, so its draw for a seed depends on
the machine. mugcp lists sorted (the same draw everywhere), and where the reference has left its draw in the
data folder (`imagenet/split_fewshot/shot_K-seed_S.pkl`, written by CoOp's, CoCoOp's, MaPLe's, KgCoOp's and
PromptSRC's readers alike) it trains on that very draw instead (`reference_draw`), as the reference would.
"""

from __future__ import annotations

import json
import math
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mugcp.core.coop_datasets import Item, Splits
from mugcp.core.errors import UserError
from mugcp.core.files import file_sha256, write_json_atomic

SEEDS = (1, 2, 3)
SUBSAMPLES = ("base", "novel", "all")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def group_by_label(items: list[Item]) -> dict[int, list[Item]]:
    """Items per label, labels in order of first appearance (Dassl's `split_dataset_by_label`)."""
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    return groups


def short_classes(items: list[Item], k: int) -> list[list[int]]:
    """[label, images] of the classes with fewer than k items, in order of first appearance."""
    return [[label, len(group)] for label, group in group_by_label(items).items() if len(group) < k]


def fewshot(items: list[Item], k: int) -> list[Item]:
    """Dassl's `generate_fewshot_dataset` (repeat=False) on the global `random` state."""
    out = []
    for group in group_by_label(items).values():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


@dataclass
class Draw:
    """What one seed of one setting trains and validates on, saved as JSON for audit and reruns."""

    dataset: str
    seed: int
    shots: int
    train: list[Item]
    val: list[Item]
    # {"train"|"val": [[label, images], ...]}: classes with fewer images than asked, all of them taken
    fewer_than_shots: dict[str, list[list[int]]] = field(default_factory=dict)
    source: dict | None = None  # the reference's own draw it was read from ({"file", "sha256"}); None: drawn here

    @property
    def note(self) -> str | None:
        """One line naming how many classes had fewer images than asked, or None when none had."""
        parts = []
        for split, k in (("train", self.shots), ("val", min(self.shots, 4))):
            short = self.fewer_than_shots.get(split) or []
            if short:
                sizes = sorted(n for _, n in short)
                parts.append(f"{len(short)} class(es) have fewer than {k} {split} images ({sizes[0]}-{sizes[-1]}), "
                             f"all taken")
        if self.source:
            parts.append(f"the reference's own draw, read from {self.source['file']}")
        return f"few-shot draw of {self.dataset}: " + "; ".join(parts) if parts else None

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "seed": self.seed, "shots": self.shots,
                "train": [[i.path, i.label, i.classname] for i in self.train],
                "val": [[i.path, i.label, i.classname] for i in self.val],
                "fewer_than_shots": self.fewer_than_shots, **({"source": self.source} if self.source else {})}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Draw":
        d = json.loads(Path(path).read_text())
        return cls(d["dataset"], d["seed"], d["shots"], [Item(*x) for x in d["train"]],
                   [Item(*x) for x in d["val"]], d.get("fewer_than_shots", {}), d.get("source"))


def draw_fewshot(splits: Splits, shots: int, seed: int) -> Draw:
    """Seed everything, then draw `shots` per class over all classes of train and min(shots, 4) of val.

    A class with fewer images than asked gives all of them (the reference's rule); the draw records it.
    """
    if shots < 1:
        raise UserError(f"--shots must be at least 1 (got {shots})")
    if not splits.train:
        raise UserError(f"{splits.spec.name} has no training images (it is a test-only dataset)")
    set_seed(seed)
    source = reference_draw_file(splits, shots, seed)
    train = read_reference_draw(source, splits) if source else fewshot(splits.train, shots)
    short = {"train": short_classes(splits.train, shots)}
    if splits.spec.kind == "imagenet":
        val = splits.val
    else:
        val = fewshot(splits.val, min(shots, 4))
        short["val"] = short_classes(splits.val, min(shots, 4))
    return Draw(splits.spec.name, seed, shots, train, val, {k: v for k, v in short.items() if v},
                {"file": str(source), "sha256": file_sha256(source)} if source else None)


def reference_draw_file(splits: Splits, shots: int, seed: int) -> Path | None:
    """The reference's cached ImageNet draw for (shots, seed) in the data folder, if it is there."""
    if splits.spec.kind != "imagenet":
        return None
    path = splits.root / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"
    return path if path.is_file() else None


class _Datum:
    """What Dassl's `Datum` holds (`_impath`, `_label`, `_classname`, `_domain`), without its code."""


class _DrawUnpickler(pickle.Unpickler):
    """Reads a reference draw running none of its code: the one class it may name is Dassl's Datum."""

    def find_class(self, module, name):
        if (module, name) == ("dassl.data.datasets.base_dataset", "Datum"):
            return _Datum
        raise pickle.UnpicklingError(f"it names {module}.{name}, not Dassl's Datum")


def read_reference_draw(path: Path, splits: Splits) -> list[Item]:
    """The training shots of a reference draw, in its order, as this folder's items (the same image, label and
    class); anything else is refused on one line."""
    try:
        with open(path, "rb") as f:
            data = _DrawUnpickler(f).load()
        drawn = [(d._impath, d._label, d._classname) for d in data["train"]]
    except Exception as e:  # whatever a damaged or foreign pickle raises: none of its code has run
        raise UserError(f"{path} is not a reference draw ({type(e).__name__}: {str(e)[:100]}): move it away to "
                        f"draw anew") from None
    items = {it.path: it for it in splits.train}
    out = []
    for impath, label, classname in drawn:
        relative = str(impath).replace("\\", "/").rpartition(f"/{splits.spec.image_dir}/train/")
        item = items.get(f"{splits.spec.image_dir}/train/{relative[2]}") if relative[1] else None
        if item is None or (item.label, item.classname) != (label, classname):
            raise UserError(f"{path} draws {impath} ({classname}, label {label}), which {splits.root} does not hold "
                            f"as such: it was drawn from other data; move it away to draw anew")
        out.append(item)
    return out


def subsample_classes(*parts: list[Item], subsample: str = "all", labels_from: list[Item] | None = None):
    """Keep base (first ceil(n/2) sorted labels) or novel classes, relabelled from 0; "all" keeps all.

    Labels are taken from the first list (the train split, as in the reference) unless `labels_from`.
    """
    if subsample not in SUBSAMPLES:
        raise UserError(f"unknown class subset '{subsample}': choose base, novel or all")
    if subsample == "all":
        return parts
    labels = sorted({it.label for it in (labels_from if labels_from is not None else parts[0])})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([Item(it.path, relabel[it.label], it.classname) for it in part if it.label in relabel]
                 for part in parts)


def harmonic_mean(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
