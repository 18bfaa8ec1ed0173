"""Does MuGCP read SCP when SCP alone states the label, and does it still when the image side can fit instead?

    python bench/scp_pathway.py [--seeds 1,2,3] [--steps 240] [--set method.fusion=input]

On `world.scp_task` (5 classes, 8 samples of each to train on and 8 held out, 8 phrases per image of
which one is the class's own vector): MuGCP from the tiny random CLIP, trained for the demo's 240
SGD steps at its configured learning rate, with real and shuffled SCP, on images that are one shared
image (only SCP separates the classes) or fresh noise per sample (nothing in the image about the
class, but each training sample recognisable by its image). Prints the held-out accuracy (chance
20%) and the last training loss per seed. A diagnostic of the method, not a setting of the project.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from mugcp.core.frozen_clip import load_clip
from mugcp.trainer.config import load_config
from mugcp.trainer.methods import build_method
from mugcp.world.scp_task import fit_and_score, scp_task
from mugcp.world.tiny_clip import write_tiny_clip

NAMES = ["banded", "zig_zag", "polka-dotted", "woven", "honeycombed"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--set", action="append", default=[], help="a config override (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config, weights = write_tiny_clip(tempfile.mkdtemp(prefix="scp-pathway-"))
    frozen = load_clip(str(config), str(weights))
    cfg = load_config("mugcp", None, args.set)
    print(f"MuGCP, {args.steps} SGD steps at lr {cfg.optim.lr}, batch 8{', ' + ', '.join(args.set) if args.set else ''}:"
          " held-out accuracy (chance 20%) and last training loss per seed")
    for images in ("constant", "noise"):
        for shuffled in (False, True):
            accs, losses = [], []
            for seed in map(int, args.seeds.split(",")):
                train, test = scp_task(len(NAMES), 8, frozen.image_size, frozen.model.text_projection.shape[1], seed,
                                       images=images, shuffled=shuffled)
                torch.manual_seed(seed)
                model = build_method("mugcp", frozen, NAMES, "dtd", cfg.method)
                loss, acc = fit_and_score(model, train, test, args.steps, cfg.optim.lr, seed=seed)
                accs.append(100 * acc)
                losses.append(loss)
            print(f"  images {images:8s} SCP {'shuffled' if shuffled else 'real':8s} held-out "
                  f"{statistics.mean(accs):6.2f} ± {statistics.stdev(accs):5.2f}  "
                  f"({' '.join(f'{a:.1f}' for a in accs)}); last loss {' '.join(f'{v:.2f}' for v in losses)}")


if __name__ == "__main__":
    main()
