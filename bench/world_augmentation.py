"""Does the training augmentation explain why prompt methods fall below zero-shot on the built-in world?

    python bench/world_augmentation.py --demo /tmp/wdemo [--methods coop,kgcoop,mugcp] [--seeds 1]

Needs a finished `mugcp demo --out DIR` (its data, stage-one cache and runs). Trains each method
again with the demo's schedule, but with the protocol's random resized crop (scale 0.08-1)
replaced by a plain resize, and prints Base / Novel beside the demo's own run of the same seed.
A diagnostic of the world, not a setting of the project: the crop stays the reference protocol's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torchvision.transforms as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

from mugcp.demo import WORLD_SCHEDULE, world_run  # noqa: E402
from mugcp.sweep import Job, run_job  # noqa: E402


def use_plain_resize() -> None:
    """From now on (and in processes forked after), the protocol's random resized crop is a plain resize.

    `core.frozen_clip.build_transforms` looks the crop up in torchvision's module when it builds them.
    """
    T.RandomResizedCrop = lambda size, scale=None, interpolation=None, **_: T.Resize(
        (size, size), interpolation=interpolation)


def accuracies(run_dir: Path) -> tuple[float, float]:
    return tuple(json.loads((run_dir / f"results_{s}.json").read_text())["accuracy"] for s in ("base", "novel"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--methods", default="coop,kgcoop,mugcp")
    ap.add_argument("--seeds", default="1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    use_plain_resize()
    out = Path(tempfile.mkdtemp(prefix="world-augmentation-"))
    print("method seed | demo (random resized crop) Base Novel | plain resize Base Novel")
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            demo_run = args.demo / "runs" / "dtd" / method / f"b2n_shots{WORLD_SCHEDULE['shots']}" / f"seed{seed}"
            record = json.loads((demo_run / "run.json").read_text())
            spec = world_run(record["root"], record["clip"], record["pretrained"], record["cache_dir"], method, seed)
            run_job(Job(spec, [(None, "base"), (None, "novel")]), out, torch.device("cpu"), 0, log=lambda _: None)
            (b0, n0), (b1, n1) = accuracies(demo_run), accuracies(spec.run_dir(out))
            print(f"{method} {seed} | {b0:.2f} {n0:.2f} | {b1:.2f} {n1:.2f}")


if __name__ == "__main__":
    main()
