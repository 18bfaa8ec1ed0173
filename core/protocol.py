"""The CoOp/CoCoOp evaluation protocol, exactly: few-shot draw, base/novel split, harmonic mean.

Numbers are comparable with the published tables only if these give the same images and
labels as the reference code for the same seed:

- `set_seed(seed)` seeds Python's `random`, numpy and torch before anything else draws.
- `draw_fewshot`: for each split, group items by label in order of first appearance and take
  `random.sample(items, k)` per label (all items when fewer than k): train with k shots, then
  val with min(k, 4). ImageNet has no val set: its val is its test set and is not drawn.
- `subsample_classes`: sort the train labels; base = the first ceil(n/2), novel = the rest,
  relabelled from 0; applied to train, val and test alike.
- `harmonic_mean` of seed-averaged base and novel accuracies (not a mean of per-seed HMs).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
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

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "seed": self.seed, "shots": self.shots,
                "train": [[i.path, i.label, i.classname] for i in self.train],
                "val": [[i.path, i.label, i.classname] for i in self.val]}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Draw":
        d = json.loads(Path(path).read_text())
        return cls(d["dataset"], d["seed"], d["shots"], [Item(*x) for x in d["train"]],
                   [Item(*x) for x in d["val"]])


def draw_fewshot(splits: Splits, shots: int, seed: int) -> Draw:
    """Seed everything, then draw `shots` per class over all classes of train and min(shots, 4) of val."""
    if shots < 1:
        raise UserError(f"--shots must be at least 1 (got {shots})")
    if not splits.train:
        raise UserError(f"{splits.spec.name} has no training images (it is a test-only dataset)")
    smallest = min(len(g) for g in group_by_label(splits.train).values())
    if shots > smallest:
        raise UserError(f"--shots {shots} is more than the {smallest} training image(s) of the smallest class of "
                        f"{splits.spec.name}: use --shots {smallest} or fewer")
    set_seed(seed)
    train = fewshot(splits.train, shots)
    val = splits.val if splits.spec.kind == "imagenet" else fewshot(splits.val, min(shots, 4))
    return Draw(splits.spec.name, seed, shots, train, val)


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
