"""A task whose label only SCP states: can a method learn to read SCP at all, and will it when the image also fits?

Each image of class c comes with K phrase features (unit vectors, as stage one stores CLIP text
features), `informative` of which are class c's own fixed vector and the rest random. The images
say nothing of the class: either one image shared by every sample (`images="constant"`), so that
only SCP can separate the classes, or fresh noise per sample (`images="noise"`), which says nothing
about the class either but lets a model memorise its training samples through the image side. The
control (`shuffled=True`) gives every sample another sample's SCP, as `conditions.scp=shuffled`
does. Used by tests/test_methods.py and bench/scp_pathway.py, with a method from `build_method`:
`fit_and_score` trains it with plain SGD on its own loss and returns its held-out accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Samples:
    images: torch.Tensor  # (N, 3, S, S)
    labels: torch.Tensor  # (N,)
    scp: torch.Tensor  # (N, K, D)
    mask: torch.Tensor  # (N, K), all True


def scp_task(classes: int, per_class: int, image_size: int, dim: int, seed: int, phrases: int = 8,
             informative: int = 1, images: str = "constant", shuffled: bool = False) -> tuple[Samples, Samples]:
    """(train, test): `per_class` samples of each class in each; the class vectors are shared by both."""
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    shared = torch.randn(1, 3, image_size, image_size, generator=g)

    def draw() -> Samples:
        labels = torch.arange(classes).repeat_interleave(per_class)
        n = len(labels)
        pixels = shared.expand(n, -1, -1, -1).clone() if images == "constant" else \
            torch.randn(n, 3, image_size, image_size, generator=g)
        scp = F.normalize(torch.randn(n, phrases, dim, generator=g), dim=-1)
        scp[:, :informative] = vectors[labels][:, None]
        if shuffled:
            scp = scp[torch.randperm(n, generator=g)]
        return Samples(pixels, labels, scp, torch.ones(n, phrases, dtype=torch.bool))

    return draw(), draw()


def fit_and_score(model, train: Samples, test: Samples, steps: int, lr: float, batch_size: int = 8,
                  seed: int = 0) -> tuple[float, float]:
    """(training loss of the last step, held-out accuracy) after `steps` of SGD (momentum 0.9) on `model.loss`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for _ in range(steps):
        pick = torch.randperm(len(train.labels), generator=g)[:batch_size]
        loss, _ = model.loss(train.images[pick], train.labels[pick], scp=train.scp[pick], scp_mask=train.mask[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(test.images, scp=test.scp, scp_mask=test.mask)
    return loss.item(), (logits.argmax(1) == test.labels).float().mean().item()
