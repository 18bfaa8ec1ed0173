"""Which CPU code paths change the bytes of a world build: a short pre-training of the world's CLIP, once per setting.

    python bench/world_build_paths.py [--steps 30]

Each setting runs in its own process (the variables are read when torch, oneDNN and MKL load) and builds
as `model_cache`'s child does (`run_builder`: the build's thread count and deterministic algorithms), but
with the setting's variables in place of `PINNED_NUMERICS`; it prints the CPU capability torch used and
the weights' sha256. Settings that print the same digest build the same model; the last is
`PINNED_NUMERICS`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mugcp.world.model_cache import PINNED_NUMERICS, run_builder
from mugcp.world.tiny_clip import WORLD_CLIP_RECIPE

SETTINGS = [
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {"MKL_CBWR": "COMPATIBLE"},
    PINNED_NUMERICS,
]


def child(steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        run_builder("mugcp.world.tiny_clip:build_world_clip", Path(folder), {**WORLD_CLIP_RECIPE, "steps": steps})
        built = json.loads((Path(folder) / "built_with.json").read_text())
    print(built["cpu_capability"], built["sha256"]["mugcp-tiny-clip.safetensors"][:16])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.steps)
    clean = {k: v for k, v in os.environ.items() if k not in {name for s in SETTINGS for name in s}}
    for setting in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env={**clean, **setting},
                             capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()  # after the build's log
        name = " ".join(f"{k}={v}" for k, v in setting.items()) or "(none: the machine's own paths)"
        print(f"{name:70} {out[0]:8} {out[1]}")


if __name__ == "__main__":
    main()
