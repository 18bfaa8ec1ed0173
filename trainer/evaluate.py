"""Test-set evaluation shared by every method: stream images in batches, count hits per class.

`zeroshot_logits_fn` is zero-shot CLIP with CoOp's per-dataset template: text features are
computed once (cut at the longest EOT), images go through in batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mugcp.clip import FrozenClip, encode_text
from mugcp.datasets import prompt_name
from mugcp.progress import progress
from trainer.data import iterate


@dataclass
class EvalResult:
    accuracy: float  # percent
    num_images: int
    per_class: list[float]  # percent, by label
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds else 0.0


@torch.no_grad()
def evaluate(logits_fn, loader, num_classes: int, device: torch.device, description: str = "eval") -> EvalResult:
    """Accuracy of `logits_fn(images, indices) -> (B, C)` over the loader; indices let methods fetch per-image tensors."""
    hits = torch.zeros(num_classes, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(description, total=len(loader.dataset))
        for images, labels, index in iterate(loader):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                pred = logits_fn(images, index).argmax(dim=-1).cpu()
            hits += torch.bincount(labels[pred == labels], minlength=num_classes)
            counts += torch.bincount(labels, minlength=num_classes)
            bar.advance(task, len(labels))
    seconds = time.perf_counter() - start
    total = int(counts.sum())
    per_class = (100.0 * hits / counts.clamp(min=1)).tolist()
    return EvalResult(100.0 * int(hits.sum()) / max(total, 1), total, per_class, seconds)


@torch.no_grad()
def class_text_features(clip: FrozenClip, classnames: list[str], template: str) -> torch.Tensor:
    """L2-normalised features of the hand-crafted prompt of each class (the frozen "view" of a class)."""
    tokens = clip.tokenize([template.format(prompt_name(c)) for c in classnames])
    return F.normalize(encode_text(clip.model, tokens).float(), dim=-1)


def zeroshot_logits_fn(clip: FrozenClip, classnames: list[str], template: str):
    text = class_text_features(clip, classnames, template)
    scale = clip.model.logit_scale.exp().float()

    def logits(images, _index):
        image = F.normalize(clip.model.encode_image(images).float(), dim=-1)
        return scale * image @ text.T

    return logits
