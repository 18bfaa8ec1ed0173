"""A synthetic DTD in CoOp's exact layout whose classes are attributes a sentence can state.

Every texture is drawn from five attributes: a pattern family (stripes, dots, grid, zigzags,
checks, rings, waves, blotches, spiral, crosshatch), a foreground and a background colour (ten
named colours), a scale (fine, medium, coarse) and, for the oriented families (stripes, zigzags,
waves), an orientation (horizontal, vertical, diagonal). A class fixes four of them
(`CLASS_ATTRIBUTES`): its family is the one its name suggests (`FAMILY_OF`: "striped" is stripes,
"polka-dotted" dots), its foreground colour differs from every other class of its family, and its
scale and orientation are drawn once. The background colour is drawn per image (a nuisance, as
colour is in the real DTD), so neither colour nor pattern alone names the class. Each image
also jitters phase, position, period, angle, shade and noise. `describe(attributes)` states an
image's attributes as the short phrases an MLLM is asked for: what the world's describer learns
to say, and what its answers are scored against (`attributes.json` beside the split file holds
every image's attributes).

`$OUT/dtd/images/<class>/<class>_NNNN.jpg` plus `split_zhou_DescribableTextures.json`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Optional

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

FAMILIES = ("stripes", "dots", "grid", "zigzags", "checks", "rings", "waves", "blotches", "spiral", "crosshatch")
ORIENTED = ("stripes", "zigzags", "waves")
COLOURS = {"red": (0.85, 0.12, 0.12), "orange": (0.95, 0.55, 0.1), "yellow": (0.95, 0.9, 0.15),
           "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.9), "purple": (0.55, 0.2, 0.7),
           "pink": (0.97, 0.6, 0.75), "brown": (0.45, 0.28, 0.12), "black": (0.05, 0.05, 0.05),
           "white": (0.95, 0.95, 0.95)}
SCALES = {"fine": 1 / 12, "medium": 1 / 7, "coarse": 1 / 4}  # period as a fraction of the image side
ORIENTATIONS = {"horizontal": np.pi / 2, "vertical": 0.0, "diagonal": np.pi / 4}  # angle of the normal to the lines
FAMILY_OF = {
    **dict.fromkeys(["banded", "lined", "striped", "stratified", "pleated"], "stripes"),
    **dict.fromkeys(["dotted", "polka-dotted", "freckled", "sprinkled", "studded"], "dots"),
    **dict.fromkeys(["grid", "meshed", "waffled", "honeycombed", "perforated"], "grid"),
    **dict.fromkeys(["zigzagged", "braided", "grooved", "scaly"], "zigzags"),
    **dict.fromkeys(["chequered", "woven", "knitted", "interlaced"], "checks"),
    **dict.fromkeys(["bubbly", "pitted", "porous", "potholed", "bumpy"], "rings"),
    **dict.fromkeys(["wrinkled", "marbled", "veined", "fibrous", "frilly"], "waves"),
    **dict.fromkeys(["blotchy", "stained", "smeared", "flecked", "matted"], "blotches"),
    **dict.fromkeys(["spiralled", "swirly", "paisley", "cobwebbed"], "spiral"),
    **dict.fromkeys(["crosshatched", "lacelike", "cracked", "gauzy", "crystalline"], "crosshatch"),
}


@dataclass(frozen=True)
class Attributes:
    family: str
    fg: str
    bg: Optional[str]  # None in a class's attributes: drawn per image
    scale: str
    orientation: Optional[str] = None  # only for the oriented families

    def to_dict(self) -> dict:
        return asdict(self)


def describe(a: Attributes) -> list[str]:
    """The attributes as short label-free phrases, e.g. ["red stripes", "white background", "fine pattern", "diagonal lines"]."""
    out = [f"{a.fg} {a.family}", f"{a.bg} background", f"{a.scale} pattern"]
    if a.orientation:
        out.append(f"{a.orientation} lines")
    return out


def apparent_scale(scale: str, zoom: float) -> str:
    """The scale a viewer names for a pattern of `scale` seen magnified `zoom` times (a crop shown at full size)."""
    period = SCALES[scale] * zoom
    return min(SCALES, key=lambda name: abs(np.log(period / SCALES[name])))


def _contrast(fg: str, bg: str) -> bool:
    return fg != bg and float(np.abs(np.subtract(COLOURS[fg], COLOURS[bg])).sum()) > 0.6


def _background(fg: str, rng: np.random.Generator) -> str:
    choices = [c for c in COLOURS if _contrast(fg, c)]
    return choices[rng.integers(len(choices))]


def random_attributes(rng: np.random.Generator) -> Attributes:
    """Any combination of the world's attributes (contrasting colours), for models that must not see classes."""
    family = FAMILIES[rng.integers(len(FAMILIES))]
    fg = list(COLOURS)[rng.integers(len(COLOURS))]
    orientation = list(ORIENTATIONS)[rng.integers(3)] if family in ORIENTED else None
    return Attributes(family, fg, _background(fg, rng), list(SCALES)[rng.integers(3)], orientation)


