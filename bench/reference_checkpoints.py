"""Logits of checkpoints saved by the reference trainers, imported by mugcp, against the reference's own logits.

    python bench/reference_checkpoints.py DIR --clip ViT-B-16-quickgelu --pretrained CLIP.safetensors

DIR holds `images.pt` (a batch of preprocessed images) and one folder per reference run, each with
`meta.json` ({"method": "maple", ...}), the reference's output folder `seed1/` (Dassl's
`<model name>/model.pth.tar-N`), and the reference model's eval logits on those images for the
classes it trained on (`logits_base.pt`) and, after its own `load_model` into a model of other
classes, for those (`logits_novel.pt`). Producing them needs the reference repositories and
Dassl, so it happens outside mugcp; bench/RESULTS.md ("Importing the reference code's
checkpoints") says how. Each checkpoint is read as `mugcp import` reads it (weights-only, the
method's `from_reference`, the config its shapes imply) and the same images scored; prints one row
per run: relative and max absolute difference, and whether every argmax agrees, on both class sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mugcp.core.frozen_clip import load_clip
from mugcp.trainer.imports import find_checkpoints, read_reference_checkpoint, reference_model, reference_weights

BASE = "banded,blotchy,braided,bubbly,bumpy"
NOVEL = "cobwebbed,cracked,crosshatched,crystalline,dotted,fibrous"


def imported(folder: Path, frozen, classnames: list[str]):
    """The checkpoint as `mugcp import` builds it (its prompts' words read off its saved class prompts), without the
    command's CLIP check: a CLIP with other blocks (GELU) can be compared too."""
    method = json.loads((folder / "meta.json").read_text())["method"]
    (file,) = find_checkpoints(folder / "seed1")
    state, epoch = read_reference_checkpoint(file)
    weights, shaped, dtypes = reference_weights(state, method, file)
    model, _, _, implied = reference_model(state, weights, shaped, dtypes, method, frozen, classnames, "dtd", "b2n", 16,
                                           [], file)
    return model.eval(), epoch, implied


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--clip", required=True)
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--base", default=BASE, help="the classes the checkpoints were trained on, comma-separated")
    ap.add_argument("--novel", default=NOVEL, help="the other classes the reference scored, comma-separated")
    args = ap.parse_args()
    frozen = load_clip(args.clip, args.pretrained)
    images = torch.load(args.dir / "images.pt")
    print("| run (epoch) | config read off the shapes | base: rel / max abs | novel: rel / max abs | argmax agrees |")
    print("|---|---|---|---|---|")
    for folder in sorted(p for p in args.dir.iterdir() if (p / "meta.json").is_file()):
        model, epoch, implied = imported(folder, frozen, args.base.split(","))
        cells, agree = [], True
        for names, ref in ((args.base, "logits_base.pt"), (args.novel, "logits_novel.pt")):
            model.set_classnames(names.split(","))
            with torch.no_grad():
                ours = model(images).float()
            theirs = torch.load(folder / ref).float()
            cells.append(f"{float((ours - theirs).norm() / theirs.norm()):.2e} / {float((ours - theirs).abs().max()):.2e}")
            agree &= bool((ours.argmax(-1) == theirs.argmax(-1)).all())
        print(f"| {folder.name} ({epoch}) | `{' '.join(implied)}` | {cells[0]} | {cells[1]} | {'all' if agree else 'no'} |")


if __name__ == "__main__":
    main()
