"""Images to batches for stage two: files read and transformed in loader workers, errors reported by name.

A worker that meets an unreadable image does not raise (PyTorch would re-raise it wrapped in a
traceback); it hands back the path and the reason, and `iterate` turns that into a one-line
`UserError` in the main process.

With a `seed`, every image's random transform draws from its own generator state, seeded by the
seed and the image's index in the list, so augmentation does not depend on which worker loads an
image, or on how many workers there are: a run's result is fixed by its seed alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from mugcp.core.coop_datasets import Item
from mugcp.core.errors import UserError
from mugcp.core.files import IMAGE_DECODE_ERRORS


def sample_seed(seed: int, index: int) -> int:
    """The seed of one image's random transform: the loader's seed and the image's index, mixed."""
    return (seed * 1_000_003 + index) % (2 ** 63)


class DecodedImages:
    """Decoded RGB images kept in memory across a run's epochs, up to `budget` bytes of pixels.

    The few-shot training images are read every epoch; on a CPU with loading in the main process
    (`workers=0`, the built-in world) opening and decoding them again cost about a third of a CoOp
    run. Kept decoded, each epoch's random crops are drawn from the very same pixels, so the batches
    are unchanged. With loader workers each worker holds its own copy for one epoch: no gain, no harm.
    """

    def __init__(self, budget: int = 256 << 20):
        self.images: dict[int, Image.Image] = {}
        self.budget = budget

    def get(self, index: int, path: Path) -> Image.Image:
        image = self.images.get(index)
        if image is None:
            with Image.open(path) as im:
                image = im.convert("RGB")
            size = image.width * image.height * 3
            if size <= self.budget:
                self.images[index] = image
                self.budget -= size
        return image


class ImageList(Dataset):
    """`items` read from `root` with `transform`; yields (image, label, index, error)."""

    def __init__(self, items: list[Item], root: Path, transform, image_size: int, seed: int | None = None,
                 decoded: DecodedImages | None = None):
        self.items, self.root, self.transform, self.image_size = items, Path(root), transform, image_size
        self.seed, self.decoded = seed, decoded

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            with self._open(i, item) as im, torch.random.fork_rng(devices=[]):
                if self.seed is not None:  # the CPU generator only: torch.manual_seed would also queue CUDA's,
                    torch.default_generator.manual_seed(sample_seed(self.seed, i))  # 2-3 ms per image
                image = self.transform(im)
            error = ""
        except IMAGE_DECODE_ERRORS as e:  # a corrupt or unreadable file: reported by path, not by traceback
            image = torch.zeros(3, self.image_size, self.image_size, dtype=self._dtype())
            error = f"{self.root / item.path}: {type(e).__name__}: {e}"
        return image, item.label, i, error

    def _dtype(self) -> torch.dtype:
        """uint8 where the transform stops before ToTensor (the batch is scaled as a whole), else float."""
        steps = getattr(self.transform, "transforms", [])
        return torch.uint8 if steps and type(steps[-1]) is T.PILToTensor else torch.get_default_dtype()

    def _open(self, i: int, item: Item):
        if self.decoded is None:
            return Image.open(self.root / item.path)
        return contextlib.nullcontext(self.decoded.get(i, self.root / item.path))


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def make_loader(items: list[Item], root: Path, transform, image_size: int, batch_size: int, *,
                shuffle: bool = False, drop_last: bool = False, workers: int | None = None,
                generator: torch.Generator | None = None, seed: int | None = None,
                decoded: DecodedImages | None = None) -> DataLoader:
    """Batches of `items`; `seed` fixes every image's random transform whatever the number of `workers`;
    `decoded` (kept by the caller across epochs) spares re-decoding the same images."""
    workers = default_workers() if workers is None else workers
    per_image, per_batch = split_transform(transform)
    return DataLoader(ImageList(items, root, per_image, image_size, seed, decoded), batch_size=batch_size,
                      shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False, generator=generator,
                      collate_fn=functools.partial(_collate, finish=per_batch))


def split_transform(transform):
    """(per image, per batch) parts of `transform`: a Compose ending in ToTensor + Normalize has those two
    steps done on the whole batch (the same arithmetic, bit for bit, one call instead of one per image:
    about a third of a small image's transform time on a CPU). Any other transform runs whole per image."""
    steps = getattr(transform, "transforms", [])
    if len(steps) >= 2 and type(steps[-2]) is T.ToTensor and type(steps[-1]) is T.Normalize:
        return T.Compose([*steps[:-2], T.PILToTensor()]), steps[-1]
    return transform, None


def _collate(samples, finish):
    images, labels, index, errors = default_collate(samples)
    if finish is not None:  # ToTensor's scaling of uint8 pixels, then Normalize, as they would per image
        images = finish(images.to(torch.get_default_dtype()).div(255))
    return images, labels, index, errors


def iterate(loader: DataLoader):
    """Yield (images, labels, indices); stop with a one-line error at the first unreadable image."""
    for images, labels, index, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise UserError(f"cannot read image {bad[0]} ({len(bad)} bad in this batch): replace or remove the file")
        yield images, labels, index