def image_attributes(classname: str, rng: np.random.Generator) -> Attributes:
    """The attributes of one image of a class: the class's four, and a background colour drawn from `rng`."""
    a = CLASS_ATTRIBUTES[classname]
    return replace(a, bg=_background(a.fg, rng))


def _assign_classes() -> dict[str, Attributes]:
    """Each class: its name's family, a foreground colour unique in that family, a scale and orientation."""
    rng = np.random.default_rng(47)
    out: dict[str, Attributes] = {}
    for name in DTD_CLASSES:
        family = FAMILY_OF[name]
        taken = {a.fg for a in out.values() if a.family == family}
        free = [c for c in COLOURS if c not in taken]
        orientation = list(ORIENTATIONS)[rng.integers(3)] if family in ORIENTED else None
        out[name] = Attributes(family, free[rng.integers(len(free))], None, list(SCALES)[rng.integers(3)],
                               orientation)
    return out


CLASS_ATTRIBUTES: dict[str, Attributes] = _assign_classes()


def _pattern(a: Attributes, u: np.ndarray, v: np.ndarray, r: np.ndarray, theta: np.ndarray, period: float,
             rng: np.random.Generator) -> np.ndarray:
    """The foreground mask on rotated coordinates u, v (polar r, theta about a jittered centre).

    The foreground covers a minority of the image (about a fifth to two fifths), so which colour is
    the pattern's and which the background's can be seen, as a sentence states it.
    """
    f = 2 * np.pi / period
    s = np.sin
    if a.family == "stripes":
        return (s(f * u) > 0.5).astype(float)
    if a.family == "dots":
        return (np.cos(f * u) * np.cos(f * v) > 0.5).astype(float)
    if a.family == "grid":
        return ((np.abs(s(f * u / 2)) < 0.25) | (np.abs(s(f * v / 2)) < 0.25)).astype(float)
    if a.family == "zigzags":
        tri = 2 * np.abs((v / period) % 1 - 0.5)  # a triangle wave across the lines
        return (s(f * (u + 0.35 * period * tri)) > 0.5).astype(float)
    if a.family == "checks":  # every other cell of a checkerboard, inset so that the background surrounds it
        cu, cv = u / period * 2, v / period * 2
        inset = (np.abs(cu % 1 - 0.5) < 0.38) & (np.abs(cv % 1 - 0.5) < 0.38)
        return (((np.floor(cu) + np.floor(cv)) % 2 == 0) & inset).astype(float)
    if a.family == "rings":
        return (s(f * r) > 0.5).astype(float)
    if a.family == "waves":
        return (s(f * u + 2.2 * s(f / 2 * v)) > 0.5).astype(float)
    if a.family == "blotches":
        cells = max(2, int(round(u.shape[0] / period)) + 1)
        small = rng.random((cells, cells))
        big = np.array(Image.fromarray((small * 255).astype(np.uint8)).resize(u.shape[::-1], Image.BICUBIC)) / 255
        return (big > 0.62).astype(float)
    if a.family == "spiral":
        return (s(f * r + 2 * theta) > 0.5).astype(float)
    return ((np.abs(s(f * (u + v) / 2.8)) < 0.2) | (np.abs(s(f * (u - v) / 2.8)) < 0.2)).astype(float)  # crosshatch


