"""Zero-shot eval throughput (images/s) of the tiny CLIP and of ViT-B-16 (random weights) on this machine.

    python bench/zeroshot.py [--images 256] [--batch-size 64] [--device cpu]

Prints one line per model: device, images/s of the whole eval (decode + transform + forward),
and the text-feature time. Random weights: the speed of the architecture, not of a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()

    from mugcp.core.coop_datasets import classnames_of, load_dataset
    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.config import load_config
    from mugcp.trainer.evaluation import evaluate
    from mugcp.trainer.loaders import make_loader
    from mugcp.trainer.methods import build_method
    from mugcp.world.synth import write_synthetic_dtd
    from mugcp.world.tiny_clip import write_tiny_clip

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(4, -(-args.images * 10 // (3 * 47)))  # ~30% of each class is test
        write_synthetic_dtd(tmp, per_class=per_class, size=256)
        splits = load_dataset("dtd", tmp)
        test = splits.test[: args.images]
        classnames = classnames_of(splits.train)
        config, ckpt = write_tiny_clip(Path(tmp) / "clip")
        for label, clip, pretrained in (("tiny", str(config), str(ckpt)), ("ViT-B-16 (random)", "ViT-B-16", None)):
            frozen = load_clip(clip, pretrained, device)
            model = build_method("zeroshot", frozen, classnames, "dtd", load_config("zeroshot").method)
            model.eval()
            t0 = time.perf_counter()
            model.handcrafted  # the class features, computed once
            text_s = time.perf_counter() - t0

            def logits_fn(images, _index, model=model):
                return model(images)

            loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, args.batch_size,
                                 workers=args.workers)
            evaluate(logits_fn, loader, len(classnames), device)  # warm-up (workers, allocator)
            r = evaluate(logits_fn, loader, len(classnames), device)
            print(f"zero-shot eval | {label:18s} | {device.type} ({name}) | {r.num_images} images of 256px, "
                  f"batch {args.batch_size} | {r.images_per_s:8.1f} images/s | text features for 47 classes "
                  f"{text_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
