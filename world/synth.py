"""A synthetic DTD in CoOp's exact layout, so everything runs with nothing downloaded.

`$OUT/dtd/images/<class>/<class>_NNNN.jpg` plus `split_zhou_DescribableTextures.json`, with
DTD's 47 class names. Each class is a procedural texture family (stripes, dots, grids,
zigzags, checks, rings, waves, noise, ...) with its own frequency, angle and colours; each
image jitters phase, angle, scale and colour, so classes really differ and a classifier can
learn them, but no two images are the same.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from mugcp.core.coop_datasets import DATASETS, make_coop_split
from mugcp.core.files import write_bytes_atomic, write_json_atomic

DTD_CLASSES = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
    "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
    "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
]

_FAMILIES = ["stripes", "dots", "grid", "zigzag", "checks", "rings", "waves", "noise", "spiral", "crosshatch"]


def _pattern(family: str, u: np.ndarray, v: np.ndarray, r: np.ndarray, theta: np.ndarray,
             freq: float, rng: np.random.Generator) -> np.ndarray:
    """A texture in [0, 1] on rotated coordinates u, v (polar r, theta about the centre)."""
    s = np.sin
    if family == "stripes":
        return 0.5 + 0.5 * s(freq * u)
    if family == "dots":
        return (np.cos(freq * u) * np.cos(freq * v) > 0.6).astype(float)
    if family == "grid":
        return ((np.abs(s(freq * u)) < 0.25) | (np.abs(s(freq * v)) < 0.25)).astype(float)
    if family == "zigzag":
        return 0.5 + 0.5 * s(freq * v + 2.0 * np.abs(((freq / 2 * u) % 2) - 1) * 3)
    if family == "checks":
        return ((np.floor(freq * u / np.pi) + np.floor(freq * v / np.pi)) % 2).astype(float)
    if family == "rings":
        return 0.5 + 0.5 * s(freq * r)
    if family == "waves":
        return 0.5 + 0.5 * s(freq * u + 2.5 * s(freq / 3 * v))
    if family == "noise":
        small = rng.random((8, 8))
        reps = (u.shape[0] // 8 + 1, u.shape[1] // 8 + 1)
        return np.kron(small, np.ones(reps))[: u.shape[0], : u.shape[1]]
    if family == "spiral":
        return 0.5 + 0.5 * s(freq * r + 3 * theta)
    return 0.5 + 0.25 * (s(freq * u) + s(freq * v))  # crosshatch


def draw_texture(class_index: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One RGB uint8 image of class `class_index`; class sets the style, `rng` the jitter."""
    style = np.random.default_rng(1000 + class_index)  # fixed per class
    family = _FAMILIES[class_index % len(_FAMILIES)]
    freq = (0.25 + 0.12 * (class_index // len(_FAMILIES))) * rng.uniform(0.9, 1.1)
    angle = style.uniform(0, np.pi) + rng.normal(0, 0.1)
    fg, bg = style.uniform(0, 1, 3), style.uniform(0, 1, 3)
    y, x = np.mgrid[0:size, 0:size].astype(float) - size / 2
    x, y = x + rng.uniform(-8, 8), y + rng.uniform(-8, 8)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    t = _pattern(family, u, v, np.hypot(x, y), np.arctan2(y, x), freq, rng)
    img = t[..., None] * fg + (1 - t[..., None]) * bg
    img = img + rng.normal(0, 0.04, img.shape) + rng.normal(0, 0.05, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_synthetic_dtd(out: str | Path, per_class: int = 10, seed: int = 0, size: int = 64) -> Path:
    """Write the synthetic DTD under `out/dtd` and its CoOp split (50/20/30 per class); return the folder."""
    spec = DATASETS["dtd"]
    folder = Path(out) / spec.folder
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(DTD_CLASSES):
        for j in range(per_class):
            buf = BytesIO()
            Image.fromarray(draw_texture(ci, rng, size)).save(buf, format="JPEG", quality=90)
            write_bytes_atomic(folder / spec.image_dir / name / f"{name}_{j + 1:04d}.jpg", buf.getvalue())
    write_json_atomic(folder / spec.split_file, make_coop_split(spec, folder, seed=1))
    return folder
