"""Which CPU code paths change the bytes of a world build: a short pre-training of the world's CLIP, once per setting.

    python bench/world_build_paths.py [--steps 30]

Each setting runs in its own process (the variables are read when torch, oneDNN and MKL load), in
process, with the build's thread count and deterministic algorithms but without `model_cache`'s
pinned code paths, and prints the CPU capability torch used and the weights' sha256. Settings that
print the same digest build the same model; `model_cache.PINNED_NUMERICS` is the last one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
]


def child(steps: int) -> None:
    import torch

    from mugcp.world.model_cache import BUILD_THREADS
    from mugcp.world.tiny_clip import WORLD_CLIP_RECIPE, build_world_clip

    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as folder:
        build_world_clip(Path(folder), {**WORLD_CLIP_RECIPE, "steps": steps}, log=lambda _: None)
        digest = hashlib.sha256((Path(folder) / "mugcp-tiny-clip.safetensors").read_bytes()).hexdigest()[:16]
    print(torch.backends.cpu.get_cpu_capability(), digest)


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
                             capture_output=True, text=True, check=True).stdout.split()
        name = " ".join(f"{k}={v}" for k, v in setting.items()) or "(none: the machine's own paths)"
        print(f"{name:70} {out[0]:8} {out[1]}")


if __name__ == "__main__":
    main()
