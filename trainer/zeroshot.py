"""Zero-shot CLIP, the baseline every table starts from: CoOp's template per dataset, no training."""

from __future__ import annotations

from pathlib import Path

import torch

from mugcp.clip import load_clip
from mugcp.datasets import classnames_of, load_dataset
from mugcp.protocol import subsample_classes
from trainer.data import make_loader
from trainer.evaluate import evaluate, zeroshot_logits_fn
from trainer.results import write_results


def run_zeroshot(dataset: str, root: Path, *, split: str = "all", clip: str, pretrained: str | None,
                 device: torch.device, output: Path, batch_size: int = 128, workers: int | None = None):
    """Evaluate zero-shot CLIP on the test images of the base, novel or all classes; write the results JSON."""
    splits = load_dataset(dataset, root)
    for note in splits.notes:
        print(note)
    reference = splits.train or splits.test  # base/novel labels come from the train split, as in CoOp
    test, ref = subsample_classes(splits.test, reference, subsample=split, labels_from=reference)
    classnames = classnames_of(ref)
    frozen = load_clip(clip, pretrained, device)
    logits_fn = zeroshot_logits_fn(frozen, classnames, splits.spec.template)
    loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, batch_size, workers=workers)
    result = evaluate(logits_fn, loader, len(classnames), device, description=f"zero-shot {dataset} {split}")
    run_dir = Path(output) / dataset / "zeroshot" / "seed1"
    path = write_results(run_dir, split, dataset=dataset, method="zeroshot", seed=1, accuracy=result.accuracy,
                         num_images=result.num_images, clip=frozen.model_id, template=splits.spec.template,
                         classnames=classnames, per_class_accuracy=[round(a, 4) for a in result.per_class],
                         images_per_s=round(result.images_per_s, 2))
    record = {"dataset": dataset, "method": "zeroshot", "split": split, "seed": 1,
              "accuracy": result.accuracy, "num_images": result.num_images, "images_per_s": result.images_per_s}
    return record, path
