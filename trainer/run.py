"""Stage two end to end: `mugcp train` and `mugcp eval` for every learned method.

A run folder holds everything needed to repeat and audit it:

    runs/<dataset>/<method>/<setting>/seed<S>/
        run.json              settings (dataset, method, shots, seed, subsample, CLIP, config, cache)
        fewshot.json          the drawn train/val lists (the protocol's audit trail)
        checkpoints/epoch-N/  learnable parameters + optimiser state (safetensors), one folder per epoch,
                              renamed into place whole, so a kill -9 never leaves a torn checkpoint
        prompt.safetensors    the final learnable parameters (the last epoch's: no early stopping on test)
        results_<split>.json  accuracy on the base / novel / all test classes

Training is deterministic on CPU for a seed and resumes exactly: each epoch's shuffling and
augmentation draw from a generator seeded by (seed, epoch), and the optimiser's momentum is
checkpointed, so `--resume` after a kill gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mugcp.clip import load_clip
from mugcp.datasets import classnames_of, load_dataset
from mugcp.errors import UserError
from mugcp.io import write_bytes_atomic, write_json_atomic
from mugcp.progress import progress
from mugcp.protocol import Draw, draw_fewshot, harmonic_mean, set_seed, subsample_classes
from trainer.config import load_config
from trainer.data import iterate, make_loader
from trainer.evaluate import evaluate
from trainer.method import build_method
from trainer.results import read_results, results_path, write_results

LATEST = "latest-run.txt"


@dataclass
class RunSpec:
    """What defines a run; written to run.json and read back by `mugcp eval`."""

    dataset: str
    root: str
    method: str
    shots: int
    seed: int
    subsample: str
    clip: str
    pretrained: str | None
    cache_dir: str
    mllm: str | None
    config: dict

    @property
    def setting(self) -> str:
        return f"{'b2n' if self.subsample == 'base' else self.subsample}_shots{self.shots}"

    def run_dir(self, output: Path) -> Path:
        return Path(output) / self.dataset / self.method / self.setting / f"seed{self.seed}"


def cosine_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's schedule: constant warm-up lr, then cosine over `epochs` counted from the warm-up's end."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


class ScpLookup:
    """The stage-one SCP tensors of a list of images, fetched per batch by index."""

    def __init__(self, spec: RunSpec, clip_model_id: str, items, device, prompt_version: str | None = None):
        from mugcp.cache import read_scp

        hint = f" --root {spec.root} --clip {spec.clip} --pretrained {spec.pretrained} --cache-dir {spec.cache_dir}"
        found = read_scp(spec.cache_dir, spec.dataset, clip_model_id, [i.path for i in items], mllm=spec.mllm,
                         prompt_version=prompt_version, hint=hint)
        self.scp, self.mask = torch.from_numpy(found.scp.copy()), torch.from_numpy(found.mask)
        self.meta, self.device = found.meta, device

    def __call__(self, index: torch.Tensor):
        return self.scp[index].to(self.device).float(), self.mask[index].to(self.device)


def _scp_lookup(method, spec, frozen, items, device, prompt_version=None):
    return ScpLookup(spec, frozen.model_id, items, device, prompt_version) if method.uses_scp else None


def _batch_inputs(scp_lookup, index):
    if scp_lookup is None:
        return {}
    scp, mask = scp_lookup(index)
    return {"scp": scp, "scp_mask": mask}


@torch.no_grad()
def _prepare(model, frozen, train, root, train_classnames, device, workers) -> None:
    """Hand methods that ask for it the frozen image features of the training shots (test transform)."""
    if not model.needs_train_features:
        return
    loader = make_loader(train, root, frozen.test_transform, frozen.image_size, 64, workers=workers)
    feats, labels = [], []
    for images, y, _ in iterate(loader):
        feats.append(frozen.model.encode_image(images.to(device)).float())
        labels.append(y)
    model.prepare(torch.cat(feats), torch.cat(labels).to(device), train_classnames)


def _latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted((run_dir / "checkpoints").glob("epoch-*"))
    return done[-1] if done else None


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save as to_bytes

    write_bytes_atomic(path, to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def _save_checkpoint(run_dir: Path, epoch: int, method, optimizer, scaler) -> None:
    """Write epoch N's learnable weights, optimiser and loss-scaler state into a folder renamed into place whole."""
    final = run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(tmp / "prompt.safetensors", method.learnable_state_dict())
    names = {id(p): n for n, p in method.named_parameters()}
    momentum = {names[id(p)]: s["momentum_buffer"] for group in optimizer.param_groups for p in group["params"]
                if (s := optimizer.state.get(p)) and s.get("momentum_buffer") is not None}
    _save_tensors(tmp / "optim.safetensors", momentum)
    write_json_atomic(tmp / "scaler.json", scaler.state_dict())  # empty when mixed precision is off
    tmp.rename(final)
    for old in sorted((run_dir / "checkpoints").glob("epoch-*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, method, optimizer, scaler) -> int:
    from safetensors.torch import load_file

    method.load_learnable_state_dict(load_file(str(ckpt / "prompt.safetensors")))
    momentum = load_file(str(ckpt / "optim.safetensors"))
    params = dict(method.named_parameters())
    for name, buf in momentum.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device)
    scaler_state = json.loads((ckpt / "scaler.json").read_text()) if (ckpt / "scaler.json").is_file() else {}
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    return int(ckpt.name.split("-")[1])


def run_train(dataset: str, root: Path, *, method: str = "mugcp", shots: int = 16, seed: int = 1,
              subsample: str = "base", config_file: Path | None = None, overrides: list[str] = (),
              output: Path = Path("runs"), cache_dir: Path = Path("cache"), mllm: str | None = None,
              clip: str, pretrained: str | None, device: torch.device, resume: bool = False,
              workers: int | None = None, log=print) -> Path:
    """Train `method` on the few-shot draw of `dataset` (base classes by default); return the run folder."""
    config = load_config(method, config_file, overrides)
    spec = RunSpec(dataset, str(Path(root).resolve()), method, shots, seed, subsample, clip, pretrained,
                   str(Path(cache_dir).resolve()), mllm, config)
    run_dir = spec.run_dir(output)
    if (run_dir / "prompt.safetensors").exists() and not resume:
        raise UserError(f"{run_dir} already holds a finished run: pass --resume to keep it, or another --output")
    if run_dir.exists() and not resume and _latest_checkpoint(run_dir):
        raise UserError(f"{run_dir} holds a partial run: pass --resume to continue it, or delete the folder")

    splits = load_dataset(dataset, root)
    for note in splits.notes:
        log(note)
    draw = draw_fewshot(splits, shots, seed)
    (train,) = subsample_classes(draw.train, subsample=subsample)
    classnames = classnames_of(train)
    frozen = load_clip(clip, pretrained, device)
    set_seed(seed)
    model = build_method(method, frozen, classnames, splits.spec.template, config["method"]).to(device)
    scp_lookup = _scp_lookup(model, spec, frozen, train, device)

    optim_cfg = config["optim"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=optim_cfg["lr"], momentum=optim_cfg["momentum"],
                                weight_decay=optim_cfg["weight_decay"])
    use_amp = device.type == "cuda" and optim_cfg.get("precision", "amp") == "amp"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch = 0
    ckpt = _latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start_epoch = _load_checkpoint(ckpt, model, optimizer, scaler)
        log(f"resuming {run_dir} after epoch {start_epoch}")
    run_dir.mkdir(parents=True, exist_ok=True)
    scp_source = {"mllm": scp_lookup.meta.mllm, "prompt_version": scp_lookup.meta.prompt_version} if scp_lookup else None
    write_json_atomic(run_dir / "run.json", {**spec.__dict__, "clip_model_id": frozen.model_id,
                                             "classnames": classnames, "template": splits.spec.template,
                                             "scp_source": scp_source})
    draw.save(run_dir / "fewshot.json")
    write_bytes_atomic(Path(output) / LATEST, (str(run_dir.resolve()) + "\n").encode())

    _prepare(model, frozen, train, splits.root, classnames, device, workers)
    epochs, batch_size = optim_cfg["epochs"], optim_cfg["batch_size"]
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"train {method} {dataset}", total=epochs * len(train), completed=start_epoch * len(train))
        for epoch in range(start_epoch, epochs):
            lr = cosine_lr(epoch, optim_cfg["lr"], epochs, optim_cfg["warmup_epochs"], optim_cfg["warmup_lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            torch.manual_seed(seed * 100_003 + epoch)  # augmentation randomness when loading in-process
            loader = make_loader(train, splits.root, frozen.train_transform, frozen.image_size, batch_size,
                                 shuffle=True, drop_last=len(train) >= batch_size, workers=workers, generator=gen)
            model.train()
            seen = correct = 0
            loss_sum = 0.0
            for images, labels, index in iterate(loader):
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    loss, logits = model.loss(images, labels, **_batch_inputs(scp_lookup, index))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(labels)
                correct += int((logits.argmax(-1) == labels).sum())
                loss_sum += float(loss.detach()) * len(labels)
                bar.update(task, advance=len(labels),
                           description=f"train {method} ep {epoch + 1}/{epochs} loss {loss_sum / seen:.3f} "
                                       f"acc {100 * correct / seen:.1f}")
            _save_checkpoint(run_dir, epoch, model, optimizer, scaler)
            log(f"epoch {epoch + 1}/{epochs} lr {lr:.2e} loss {loss_sum / max(seen, 1):.4f} "
                f"acc {100 * correct / max(seen, 1):.2f}")
    _save_tensors(run_dir / "prompt.safetensors", model.learnable_state_dict())
    log(f"trained {method} on {len(train)} images of {len(classnames)} classes in "
        f"{time.perf_counter() - started:.1f} s -> {run_dir}")
    return run_dir


def resolve_run(run: Path | None, output: Path) -> Path:
    if run is None:
        marker = Path(output) / LATEST
        if not marker.is_file():
            raise UserError(f"no run given and no latest run under {output}: train one with `mugcp train` "
                            f"or pass --run DIR")
        run = Path(marker.read_text().strip())
    if not (run / "run.json").is_file():
        raise UserError(f"{run} is not a run folder (no run.json): pass the folder `mugcp train` printed")
    if not (run / "prompt.safetensors").is_file():
        raise UserError(f"{run} has not finished training: finish it with `mugcp train ... --resume`")
    return run


def run_eval(*, run: Path | None, output: Path, split: str, root: Path | None, device: torch.device,
             batch_size: int = 128, workers: int | None = None, as_json: bool = False) -> list[str]:
    """Evaluate a trained run on the test images of the base/novel/all classes; return lines to print."""
    from safetensors.torch import load_file

    run = resolve_run(run, output)
    info = json.loads((run / "run.json").read_text())
    spec = RunSpec(**{k: info[k] for k in RunSpec.__dataclass_fields__})
    if root is not None:
        spec.root = str(Path(root).resolve())
    splits = load_dataset(spec.dataset, spec.root)
    test, reference = subsample_classes(splits.test, splits.train, subsample=split, labels_from=splits.train)
    classnames = classnames_of(reference)
    frozen = load_clip(spec.clip, spec.pretrained, device)
    if frozen.model_id != info["clip_model_id"]:
        raise UserError(f"run {run} was trained with CLIP {info['clip_model_id']}, but {frozen.model_id} loaded")
    model = build_method(spec.method, frozen, classnames, splits.spec.template, spec.config["method"]).to(device)
    model.load_learnable_state_dict(load_file(str(run / "prompt.safetensors")))
    if model.needs_train_features:
        (train,) = subsample_classes(Draw.load(run / "fewshot.json").train, subsample=spec.subsample)
        _prepare(model, frozen, train, splits.root, classnames_of(train), device, workers)
    model.eval()
    source = info.get("scp_source") or {}
    if source:  # test SCP must come from the MLLM and prompt that training saw
        spec.mllm = source["mllm"]
    scp_lookup = _scp_lookup(model, spec, frozen, test, device, source.get("prompt_version"))

    def logits_fn(images, index):
        return model(images, **_batch_inputs(scp_lookup, index))

    loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, batch_size, workers=workers)
    result = evaluate(logits_fn, loader, len(classnames), device, description=f"eval {spec.method} {split}")
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
