"""`mugcp eval`: the test images of the base, novel or all classes through a method, counted per class.

A trained run is rebuilt as it was trained (its classes, config and final weights), then switched
to the evaluated classes; a method that does not train (zero-shot CLIP) is built directly. Images
stream through in batches; class features that do not depend on the image are computed once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError

from mugcp.core.coop_datasets import DOMAIN_TARGETS, Splits, classnames_of, load_dataset
from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import FrozenClip, load_clip
from mugcp.core.locks import hold
from mugcp.core.progress import progress
from mugcp.core.protocol import harmonic_mean, subsample_classes
from mugcp.core.templates import templates_for
from mugcp.trainer.checkpoints import load_tensors
from mugcp.trainer.conditions import Conditions
from mugcp.trainer.config import load_config
from mugcp.trainer.loaders import iterate, make_loader
from mugcp.trainer.methods import build_method, method_class
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.precision import arithmetic, autocast, input_dtype, to_half
from mugcp.trainer.results import (
    OWN_SPLITS,
    current_results,
    read_results,
    readable_results,
    results_path,
    write_results,
)
from mugcp.trainer.runs import (
    FINAL_WEIGHTS,
    RunSpec,
    finish_hint,
    identity_hash,
    read_run,
    recorded_differences,
    resolve_run,
)
from mugcp.trainer.train import condition_context


@dataclass
class EvalResult:
    accuracy: float  # top-1, percent
    top5: float  # percent
    num_images: int
    per_class: list[float | None]  # top-1 per label, percent (None: no test image of that label)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds else 0.0

    @property
    def mean_per_class_recall(self) -> float:
        present = [a for a in self.per_class if a is not None]
        return float(sum(present) / len(present)) if present else 0.0

    def metrics(self) -> dict:
        """CLIP_benchmark's metric names and scale (fractions)."""
        return {"acc1": round(self.accuracy / 100, 6), "acc5": round(self.top5 / 100, 6),
                "mean_per_class_recall": round(self.mean_per_class_recall / 100, 6)}


@torch.no_grad()
def evaluate(logits_fn, loader, num_classes: int, device: torch.device, description: str = "eval",
             precision: str = "amp") -> EvalResult:
    """Accuracy of `logits_fn(images, indices) -> (B, C)` over the loader; indices let methods fetch per-image tensors.

    `precision` is the run's: amp runs under fp16 autocast on GPU, fp32 without it, fp16 feeds half images to a
    model already in half precision (the references' PREC "fp16" evaluates so)."""
    hits = torch.zeros(num_classes, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    hits5 = 0
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(description, total=len(loader.dataset))
        for images, labels, index in iterate(loader, device, input_dtype(precision)):
            with autocast(precision, device):
                logits = logits_fn(images, index)
                if tuple(logits.shape) != (len(images), num_classes):
                    raise UserError(f"the model gave logits of shape {tuple(logits.shape)} for {len(images)} images "
                                    f"of {num_classes} classes: its forward must return (images, classes) logits")
                top = logits.float().topk(min(5, num_classes), dim=-1).indices.cpu()
            pred = top[:, 0]
            hits += torch.bincount(labels[pred == labels], minlength=num_classes)
            counts += torch.bincount(labels, minlength=num_classes)
            hits5 += int((top == labels[:, None]).any(-1).sum())
            bar.advance(task, len(labels))
    seconds = time.perf_counter() - start
    total = int(counts.sum())
    per_class = [100.0 * h / c if c else None for h, c in zip(hits.tolist(), counts.tolist())]
    return EvalResult(100.0 * int(hits.sum()) / max(total, 1), 100.0 * hits5 / max(total, 1), total, per_class,
                      seconds)


def eval_items(splits: Splits, split: str):
    """The test images of the base/novel/all classes and the class names, by label (base/novel as in CoOp)."""
    reference = splits.train or splits.test  # base/novel labels come from the train split, as in CoOp
    test, ref = subsample_classes(splits.test, reference, subsample=split, labels_from=reference)
    if not test:
        raise UserError(f"{splits.spec.name} has no test images for the {split} classes: check its split file")
    return test, classnames_of(ref)


def _evaluate_model(model: PromptMethod, conditions: Optional[Conditions], splits: Splits, test, classnames,
                    device, batch_size: int, workers: Optional[int], description: str,
                    precision: str = "amp") -> EvalResult:
    model.eval()
    frozen = model.clip
    if precision == "fp16":  # as the run trained: CLIP in half, the prompts as its reference holds them
        to_half(frozen.model, model)

    def logits_fn(images, index):
        given = conditions(index) if conditions else {}
        return model(images, **{k: v.to(images.dtype) if v.is_floating_point() else v for k, v in given.items()})

    loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, batch_size, workers=workers,
                         device=device)
    return evaluate(logits_fn, loader, len(classnames), device, description=description, precision=precision)


