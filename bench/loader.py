"""Training's image loading alone: one loader for every epoch against a loader per epoch, and what workers hand over.

    python bench/loader.py [--images 384] [--epochs 4] [--batch-size 32] [--workers 1 2]

Writes `--images` JPEGs of 500 x 375 pixels (DTD's typical size) and reads them as training does (CLIP's train
transform: random resized crop to 224, flip, scaling and Normalize on the device, here the CPU), with no model:
the loader's own pace. Prints, per worker count, images/s over all epochs and the wait for each epoch's first
batch, for one loader over all epochs (`EpochBatches`, as `mugcp train` reads) and for a new loader each epoch
(as training read before). Also the bytes of one batch as workers hand it over (uint8) against float32.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mugcp.core.coop_datasets import Item
from mugcp.core.frozen_clip import load_clip
from mugcp.trainer.loaders import DecodedImages, EpochBatches, iterate, make_loader


def write_images(folder: Path, n: int) -> list[Item]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        pixels[:, :, 0] = np.linspace(0, 255, 500, dtype=np.uint8)  # some structure, so JPEG size is typical
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        items.append(Item(f"{i}.jpg", i % 10, f"class{i % 10}"))
    return items


def read(items, root, transform, batch_size, seeds, workers, one_loader: bool) -> tuple[float, list[float]]:
    """(images/s over all epochs, seconds waited for each epoch's first batch)."""
    firsts, count = [], 0
    start = time.perf_counter()
    if one_loader:
        batches = EpochBatches(len(items), batch_size, True, seeds)
        stream = iterate(make_loader(items, root, transform, 224, workers=workers, decoded=DecodedImages(),
                                     epochs=batches), torch.device("cpu"))
        for _ in seeds:
            t = time.perf_counter()
            for b, (images, _, _) in enumerate(itertools.islice(stream, batches.per_epoch)):
                if b == 0:
                    firsts.append(time.perf_counter() - t)
                count += len(images)
        stream.close()
    else:
        for seed in seeds:
            t = time.perf_counter()
            loader = make_loader(items, root, transform, 224, workers=workers,
                                 decoded=DecodedImages() if workers == 0 else None,
                                 epochs=EpochBatches(len(items), batch_size, True, [seed]))
            for b, (images, _, _) in enumerate(iterate(loader, torch.device("cpu"))):
                if b == 0:
                    firsts.append(time.perf_counter() - t)
                count += len(images)
    return count / (time.perf_counter() - start), firsts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    transform = load_clip("ViT-B-16", "none", torch.device("cpu")).train_transform
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.images} JPEGs of 500 x 375, batch {args.batch_size}, {args.epochs} epochs")
    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp), args.images)
        seeds = [100_003 + e for e in range(args.epochs)]
        for workers in args.workers:
            for one in (True, False):
                rate, firsts = read(items, Path(tmp), transform, args.batch_size, seeds, workers, one)
                print(f"workers {workers} | {'one loader, all epochs' if one else 'a loader per epoch   '} | "
                      f"{rate:7.1f} images/s | first batch of epochs 2+: median {statistics.median(firsts[1:]) * 1000:6.0f} ms "
                      f"(epoch 1: {firsts[0] * 1000:.0f} ms)")
    batch = args.batch_size * 3 * 224 * 224
    print(f"one batch as workers hand it over: {batch / 2**20:.1f} MiB uint8 (float32: {4 * batch / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
