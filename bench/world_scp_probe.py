"""Does the world's SCP tell the base classes apart beyond what the image features already do?

    python bench/world_scp_probe.py --demo /tmp/wdemo [--seeds 1,2,3] [--oracle]

Needs a finished `mugcp demo --out DIR`. Linear probes (logistic regression, `world_probe.linear_probe`)
fitted on the base classes' 16 shots of each seed's draw and scored on the base test images, on:
- the frozen CLIP's image features (whole images, the test transform);
- the image's SCP, pooled (the mean of its valid phrase embeddings);
- both, concatenated;
- both, with the SCP shuffled across images (the demo's control: a single random cycle).

If "both" is no better than "image" beyond the seeds' spread, SCP carries nothing a linear reader of
the image lacks, and no method reading it could gain on these classes; if it is better, the
information is there and a method that stays level with its shuffled control does not use it.
`--oracle` adds the same rows for SCP of every image's true attributes (the stand-in MLLM of
`world_oracle_scp.py`, cached in DEMO/oracle/cache). A diagnostic of the world, not a setting of the project.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

from world_oracle_scp import oracle_cache  # noqa: E402
from world_probe import accuracy, linear_probe  # noqa: E402

from mugcp.core.coop_datasets import Item, Splits, load_dataset  # noqa: E402
from mugcp.core.frozen_clip import FrozenClip, load_clip  # noqa: E402
from mugcp.core.protocol import draw_fewshot, subsample_classes  # noqa: E402
from mugcp.core.scp_cache import read_scp  # noqa: E402
from mugcp.demo import WORLD_SCHEDULE  # noqa: E402
from mugcp.trainer.conditions import single_cycle  # noqa: E402
from mugcp.world.tiny_clip import world_clip  # noqa: E402


@torch.no_grad()
def image_features(frozen: FrozenClip, splits: Splits, items: list[Item]) -> torch.Tensor:
    images = torch.stack([frozen.test_transform(Image.open(splits.abspath(i))) for i in items])
    return F.normalize(frozen.model.encode_image(images), dim=-1)


def pooled_scp(cache: Path, frozen: FrozenClip, items: list[Item]) -> torch.Tensor:
    found = read_scp(cache, "dtd", frozen.model_id, [i.path for i in items])
    scp, mask = torch.from_numpy(found.scp.astype("float32")), torch.from_numpy(found.mask).float()
    return F.normalize((scp * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1), dim=-1)


def probe_accuracy(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   seed: int) -> float:
    torch.manual_seed(seed)  # the probe's initial weights
    probe = linear_probe(train, labels, int(labels.max()) + 1)
    with torch.no_grad():
        return accuracy(probe(10 * test), test_labels)


def joined(image: torch.Tensor, scp: torch.Tensor) -> torch.Tensor:
    return torch.cat([image, scp], dim=1) / 2 ** 0.5  # unit norm, as each part


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--oracle", action="store_true", help="also SCP of the true attributes")
    args = ap.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    data = args.demo / "data"
    caches = {"describer": args.demo / "cache"}
    if args.oracle:
        caches["true attributes"] = oracle_cache(data, args.demo / "oracle" / "cache", seeds)
    rows, n_test = probe_rows(data, caches, seeds)
    print(f"Linear probes on the base classes of {data}: {WORLD_SCHEDULE['shots']} shots per class (seeds "
          f"{args.seeds}), scored on {n_test} base test images; mean ± std over seeds (ddof 0)")
    print_rows(rows, 42)


def probe_rows(data: Path, caches: dict[str, Path], seeds: tuple[int, ...]) -> tuple[dict[str, list[float]], int]:
    """Each probe's accuracy per seed ("image"; for each cache NAME "SCP (NAME)", "image + SCP (NAME)" and
    "image + shuffled SCP (NAME)"), and the number of base test images they are scored on."""
    frozen = load_clip(*map(str, world_clip()))
    splits = load_dataset("dtd", data)
    (test,) = subsample_classes(splits.test, subsample="base", labels_from=splits.train)
    test_labels = torch.tensor([i.label for i in test])
    test_image = image_features(frozen, splits, test)
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        (train,) = subsample_classes(draw_fewshot(splits, WORLD_SCHEDULE["shots"], seed).train, subsample="base")
        labels = torch.tensor([i.label for i in train])
        train_image = image_features(frozen, splits, train)
        rows.setdefault("image", []).append(probe_accuracy(train_image, labels, test_image, test_labels, seed))
        for name, cache in caches.items():
            train_scp, test_scp = pooled_scp(cache, frozen, train), pooled_scp(cache, frozen, test)
            shuffled_train = train_scp[single_cycle(len(train), seed)]
            shuffled_test = test_scp[single_cycle(len(test), seed + 1)]
            for row, (a, b) in {f"SCP ({name})": (train_scp, test_scp),
                                f"image + SCP ({name})": (joined(train_image, train_scp), joined(test_image, test_scp)),
                                f"image + shuffled SCP ({name})": (joined(train_image, shuffled_train),
                                                                   joined(test_image, shuffled_test))}.items():
                rows.setdefault(row, []).append(probe_accuracy(a, labels, b, test_labels, seed))
    return rows, len(test)


def print_rows(rows: dict[str, list[float]], width: int) -> None:
    for row, values in rows.items():
        print(f"  {row:{width}s} {statistics.fmean(values):6.2f} ± {statistics.pstdev(values):4.2f}   "
              f"({', '.join(f'{v:.2f}' for v in values)})")

if __name__ == "__main__":
    main()
