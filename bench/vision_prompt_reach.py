"""How far do a trained run's vision prompts move CLIP's image features? Prompted against frozen, per test image.

    python bench/vision_prompt_reach.py RUN [RUN ...] [--split base]

For each finished run of a method with vision prompts (MaPLe, PromptSRC, MuGCP), every test image of
the split goes through the trained model, and the image feature its prompted vision tower gives is
compared with the frozen CLIP's feature of the same image (cosine, mean over images), beside the
mean cosine of two different test images' frozen features, for scale. A cosine near 1 says the
prompts leave the image side where it was, so the run learnt through its text side.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mugcp.core.coop_datasets import load_dataset  # noqa: E402
from mugcp.trainer.conditions import Conditions  # noqa: E402
from mugcp.trainer.evaluation import eval_items, trained_method  # noqa: E402
from mugcp.trainer.loaders import iterate, make_loader  # noqa: E402
from mugcp.trainer.methods import maple, mugcp_method, promptsrc  # noqa: E402
from mugcp.trainer.runs import RunSpec, read_run  # noqa: E402
from mugcp.trainer.train import condition_context  # noqa: E402

PROMPTED = (maple, promptsrc, mugcp_method)  # the method modules that call surgery's encode_image with prompts


def reach(run: Path, split: str, device: torch.device) -> str:
    info = read_run(run)
    spec = RunSpec.from_record(info, run)
    model, frozen = trained_method(run, info, spec, device)
    splits = load_dataset(spec.dataset, spec.root)
    test, classnames = eval_items(splits, split)
    model.set_classnames(classnames)
    model.eval()
    conditions = None
    if model.reads:
        context = condition_context(spec, frozen, device, splits.root, (info.get("conditions") or {}).get("scp"))
        conditions = Conditions(model.reads, context, test)
    seen: list[torch.Tensor] = []
    originals = {m: m.encode_image for m in PROMPTED}

    def recorded(original):
        def encode(*args, **kwargs):
            out = original(*args, **kwargs)
            seen.append(F.normalize(out.float(), dim=-1))
            return out
        return encode

    for module, original in originals.items():
        module.encode_image = recorded(original)
    prompted, plain = [], []
    try:
        loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, 64, workers=0)
        with torch.no_grad():
            for images, _, index in iterate(loader, device):
                seen.clear()
                model(images, **(conditions(index) if conditions else {}))
                if not seen:
                    raise SystemExit(f"{run}: {spec.method} has no prompted vision tower")
                prompted.append(seen[-1])
                plain.append(model.frozen_image_features(images))
    finally:
        for module, original in originals.items():
            module.encode_image = original
    prompted, plain = torch.cat(prompted), torch.cat(plain)
    return (f"{run} ({spec.method}, {split}, {len(test)} images): prompted vs frozen image features cos "
            f"{float((prompted * plain).sum(-1).mean()):.4f} (min {float((prompted * plain).sum(-1).min()):.4f}); "
            f"two different images, frozen: {float((plain[:-1] * plain[1:]).sum(-1).mean()):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--split", default="base", choices=("base", "novel", "all"))
    args = ap.parse_args()
    for run in args.runs:
        print(reach(run, args.split, torch.device("cpu")))


if __name__ == "__main__":
    main()