def untrained_results_path(output: Path, method: str, dataset: str, split: str) -> Path:
    """Where a method with nothing to learn writes its results for `dataset`'s `split` (one folder, seed 1)."""
    return results_path(Path(output) / dataset / method / "seed1", split)


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
    where = untrained_results_path(output, method, dataset, split)

    def wait(holder: str) -> None:
        log(f"waiting for {holder}, which writes {where.parent}")

    with hold(where.parent / ".lock", f"the results folder {where.parent}", wait=wait):  # checked, then written
        for other in OWN_SPLITS:  # one folder holds one CLIP's results on one split of the data: its Base and Novel
            held_at = untrained_results_path(output, method, dataset, other)  # make one HM
            changed = recorded_differences(readable_results(held_at) or {},
                                           {"clip": frozen.model_id, "split_digest": splits.digest()})
            if changed:
                raise UserError(f"{held_at} holds {method} results of another CLIP or data ({'; '.join(changed)}): "
                                f"evaluate into another --output, or delete that file")
        model = build_method(method, frozen, classnames, dataset, load_config(method).method).to(device)
        result = _evaluate_model(model, None, splits, test, classnames, device, batch_size, workers,
                                 f"{method} {dataset} {split}")
        path = write_results(where, dataset=dataset, model=clip, pretrained=pretrained,
                             task="zeroshot_classification", metrics=result.metrics(), method=method,
                             setting="zeroshot", source=None, split=split, seed=1,
                             accuracy=result.accuracy, num_images=result.num_images, clip=frozen.model_id,
                             split_digest=splits.digest(), templates=list(model.templates),
                             eval_precision=arithmetic("amp", device), **_per_class(result, classnames))
    record = {"dataset": dataset, "method": method, "split": split, "seed": 1,
              "accuracy": result.accuracy, "num_images": result.num_images, "images_per_s": result.images_per_s}
    return record, path


def _per_class(result: EvalResult, classnames: list[str]) -> dict:
    return {"classnames": classnames, "images_per_s": round(result.images_per_s, 2),
            "per_class_accuracy": [None if a is None else round(a, 4) for a in result.per_class]}


def final_weights(run: Path, record: dict) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """The final weights and their sha256 (None in a file of an earlier version), only if they were written for
    exactly the config run.json records."""
    try:
        tensors, metadata = load_tensors(run / FINAL_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        again = "write them again from its last checkpoint with `mugcp train ... --resume`"
        raise UserError(f"cannot read {run / FINAL_WEIGHTS} ({e}): the run's weights are damaged; "
                        f"{finish_hint(record, again)}") from None
    written_for = metadata.get("run")
    if written_for != identity_hash(record):
        raise UserError(f"{run} has not finished training for the config its run.json records (its final weights "
                        f"are from another config or an unfinished resume): {finish_hint(record)}")
    return tensors, metadata.get("sha256")


def trained_method(run: Path, info: dict, spec: RunSpec, device: torch.device) -> tuple[PromptMethod, FrozenClip]:
    """A finished run's method as it was trained (its CLIP, classes, config and final weights; their sha256 in its
    `weights_sha256`, which its results record), and that CLIP; `info` is its run.json."""
    names = info.get("classnames")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"{run / 'run.json'}: classnames is not a list of class names: not a run record this mugcp wrote")
    weights, digest = final_weights(run, info)
    frozen = load_clip(spec.clip, spec.pretrained, device)
    if frozen.model_id != info["clip_model_id"]:
        gelu = frozen.model_id.replace("-quickgelu@", "@") == info["clip_model_id"]  # see quick_gelu_forced
        raise UserError(f"run {run} was trained with CLIP {info['clip_model_id']}, but {frozen.model_id} loaded"
                        + (": its towers ran GELU under weights trained with QuickGELU (earlier versions of mugcp "
                           "built them so), not the CLIP the papers use; train it again" if gelu else ""))
    model = build_method(spec.method, frozen, info["classnames"], spec.dataset, spec.train_config().method).to(device)
    model.load_final_state(weights)
    model.weights_sha256 = digest
    return model, frozen


