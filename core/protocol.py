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
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mugcp.core.coop_datasets import Item, Splits
from mugcp.core.errors import UserError
from mugcp.core.files import write_json_atomic

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
        return f"few-shot draw of {self.dataset}: " + "; ".join(parts) if parts else None

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "seed": self.seed, "shots": self.shots,
                "train": [[i.path, i.label, i.classname] for i in self.train],
                "val": [[i.path, i.label, i.classname] for i in self.val],
                "fewer_than_shots": self.fewer_than_shots}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Draw":
        d = json.loads(Path(path).read_text())
        return cls(d["dataset"], d["seed"], d["shots"], [Item(*x) for x in d["train"]],
                   [Item(*x) for x in d["val"]], d.get("fewer_than_shots", {}))


def draw_fewshot(splits: Splits, shots: int, seed: int) -> Draw:
    """Seed everything, then draw `shots` per class over all classes of train and min(shots, 4) of val.

    A class with fewer images than asked gives all of them (the reference's rule); the draw records it.
    """
    if shots < 1:
        raise UserError(f"--shots must be at least 1 (got {shots})")
    if not splits.train:
        raise UserError(f"{splits.spec.name} has no training images (it is a test-only dataset)")
    set_seed(seed)
    train = fewshot(splits.train, shots)
    short = {"train": short_classes(splits.train, shots)}
    if splits.spec.kind == "imagenet":
        val = splits.val
    else:
        val = fewshot(splits.val, min(shots, 4))
        short["val"] = short_classes(splits.val, min(shots, 4))
    return Draw(splits.spec.name, seed, shots, train, val, {k: v for k, v in short.items() if v})


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
