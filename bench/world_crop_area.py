"""Which of the protocol's crops carry the class to whole images, on the world's CLIP.

    python bench/world_crop_area.py --demo DIR

Needs a finished `mugcp demo --out DIR`. For each range of crop area, free class embeddings (the
classifier form of `world_probe.py`, from "a photo of a {}.") are fitted on 5 random resized crops
of each base training image, crop area restricted to that range, and scored on the crops and on the
whole test images; zero-shot is scored on the same crops. A diagnostic of the world, not a setting.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from world_probe import accuracy, cosine_probe, image_features  # noqa: E402

from mugcp.core.coop_datasets import classnames_of, load_dataset, prompt_name  # noqa: E402
from mugcp.core.frozen_clip import load_clip  # noqa: E402
from mugcp.core.protocol import subsample_classes  # noqa: E402

AREAS = [(0.08, 1.0), (0.08, 0.25), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    record = json.loads((args.demo / "runs/dtd/coop/b2n_shots16/seed1/run.json").read_text())
    frozen = load_clip(record["clip"], record["pretrained"], torch.device("cpu"))
    splits = load_dataset("dtd", record["root"])
    train, test = subsample_classes(splits.train, splits.test, subsample="base")
    names = classnames_of(train)

    def features(items, transform, draws: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return image_features(frozen, splits.root, items, transform, draws)

    whole, y_whole = features(test, frozen.test_transform)
    with torch.no_grad():
        text = F.normalize(frozen.model.encode_text(frozen.tokenizer(
            [f"a photo of a {prompt_name(n)}." for n in names])), dim=-1)
    scale = frozen.model.logit_scale.exp().item()
    print(f"zero-shot on the whole test images: {accuracy(whole @ text.T, y_whole):.2f}")
    print("| crop area | zero-shot on those crops | free embeddings: crops fitted | whole test images |")
    print("|---|---|---|---|")
    for low, high in AREAS:
        transform = T.Compose([T.RandomResizedCrop(t.size, scale=(low, high), interpolation=t.interpolation)
                               if isinstance(t, T.RandomResizedCrop) else t for t in frozen.train_transform.transforms])
        crops, y_crops = features(train, transform, 5)
        free = cosine_probe(crops, y_crops, text, scale)
        print(f"| {low:.0%}-{high:.0%} | {accuracy(crops @ text.T, y_crops):.2f} | "
              f"{accuracy(crops @ free.T, y_crops):.2f} | {accuracy(whole @ free.T, y_whole):.2f} |")


if __name__ == "__main__":
    main()