def draw(a: Attributes, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One RGB uint8 image with attributes `a`; `rng` draws the jitter (phase, centre, period, angle, shade, noise)."""
    period = SCALES[a.scale] * size * rng.uniform(0.9, 1.1)
    if a.orientation is not None:
        angle = ORIENTATIONS[a.orientation] + rng.normal(0, 0.08)
        if a.orientation == "diagonal" and rng.random() < 0.5:
            angle += np.pi / 2  # both diagonals
    else:
        angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(float) - size / 2
    x, y = x + rng.uniform(-size / 4, size / 4), y + rng.uniform(-size / 4, size / 4)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    mask = _pattern(a, u, v, np.hypot(x, y), np.arctan2(y, x), period, rng)[..., None]
    fg = np.clip(np.array(COLOURS[a.fg]) + rng.normal(0, 0.04, 3), 0, 1)
    bg = np.clip(np.array(COLOURS[a.bg]) + rng.normal(0, 0.04, 3), 0, 1)
    img = mask * fg + (1 - mask) * bg + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def draw_texture(class_index: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One image of DTD class `class_index` (its attributes, a background colour and jitter from `rng`)."""
    return draw(image_attributes(DTD_CLASSES[class_index], rng), rng, size)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_synthetic_dtd(out: str | Path, per_class: int = 10, seed: int = 0, size: int = 64) -> Path:
    """Write the synthetic DTD under `out/dtd`, its CoOp split (50/20/30 per class) and each image's attributes."""
    spec = DATASETS["dtd"]
    folder = Path(out) / spec.folder
    rng = np.random.default_rng(seed)
    truth = {}
    for name in DTD_CLASSES:
        for j in range(per_class):
            rel = f"{spec.image_dir}/{name}/{name}_{j + 1:04d}.jpg"
            attributes = image_attributes(name, rng)
            write_bytes_atomic(folder / rel, jpeg(draw(attributes, rng, size)))
            truth[rel] = attributes.to_dict()
    write_json_atomic(folder / "attributes.json", truth)
    write_json_atomic(folder / spec.split_file, make_coop_split(spec, folder, seed=1))
    return folder


def read_answer(text: str) -> dict[str, Optional[str]]:
    """The attributes an answer states, read from its phrases' forms (see `describe`); None where it states none."""
    text = (text or "").lower()
    families = "|".join(FAMILIES)
    found = re.search(rf"\b(\w+) ({families})\b", text) or re.search(rf"\b()({families})\b", text)

    def word(pattern: str) -> Optional[str]:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    return {"family": found.group(2) if found else None, "fg": (found.group(1) or None) if found else None,
            "bg": word(r"\b(\w+) background\b"), "scale": word(r"\b(\w+) pattern\b"),
            "orientation": word(r"\b(\w+) lines\b")}


def score_answers(answers: dict[str, str], truth: dict[str, dict]) -> dict[str, float]:
    """Per attribute, the fraction of `answers` (path -> text) that state the image's true value (path -> attributes)."""
    hits = {k: 0 for k in ("family", "fg", "bg", "scale", "orientation", "all")}
    for path, text in answers.items():
        said, true = read_answer(text), truth[path]
        right = {k: said[k] == true[k] for k in hits if k != "all"}
        for k, ok in right.items():
            hits[k] += ok
        hits["all"] += all(right.values())
    return {k: v / max(len(answers), 1) for k, v in hits.items()}
