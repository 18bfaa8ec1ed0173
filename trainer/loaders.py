"""Images to batches for stage two: files read and transformed in loader workers, errors reported by name.

A worker that meets an unreadable image does not raise (PyTorch would re-raise it wrapped in a
traceback); it hands back the path and the reason, and `iterate` turns that into a one-line
`UserError` in the main process.

With a `seed`, every image's random transform draws from its own generator state, seeded by the
seed and the image's index in the list, so augmentation does not depend on which worker loads an
image, or on how many workers there are: a run's result is fixed by its seed alone.

Training uses one loader for all its epochs (`EpochBatches`): the workers start once and keep
batches coming across each epoch's end, where a loader per epoch started its workers again and
waited on its first batch. Workers hand over uint8 pixels (a quarter of float32's bytes through
shared memory, pinned memory and the bus); `iterate` scales and normalises them on the device.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mugcp.core.coop_datasets import Item
from mugcp.core.errors import UserError
from mugcp.core.files import IMAGE_DECODE_ERRORS

DECODED_BUDGET = 256 << 20  # bytes of decoded pixels a run keeps, shared among its loader workers


def sample_seed(seed: int, index: int) -> int:
    """The seed of one image's random transform: the loader's seed and the image's index, mixed."""
    return (seed * 1_000_003 + index) % (2 ** 63)


class DecodedImages:
    """Decoded RGB images kept in memory across a run's epochs, up to `budget` bytes of pixels.

    The few-shot training images are read every epoch; on a CPU with loading in the main process
    (`workers=0`, the built-in world) opening and decoding them again cost about a third of a CoOp
    run. Kept decoded, each epoch's random crops are drawn from the very same pixels, so the batches
    are unchanged. With loader workers each worker holds its own images: training gives each a share
    of `DECODED_BUDGET`.
    """

    def __init__(self, budget: int = DECODED_BUDGET):
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

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, self.seed)  # (index, epoch's seed) from EpochBatches
        item = self.items[i]
        try:
            with self._open(i, item) as im, torch.random.fork_rng(devices=[]):
                if seed is not None:  # the CPU generator only: torch.manual_seed would also queue CUDA's,
                    torch.default_generator.manual_seed(sample_seed(seed, i))  # 2-3 ms per image
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
    return min(16, max(0, (os.cpu_count() or 1) - 1))


class EpochBatches(Sampler):
    """The batches of several epochs for one loader, as (index, epoch seed) pairs: epoch e's order is the one a
    shuffling DataLoader draws from a generator seeded with `seeds[e]` (its base seed first, then a permutation),
    its last short batch dropped with `drop_last`, and each image's augmentation seeded by `seeds[e]` and its
    index, so a run's batches are what they were with a loader per epoch."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seeds: list[int]):
        self.n, self.batch_size, self.drop_last, self.seeds = n, batch_size, drop_last, list(seeds)
        self.per_epoch = n // batch_size if drop_last else -(-n // batch_size)

    def __len__(self) -> int:
        return self.per_epoch * len(self.seeds)

    def __iter__(self):
        for seed in self.seeds:
            gen = torch.Generator().manual_seed(seed)
            torch.empty((), dtype=torch.int64).random_(generator=gen)
            order = torch.randperm(self.n, generator=gen).tolist()
            for start in range(0, self.per_epoch * self.batch_size, self.batch_size):
                yield [(i, seed) for i in order[start:start + self.batch_size]]


def make_loader(items: list[Item], root: Path, transform, image_size: int, batch_size: int = 1, *,
                workers: int | None = None, seed: int | None = None, decoded: DecodedImages | None = None,
                epochs: EpochBatches | None = None, device: torch.device | None = None) -> DataLoader:
    """Batches of `items` in order, or the shuffled batches of `epochs`; `seed` fixes every image's random
    transform whatever the number of `workers`; `decoded` spares re-decoding the same images; batches for a
    CUDA `device` come in pinned memory."""
    workers = default_workers() if workers is None else workers
    per_image, per_batch = split_transform(transform)
    batching = {"batch_sampler": epochs} if epochs is not None else {"batch_size": batch_size}
    loader = DataLoader(ImageList(items, root, per_image, image_size, seed, decoded), num_workers=workers,
                        pin_memory=device is not None and device.type == "cuda",
                        generator=torch.Generator().manual_seed(0),
                        **batching)
    loader.finish = per_batch  # scaling and Normalize, done on the device by `iterate`
    return loader


def split_transform(transform):
    """(per image, per batch) parts of `transform`: a Compose ending in ToTensor + Normalize has those two
    steps done on the whole batch, on the device (the same arithmetic, bit for bit, one call instead of one
    per image; the workers hand over uint8 pixels). Any other transform runs whole per image."""
    steps = getattr(transform, "transforms", [])
    if len(steps) >= 2 and type(steps[-2]) is T.ToTensor and type(steps[-1]) is T.Normalize:
        return T.Compose([*steps[:-2], T.PILToTensor()]), steps[-1]
    return transform, None


# ToTensor's scaling of each uint8 value, computed as ToTensor computes it, on the CPU: looked up on the device, it
# stays bit for bit what ToTensor gives (a GPU divides by a number as a multiplication by its reciprocal).
PIXEL_VALUES = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)


def iterate(loader: DataLoader, device: torch.device, dtype: torch.dtype = torch.float32):
    """Yield (images on `device` in `dtype`, labels, indices); stop with a one-line error at the first
    unreadable image. uint8 pixels are scaled as ToTensor scales them and normalised there, in float32."""
    finish = getattr(loader, "finish", None)
    values = PIXEL_VALUES.to(device)
    for images, labels, index, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise UserError(f"cannot read image {bad[0]} ({len(bad)} bad in this batch): replace or remove the file")
        images = images.to(device, non_blocking=True)
        if finish is not None:
            images = finish(values[images.long()])
        yield images.to(dtype), labels, index
