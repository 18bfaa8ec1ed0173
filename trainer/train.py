"""`mugcp train`: a method's prompts trained on the few-shot draw, CLIP frozen, resumable exactly.

Training is deterministic on CPU for a seed and resumes exactly: each epoch's shuffling and
augmentation draw from a generator seeded by (seed, epoch), the optimiser's momentum and the
method's own training state are checkpointed, so `--resume` after a kill gives the same weights
as an uninterrupted run. The loop knows no method: it calls the method's `loss` with the
conditions it reads, and its hooks (`on_train_start`, `on_epoch_end`, `final_state_dict`).
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Optional

import torch

from mugcp.core.coop_datasets import Item, Splits, classnames_of, load_dataset
from mugcp.core.errors import UserError
from mugcp.core.files import write_json_atomic
from mugcp.core.frozen_clip import FrozenClip, load_clip
from mugcp.core.locks import hold
from mugcp.core.progress import progress
from mugcp.core.protocol import draw_fewshot, set_seed, subsample_classes
from mugcp.trainer.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    load_tensors,
    remove_unfinished,
    save_checkpoint,
    save_tensors,
)
from mugcp.trainer.conditions import ConditionContext, Conditions
from mugcp.trainer.loaders import DECODED_BUDGET, DecodedImages, EpochBatches, default_workers, iterate, make_loader
from mugcp.trainer.methods import build_method
from mugcp.trainer.methods.base import PromptMethod, TrainingShots
from mugcp.trainer.precision import amp_active, autocast, grad_scaler, input_dtype, to_half
from mugcp.trainer.results import weights_header
from mugcp.trainer.runs import (
    FINAL_WEIGHTS,
    HISTORY,
    RunSpec,
    identity,
    identity_hash,
    mark_latest,
    read_run,
    recorded_differences,
)


def cosine_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's schedule: constant warm-up lr, then cosine over `epochs` counted from the warm-up's end."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def condition_context(spec: RunSpec, frozen: FrozenClip, device: torch.device, data_folder: Path,
                      source: Optional[dict] = None) -> ConditionContext:
    """Where a run's conditions come from; `data_folder` is where its images are (`Splits.root`), `source`
    (evaluation) names the MLLM and prompt training read."""
    source = source or {}
    mllm = source.get("mllm") or spec.mllm
    controls = spec.train_config().conditions
    k = source.get("k") or (controls.k if controls else None)
    q = shlex.quote  # the hint is a command to paste: a path with a space stays one argument
    hint = (f" --root {q(spec.root)} --clip {q(spec.clip)} --pretrained {q(spec.pretrained or 'none')}"
            f" --cache-dir {q(spec.cache_dir)} --shots {spec.shots} --seeds {spec.seed}"
            + (" --train-classes base" if spec.subsample == "base" else "") + (f" --mllm {q(mllm)}" if mllm else "")
            + (f" --prompt {q(source['prompt'])}" if source.get("prompt") else "") + (f" --k {k}" if k else ""))
    prompt = source.get("prompt_version") or (controls.prompt if controls else None)
    return ConditionContext(spec.dataset, frozen.model_id, spec.cache_dir, mllm, prompt, device,
                            hint, scp=controls.scp if controls else "real", seed=spec.seed,
                            data_folder=data_folder, k=k)


def training_shots(train: list[Item], splits: Splits, frozen: FrozenClip, classnames: list[str],
                   device: torch.device, workers: int | None) -> TrainingShots:
    """The shots, with their frozen image features (test transform) computed only if a method asks."""

    @torch.no_grad()
    def image_features() -> torch.Tensor:
        loader = make_loader(train, splits.root, frozen.test_transform, frozen.image_size, 64, workers=workers,
                             device=device)
        return torch.cat([frozen.model.encode_image(images).float() for images, _, _ in iterate(loader, device,
                                                                                               frozen.dtype)])

    labels = torch.tensor([i.label for i in train], device=device)
    return TrainingShots(train, labels, classnames, image_features)


def run_train(spec: RunSpec, *, output: Path, device: torch.device, resume: bool = False,
              workers: int | None = None, log=print, wait: Optional[Callable[[str], object]] = None) -> Path:
    """Train `spec.method` on the few-shot draw of `spec.dataset`; return the run folder.

    Everything that can be checked is checked before the run folder is written; a run folder is
    written by one process at a time (another is refused, or given `wait`, waits for it: a sweep beside another
    one); `--resume` continues only the very run the folder records, and keeps it as it is once finished.
    """
    config = spec.train_config()
    run_dir = spec.run_dir(output)
    if config.optim.warmup_epochs >= config.optim.epochs:
        log(f"optim.warmup_epochs={config.optim.warmup_epochs} covers all {config.optim.epochs} epochs: the run trains "
            f"at optim.warmup_lr={config.optim.warmup_lr} throughout and never reaches optim.lr (as the reference "
            f"schedule would)")
    splits = load_dataset(spec.dataset, spec.root)
    for note in splits.notes:
        log(note)
    draw = draw_fewshot(splits, spec.shots, spec.seed)
    if draw.note:
        log(draw.note)
    (train,) = subsample_classes(draw.train, subsample=spec.subsample)
    classnames = classnames_of(train)
    frozen = load_clip(spec.clip, spec.pretrained, device)
    set_seed(spec.seed)
    model: PromptMethod = build_method(spec.method, frozen, classnames, spec.dataset, config.method).to(device)
    # a resumed run reads the SCP it began with, whatever tables a shared cache gained since (another k, prompt)
    began = read_run(run_dir) if resume and (run_dir / "run.json").is_file() else {}
    source = (began.get("conditions") or {}).get("scp")
    conditions = Conditions(model.reads, condition_context(spec, frozen, device, splits.root, source), train)
    record = {**spec.to_dict(), "clip_model_id": frozen.model_id, "split": splits.digest(),
              "draw": draw.source and draw.source["sha256"],  # identity: the draw's bytes, wherever $DATA is
              **({"draw_file": draw.source["file"]} if draw.source else {}),
              "classnames": classnames,
              "templates": list(model.templates), "conditions": conditions.provenance(),
              "learnable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              **({"as_built": model.as_built} if model.as_built else {})}
    for key, built in model.as_built.items():
        log(f"{key}={spec.config['method'][key.removeprefix('method.')]} does not fit {frozen.model_id} "
            f"({frozen.depth} layers, width {frozen.vision_width}): {built} built (run.json records it under as_built)")

    with hold(run_dir / ".lock", f"the run folder {run_dir}", wait=wait):
        held = (run_dir / "run.json").is_file() and (resume or (run_dir / FINAL_WEIGHTS).exists()
                                                     or latest_checkpoint(run_dir) is not None)
        held_record = read_run(run_dir) if held else {}
        if resume and not held and latest_checkpoint(run_dir) is not None:
            raise UserError(f"{run_dir} holds checkpoints but no run.json: the settings they were trained with are "
                            f"unknown, so resuming could mix two runs; delete the folder and train again")
        if held_record.get("imported"):
            raise UserError(f"{run_dir} holds a run imported from {held_record['imported'].get('file')}: train into "
                            f"another --output")
        # a record of an earlier version drew here (it records no `draw`): a reference draw now present would
        # change what it trains on
        changed = recorded_differences({**({"draw": None} if held_record else {}), **identity(held_record)},
                                       identity(record))
        if changed:
            drawn = (" (the draw is the reference's cached one, split_fewshot/ in the data folder: put it back, or "
                     "move it away, as it was when the run began)" if any(c.startswith("draw:") for c in changed)
                     else "")
            raise UserError(f"{run_dir} holds a run with other settings ({'; '.join(changed)}): train this one with "
                            f"another --output, or resume that one with its own settings{drawn}")
        if (run_dir / FINAL_WEIGHTS).exists() and not resume:
            raise UserError(f"{run_dir} already holds this run, finished: pass --resume to keep it, or another --output")
        if resume and finished_whole(run_dir, record, *([held_record] if held_record else [])):
            log(f"{run_dir} holds this run, finished")
            mark_latest(output, run_dir)
            return run_dir
        if latest_checkpoint(run_dir) and not resume:
            raise UserError(f"{run_dir} holds a partial run: pass --resume to continue it, or delete the folder")
        remove_unfinished(run_dir)
        return _train(spec, config, record, run_dir, output, splits, draw, train, classnames, frozen, model,
                      conditions, device, resume, workers, log)


def finished_whole(run_dir: Path, *records: dict) -> bool:
    """Whether the run's final weights are there, written for one of `records` (a resume also passes the record
    the folder holds: the same run as an earlier version recorded it, without the keys added since), their
    tensors undamaged (else they are written again: a `--resume` from the last checkpoint, an import anew)."""
    if weights_header(run_dir).get("run") not in {identity_hash(r) for r in records}:
        return False
    try:
        load_tensors(run_dir / FINAL_WEIGHTS)
        return True
    except Exception:  # whatever a damaged file raises: it is written again
        return False


def read_history(run_dir: Path) -> list[dict]:
    """The epochs a run has recorded (none yet: []); a damaged file is refused on one line."""
    if not (run_dir / HISTORY).is_file():
        return []
    try:
        history = json.loads((run_dir / HISTORY).read_text())
    except ValueError:
        history = None
    if not isinstance(history, list) or not all(isinstance(epoch, dict) for epoch in history):
        raise UserError(f"cannot resume: {run_dir / HISTORY} is damaged; delete the run folder and train again")
    return history


def check_finite(stats: dict, params: list[torch.Tensor], use_amp: bool, finite_steps: int) -> None:
    """Stop a run that diverged before it writes a checkpoint or weights that are not numbers.

    Under AMP the loss may overflow now and then (the grad scaler skips those steps), so there the
    weights are judged, and an epoch none of whose steps had a finite loss (the scaler skipped them all,
    its scale collapsing, while the weights stay finite and useless).
    """
    weights_ok = all(bool(torch.isfinite(p).all()) for p in params)
    if weights_ok and (math.isfinite(stats["loss"]) or (use_amp and finite_steps)):
        return
    what = ("its prompt weights are not finite" if not weights_ok else
            "its loss was not finite in any step" if use_amp else f"its loss is {stats['loss']}")
    raise UserError(f"training diverged in epoch {stats['epoch']} (lr {stats['lr']:.3g}): {what}; lower optim.lr "
                    f"or check the method's settings (the run is left unfinished, without final weights)")


def check_step(method: str, loss: torch.Tensor, logits: torch.Tensor, batch: int, classes: int) -> None:
    """A method's `loss` must give a scalar that depends on its learnt weights, and (batch, classes) logits: else
    SGD fails on an obscure error, or cross-entropy silently reads wider logits as more classes."""
    if loss.dim() == 0 and loss.requires_grad and tuple(logits.shape) == (batch, classes):
        return
    raise UserError(f"method {method}'s loss() returned a loss of shape {tuple(loss.shape)}"
                    f"{'' if loss.requires_grad else ' that no learnt weight moves'} and logits of shape "
                    f"{tuple(logits.shape)} for {batch} images of {classes} classes: it must return a scalar loss "
                    f"computed from its learnt weights and (images, classes) logits")


def _train(spec, config, record, run_dir, output, splits, draw, train, classnames, frozen, model, conditions,
           device, resume, workers, log) -> Path:
    optim_cfg = config.optim
    dtype = input_dtype(optim_cfg.precision)
    if dtype == torch.float16:  # the references' PREC "fp16": CLIP and the prompts as each reference holds them
        to_half(frozen.model, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                                weight_decay=optim_cfg.weight_decay)
    use_amp = amp_active(optim_cfg.precision, device)
    scaler = grad_scaler(optim_cfg.precision, device)
    start_epoch = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start_epoch = load_checkpoint(ckpt, model, optimizer, scaler)
        log(f"resuming {run_dir} after epoch {start_epoch}")
    elif resume and (run_dir / "run.json").is_file():
        log(f"{run_dir} holds no checkpoint to resume from: training it from the first epoch")
    write_json_atomic(run_dir / "run.json", record)
    draw.save(run_dir / "fewshot.json")
    # the epochs the checkpoint holds; an epoch written after it (a kill in between) is trained again
    history = read_history(run_dir)[:start_epoch]
    if (run_dir / HISTORY).is_file() and len(history) < start_epoch:  # written before each checkpoint: cut short
        raise UserError(f"cannot resume: {run_dir / HISTORY} records {len(history)} of the {start_epoch} epochs its "
                        f"checkpoint holds; delete the run folder and train again")
    if start_epoch and not history:  # lost, or a run of a version that wrote none: the weights are not affected
        log(f"{run_dir / HISTORY} is missing: the history written from here on lacks epochs 1-{start_epoch}")

    model.on_train_start(training_shots(train, splits, frozen, classnames, device, workers))
    epochs, batch_size = optim_cfg.epochs, optim_cfg.batch_size
    seeds = [spec.seed * 100_003 + epoch for epoch in range(epochs)]  # each epoch's order, crops, methods' draws
    batches = EpochBatches(len(train), batch_size, len(train) >= batch_size, seeds[start_epoch:])
    workers = default_workers() if workers is None else workers
    loader = make_loader(train, splits.root, frozen.train_transform, frozen.image_size, workers=workers,
                         decoded=DecodedImages(DECODED_BUDGET // max(1, workers)), epochs=batches, device=device)
    started = time.perf_counter()
    # one loader for every epoch, its workers started once and ended here, whatever ends the epochs
    with closing(iterate(loader, device, dtype)) as stream, progress() as bar:
        task = bar.add_task(f"train {spec.method} {spec.dataset}", total=epochs * len(train),
                            completed=start_epoch * len(train))
        for epoch in range(start_epoch, epochs):
            lr = cosine_lr(epoch, optim_cfg.lr, epochs, optim_cfg.warmup_epochs, optim_cfg.warmup_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(seeds[epoch])  # the methods' own randomness (e.g. GPT's mixup)
            model.train()
            seen = correct = finite_steps = 0
            loss_sum = 0.0
            for images, labels, index in itertools.islice(stream, batches.per_epoch):
                labels = labels.to(device)
                given = {k: v.to(dtype) if v.is_floating_point() else v for k, v in conditions(index).items()}
                with autocast(optim_cfg.precision, device):
                    loss, logits = model.loss(images, labels, **given)
                check_step(spec.method, loss, logits, len(labels), len(classnames))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(labels)
                correct += int((logits.argmax(-1) == labels).sum())
                step_loss = float(loss.detach())
                finite_steps += math.isfinite(step_loss)
                loss_sum += step_loss * len(labels)
                bar.update(task, advance=len(labels),
                           description=f"train {spec.method} ep {epoch + 1}/{epochs} loss {loss_sum / seen:.3f} "
                                       f"acc {100 * correct / seen:.1f}")
            model.on_epoch_end(epoch, epochs)
            stats = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(seen, 1),
                     "accuracy": 100 * correct / max(seen, 1)}
            check_finite(stats, params, use_amp, finite_steps)
            history.append(stats)
            write_json_atomic(run_dir / HISTORY, history)
            save_checkpoint(run_dir, epoch, model, optimizer, scaler)
            log(f"epoch {epoch + 1}/{epochs} lr {lr:.2e} loss {stats['loss']:.4f} acc {stats['accuracy']:.2f}")
    save_tensors(run_dir / FINAL_WEIGHTS, model.final_state_dict(), {"run": identity_hash(record)})
    mark_latest(output, run_dir)
    log(f"trained {spec.method} on {len(train)} images of {len(classnames)} classes in "
        f"{time.perf_counter() - started:.1f} s -> {run_dir}")
    return run_dir
