"""Images to batches for stage two: files read and transformed in loader workers, errors reported by name.

A worker that meets an unreadable image does not raise (PyTorch would re-raise it wrapped in a
traceback); it hands back the path and the reason, and `iterate` turns that into a one-line
`UserError` in the main process.

With a `seed`, every image's random transform draws from its own generator state, seeded by the
seed and the image's index in the list, so augmentation does not depend on which worker loads an
image, or on how many workers there are: a run's result is fixed by its seed alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mugcp.core.coop_datasets import Item
from mugcp.core.errors import UserError
from mugcp.core.files import IMAGE_DECODE_ERRORS


def sample_seed(seed: int, index: int) -> int:
    """The seed of one image's random transform: the loader's seed and the image's index, mixed."""
    return (seed * 1_000_003 + index) % (2 ** 63)


class ImageList(Dataset):
    """`items` read from `root` with `transform`; yields (image, label, index, error)."""

    def __init__(self, items: list[Item], root: Path, transform, image_size: int, seed: int | None = None):
        self.items, self.root, self.transform, self.image_size = items, Path(root), transform, image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            with Image.open(self.root / item.path) as im, torch.random.fork_rng(devices=[]):
                if self.seed is not None:  # the CPU generator only: torch.manual_seed would also queue CUDA's,
                    torch.default_generator.manual_seed(sample_seed(self.seed, i))  # 2-3 ms per image
                image = self.transform(im)
            error = ""
        except IMAGE_DECODE_ERRORS as e:  # a corrupt or unreadable file: reported by path, not by traceback
            image = torch.zeros(3, self.image_size, self.image_size)
            error = f"{self.root / item.path}: {type(e).__name__}: {e}"
        return image, item.label, i, error


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def make_loader(items: list[Item], root: Path, transform, image_size: int, batch_size: int, *,
                shuffle: bool = False, drop_last: bool = False, workers: int | None = None,
                generator: torch.Generator | None = None, seed: int | None = None) -> DataLoader:
    """Batches of `items`; `seed` fixes every image's random transform whatever the number of `workers`."""
    workers = default_workers() if workers is None else workers
    return DataLoader(ImageList(items, root, transform, image_size, seed), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, generator=generator)


def iterate(loader: DataLoader):
    """Yield (images, labels, indices); stop with a one-line error at the first unreadable image."""
    for images, labels, index, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise UserError(f"cannot read image {bad[0]} ({len(bad)} bad in this batch): replace or remove the file")
        yield images, labels, index
