"""`mugcp eval`: the test images of the base, novel or all classes through a method, counted per class.

A trained run is rebuilt as it was trained (its classes, config and final weights), then switched
to the evaluated classes; a method that does not train (zero-shot CLIP) is built directly. Images
stream through in batches; class features that do not depend on the image are computed once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mugcp.core.coop_datasets import Splits, classnames_of, load_dataset
from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import load_clip
from mugcp.core.progress import progress
from mugcp.core.protocol import harmonic_mean, subsample_classes
from mugcp.trainer.conditions import Conditions
from mugcp.trainer.config import load_config
from mugcp.trainer.loaders import iterate, make_loader
from mugcp.trainer.methods import build_method, method_class
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.results import read_results, results_path, write_results
from mugcp.trainer.runs import FINAL_WEIGHTS, RunSpec, read_run, resolve_run
from mugcp.trainer.train import condition_context


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


def eval_items(splits: Splits, split: str):
    """The test images of the base/novel/all classes and the class names, by label (base/novel as in CoOp)."""
    reference = splits.train or splits.test  # base/novel labels come from the train split, as in CoOp
    test, ref = subsample_classes(splits.test, reference, subsample=split, labels_from=reference)
    return test, classnames_of(ref)


def _evaluate_model(model: PromptMethod, conditions: Optional[Conditions], splits: Splits, test, classnames,
                    device, batch_size: int, workers: Optional[int], description: str) -> EvalResult:
    model.eval()
    frozen = model.clip

    def logits_fn(images, index):
        return model(images, **(conditions(index) if conditions else {}))

    loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, batch_size, workers=workers)
    return evaluate(logits_fn, loader, len(classnames), device, description=description)


def run_untrained(method: str, dataset: str, root: Path, *, split: str = "all", clip: str, pretrained: Optional[str],
                  device: torch.device, output: Path, batch_size: int = 128,
                  workers: Optional[int] = None, log=print) -> tuple[dict, Path]:
    """Evaluate a method with nothing to learn (zero-shot CLIP) on the test images; write the results JSON."""
    if method_class(method).trains:
        raise UserError(f"method '{method}' must be trained first: `mugcp train --method {method}`, then "
                        f"`mugcp eval --run RUN`")
    splits = load_dataset(dataset, root)
    for note in splits.notes:
        log(note)
    test, classnames = eval_items(splits, split)
    frozen = load_clip(clip, pretrained, device)
    model = build_method(method, frozen, classnames, dataset, load_config(method).method).to(device)
    result = _evaluate_model(model, None, splits, test, classnames, device, batch_size, workers,
                             f"{method} {dataset} {split}")
    run_dir = Path(output) / dataset / method / "seed1"
    path = write_results(run_dir, split, dataset=dataset, method=method, seed=1, accuracy=result.accuracy,
                         num_images=result.num_images, clip=frozen.model_id, templates=list(model.templates),
                         classnames=classnames, per_class_accuracy=[round(a, 4) for a in result.per_class],
                         images_per_s=round(result.images_per_s, 2))
    record = {"dataset": dataset, "method": method, "split": split, "seed": 1,
              "accuracy": result.accuracy, "num_images": result.num_images, "images_per_s": result.images_per_s}
    return record, path


def _load_weights(run: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(run / FINAL_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {run / FINAL_WEIGHTS} ({e}): the run's weights are damaged; train it again") \
            from None


def run_eval(*, run: Optional[Path], output: Path, split: str, root: Optional[Path], device: torch.device,
             batch_size: int = 128, workers: Optional[int] = None, as_json: bool = False) -> list[str]:
    """Evaluate a trained run on the test images of the base/novel/all classes; return lines to print."""
    run = resolve_run(run, output)
    info = read_run(run)
    spec = RunSpec.from_record(info)
    if root is not None:
        spec.root = str(Path(root).resolve())
    splits = load_dataset(spec.dataset, spec.root)
    test, classnames = eval_items(splits, split)
    frozen = load_clip(spec.clip, spec.pretrained, device)
    if frozen.model_id != info["clip_model_id"]:
        raise UserError(f"run {run} was trained with CLIP {info['clip_model_id']}, but {frozen.model_id} loaded")
    config = spec.train_config()
    model = build_method(spec.method, frozen, info["classnames"], spec.dataset, config.method).to(device)
    model.load_final_state(_load_weights(run))
    model.set_classnames(classnames)
    scp = (info.get("conditions") or {}).get("scp") or {}
    if scp:  # test SCP must come from the MLLM and prompt that training saw
        spec.mllm = scp["mllm"]
    conditions = Conditions(model.reads, condition_context(spec, frozen, device, scp.get("prompt_version")), test)
    result = _evaluate_model(model, conditions, splits, test, classnames, device, batch_size, workers,
                             f"eval {spec.method} {split}")
    path = write_results(run, split, dataset=spec.dataset, method=spec.method, seed=spec.seed,
                         accuracy=result.accuracy, num_images=result.num_images, shots=spec.shots,
                         subsample=spec.subsample, clip=frozen.model_id, mllm=spec.mllm, config=spec.config,
                         classnames=classnames, per_class_accuracy=[round(a, 4) for a in result.per_class],
                         images_per_s=round(result.images_per_s, 2))
    lines = [json.dumps(read_results(path), indent=2)] if as_json else [
        f"{spec.dataset} {spec.method} seed {spec.seed} {split}: accuracy {result.accuracy:.2f}% on "
        f"{result.num_images} images -> {path}"]
    if results_path(run, "base").is_file() and results_path(run, "novel").is_file():
        b, n = (read_results(results_path(run, s))["accuracy"] for s in ("base", "novel"))
        lines.append(f"Base {b:.2f}  Novel {n:.2f}  HM {harmonic_mean(b, n):.2f}")
    return lines
