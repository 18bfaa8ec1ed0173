"""A synthetic ImageNet and its four shifted test sets, in the layouts CoOp reads them from.

Class i of the synthetic ImageNet is the texture of synthetic DTD's class i (`synth.draw_texture`),
named by DTD's name, so a tiny CLIP that knows the textures can classify both and prompts learned
on one can be tested on the other (cross-dataset transfer). The variants keep ImageNet's class list
(`classnames.txt`, "wnid name" per line) and differ as the real ones do: -V2 has folders named by
label index, -Sketch one folder per wnid, -A and -R a subset of the wnids (the real ones hold 200 of
1,000), relabelled 0..n-1 in wnid order; their images are drawn with other jitter (a shifted domain).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from mugcp.core.coop_datasets import DATASETS
from mugcp.core.files import write_bytes_atomic
from mugcp.world.synth import DTD_CLASSES, draw_texture

VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def wnid(label: int) -> str:
    """A WordNet-style id for synthetic class `label` (sorted wnids keep the label order, as ImageNet's do)."""
    return f"n{10_000_000 + label:08d}"


def _write_images(folder: Path, label: int, count: int, rng: np.random.Generator, size: int, stem: str) -> None:
    for j in range(count):
        pixels = draw_texture(label % len(DTD_CLASSES), rng, size)
        buf = BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        write_bytes_atomic(folder / f"{stem}_{j:04d}.JPEG", buf.getvalue())


def _classnames(folder: Path, classes: int) -> None:
    lines = "".join(f"{wnid(i)} {DTD_CLASSES[i % len(DTD_CLASSES)].replace('-', ' ')}\n" for i in range(classes))
    write_bytes_atomic(folder / "classnames.txt", lines.encode())


def subset_labels(name: str, classes: int) -> list[int]:
    """The labels of ImageNet that a variant holds: all, or every other one for -A and -R."""
    return list(range(0, classes, 2)) if name in ("imagenet_a", "imagenet_r") else list(range(classes))


def write_synthetic_imagenet(out: str | Path, classes: int = 24, train: int = 6, test: int = 4, size: int = 32,
                             seed: int = 0) -> Path:
    """`OUT/imagenet/` with classnames.txt and images/{train,val}/<wnid>/; returns that folder."""
    folder = Path(out) / DATASETS["imagenet"].folder
    rng = np.random.default_rng(seed)
    _classnames(folder, classes)
    for label in range(classes):
        for split, count in (("train", train), ("val", test)):
            _write_images(folder / "images" / split / wnid(label), label, count, rng, size, f"{wnid(label)}_{split}")
    return folder


def write_synthetic_variant(out: str | Path, name: str, classes: int = 24, per_class: int = 3, size: int = 32,
                            seed: int = 1) -> Path:
    """One of ImageNet-V2, -Sketch, -A, -R in its release layout; returns its folder."""
    spec = DATASETS[name]
    folder = Path(out) / spec.folder
    rng = np.random.default_rng(100 + seed + VARIANTS.index(name))
    _classnames(folder, classes)
    for label in subset_labels(name, classes):
        sub = str(label) if name == "imagenetv2" else wnid(label)
        _write_images(folder / spec.image_dir / sub, label, per_class, rng, size, f"{name}_{label}")
    return folder