def run_eval(*, run: Optional[Path], output: Path, split: str, root: Optional[Path], device: torch.device,
             dataset: Optional[str] = None, batch_size: int = 128, workers: Optional[int] = None,
             as_json: bool = False, test_scp: Optional[str] = None) -> list[str]:
    """Evaluate a trained run on the test images of the base/novel/all classes of its own dataset, or of
    another dataset (`dataset`: its classes and templates, the run's learned prompts); return lines to print.

    `test_scp` (real, shuffled, zeros): a test-time control for a method that reads SCP, whatever SCP it was
    trained with. A model that reads SCP loses accuracy when each test image gets another image's SCP; one that
    fits through the image side alone does not. Its results are a file of their own (`results_path`)."""
    run = resolve_run(run, output)
    with hold(run / ".lock", f"the run folder {run}", shared=True):  # evaluations at once, but no train meanwhile
        info = read_run(run)
        spec = RunSpec.from_record(info, run)
        target = dataset or spec.dataset
        if target == spec.dataset and spec.subsample == "all" and split == "novel":
            raise UserError(f"run {run} trained on every class of {target}, so none is novel to it: evaluate it with "
                            f"--split all")
        if target != spec.dataset and spec.subsample != "all":  # the papers' xd/dg rows: a source run of every class
            raise UserError(f"--dataset {target}: cross-dataset and domain evaluation test a run trained on every "
                            f"class of its source (`mugcp train --subsample all --transfer`); {run} trained on the "
                            f"{spec.subsample} classes of {spec.dataset}")
        if target != spec.dataset and root is None:
            raise UserError(f"--dataset {target} needs --root: the run knows only where {spec.dataset} is")
        if root is not None:
            spec.root = str(Path(root).resolve())
        model, frozen = trained_method(run, info, spec, device)
        splits = load_dataset(target, spec.root)
        digest = splits.digest()
        if target == spec.dataset and info.get("split") not in (None, digest):
            raise UserError(f"{splits.root} does not hold the split run {run} was trained on (its images, labels or "
                            f"split file changed since): evaluate with the data it was trained on, or train again")
        test, classnames = eval_items(splits, split)
        model.set_classnames(classnames)
        if target != spec.dataset:
            model.use_templates(templates_for(model.template_table, target))
        source = (info.get("conditions") or {}).get("scp")  # test SCP must come from the MLLM and prompt training read
        target_spec = dataclasses.replace(spec, dataset=target)
        context = condition_context(target_spec, frozen, device, splits.root, source)
        if test_scp is not None and not model.reads_scp():
            raise UserError(f"--scp {test_scp}: {spec.method} reads no SCP, so there is nothing to control")
        if test_scp == context.scp:
            test_scp = None  # what it was trained with: the run's own evaluation
        if test_scp is not None:
            context = dataclasses.replace(context, scp=test_scp)
        conditions = Conditions(model.reads, context, test)
        precision = spec.train_config().optim.precision
        result = _evaluate_model(model, conditions, splits, test, classnames, device, batch_size, workers,
                                 f"eval {spec.method} {target} {split}", precision)
        own = spec.protocol or ("b2n" if spec.subsample == "base" else "fewshot")  # "transfer": a source's own test
        setting = own if target == spec.dataset else ("dg" if target in DOMAIN_TARGETS else "xd")
        where = results_path(run, split, None if target == spec.dataset else target, test_scp)
        path = write_results(where, dataset=target,
                             model=spec.clip, pretrained=spec.pretrained, task="prompt_classification",
                             metrics=result.metrics(), method=spec.method, setting=setting, source=spec.dataset,
                             split=split, seed=spec.seed, accuracy=result.accuracy, num_images=result.num_images,
                             shots=spec.shots, subsample=spec.subsample, clip=frozen.model_id, split_digest=digest,
                             conditions=info.get("conditions"), config=spec.config, weights_sha256=model.weights_sha256,
                             templates=list(model.templates),
                             eval_precision=arithmetic(precision, device),
                             **({"imported": info["imported"]} if info.get("imported") else {}),
                             **({"test_conditions": {"scp": test_scp}} if test_scp else {}),
                             **_per_class(result, classnames))
        control = f" with test SCP {test_scp}" if test_scp else ""
        lines = [json.dumps(read_results(path), indent=2)] if as_json else [
            f"{target} {spec.method} seed {spec.seed} {split}{control}: accuracy {result.accuracy:.2f}% on "
            f"{result.num_images} images -> {path}"]
        # a b2n summary of results of these weights, on this split, only
        both = [current_results(results_path(run, s, None, test_scp), info, model.weights_sha256)
                for s in ("base", "novel")]
        if (not as_json and spec.subsample == "base" and target == spec.dataset and None not in both
                and {r.get("split_digest", digest) for r in both} == {digest}):
            b, n = (r["accuracy"] for r in both)
            lines.append(f"Base {b:.2f}  Novel {n:.2f}  HM {harmonic_mean(b, n):.2f}")
        return lines
