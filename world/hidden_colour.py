"""The world as a colour-blind CLIP sees it, with SCP from a describer that sees the colours.

On the world every attribute the describer states is drawn at CLIP's input size and CLIP reads it,
so SCP is redundant with the image. MuGCP's premise is the opposite: the MLLM sees what CLIP's image
encoder does not. A class's foreground colour is what tells it from the rest of its family, so a
greyscale copy of the data (what CLIP is shown) hides part of what names a class, while the
describer's answers on the colour originals (what SCP is made of) still state it.
`bench/world_hidden_colour.py` runs MuGCP on it; tests/test_demo.py asserts what it measured.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mugcp.core.files import write_json_atomic
from mugcp.core.scp_cache import answered_phrases
from mugcp.world.synth import jpeg


def grey_copy(data: Path, out: Path) -> Path:
    """The world's dataset under `data` copied to `out` with every JPEG in greyscale (luminance in 3 channels,
    the world's JPEG quality) and the split and attribute files as they are; made once (`grey.json` last)."""
    done = out / "dtd" / "grey.json"
    if done.is_file():
        return out
    for src in sorted((data / "dtd").rglob("*")):
        if src.is_dir() or src.name == "world.json":  # the colour data's stamp: not this folder's
            continue
        dst = out / "dtd" / src.relative_to(data / "dtd")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".jpg":
            dst.write_bytes(jpeg(np.asarray(Image.open(src).convert("L").convert("RGB"))))
        else:
            shutil.copyfile(src, dst)
    write_json_atomic(done, {"from": str(data)})
    return out


def colour_answers(cache: Path, grey: Path) -> dict[str, str]:
    """sha256 of each grey image under `grey` whose colour original the describer answered in the stage-one
    `cache` -> that answer's phrases as JSON (what a stand-in server hands back for the grey image)."""
    return {hashlib.sha256((grey / "dtd" / path).read_bytes()).hexdigest(): json.dumps(phrases)
            for path, phrases in answered_phrases(cache, "dtd").items()}
