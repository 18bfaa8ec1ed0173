"""`mugcp import`: checkpoints of a method's reference code as run folders that `mugcp eval` and `report` read.

The reference trainers (CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC) save through Dassl:
`<output>/<model name>/model.pth.tar-<epoch>`, a `{"state_dict", "epoch", "optimizer", "scheduler"}` dict.
Each method maps its reference's tensor names onto its own (`PromptMethod.from_reference`) and reads
its options' shapes from the tensors (context length, depth); the rest of its config is the method's
reference config for the setting, as `mugcp train` would use. So published checkpoints, or a user's
earlier runs of the reference code, are scored with mugcp's protocol beside runs trained here.

What is checked before anything is written: the file is read without running any of its code (torch's
weights-only loader; the objects Dassl pickles besides tensors, its schedulers, load as inert stand-ins);
its tensors are exactly the method's prompts plus what the reference keeps frozen; the CLIP is the one it
was trained with (the saved start-of-text and, in whole-model checkpoints, patch embeddings); and the class
prompts it saved (`token_suffix`: the embedded words after the context, class names in order) are the ones
the run's classes and prompt words give, which also settles whether init words beyond the context stay in
the prompt (MaPLe's "a photo" + "of a {class}.") or not. A checkpoint in half precision (the references'
PREC "fp16") is evaluated in half precision, as its reference evaluates it. run.json records the file and
its sha256.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Optional

import torch

from mugcp.core.coop_datasets import DATASETS, classnames_of, load_dataset, prompt_name
from mugcp.core.errors import UserError
from mugcp.core.files import file_sha256, walk_files, write_json_atomic
from mugcp.core.frozen_clip import FrozenClip, load_clip
from mugcp.core.locks import hold
from mugcp.core.protocol import subsample_classes
from mugcp.trainer.checkpoints import save_tensors
from mugcp.trainer.config import TrainConfig, run_config
from mugcp.trainer.evaluation import run_eval
from mugcp.trainer.methods import available_methods, build_method, method_class
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.runs import (
    FINAL_WEIGHTS,
    RunSpec,
    identity,
    identity_hash,
    mark_latest,
    read_run,
    recorded_differences,
)
from mugcp.trainer.train import finished_whole


def importable_methods() -> list[str]:
    return [m for m in available_methods() if method_class(m).reference_code]


# -- finding and reading checkpoints -----------------------------------------------------------------

def find_checkpoints(path: Path) -> list[Path]:
    """Every reference run's checkpoint under `path` (links followed): the file itself, or per run folder (the
    parent of Dassl's model folder) the file its `checkpoint` marker names (the last one saved), or its only one."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"no checkpoint at {path}: give a reference run's model.pth.tar-N, its output folder, or a "
                        f"folder of such runs")
    by_run: dict[Path, set[Path]] = {}
    for folder, files in walk_files(path):
        for name in files:
            if re.fullmatch(r"model.*\.pth\.tar.*", name):
                by_run.setdefault(folder.parent, set()).add(folder / name)
    chosen = []
    for run, found in sorted(by_run.items()):
        named = set()
        for marker in run.glob("*/checkpoint"):
            name = (marker.read_text(errors="replace").strip().splitlines() or [""])[0]
            if not (marker.parent / name).is_file():
                raise UserError(f"{marker} names {name or 'nothing'}, which is not there: give the checkpoint file")
            named.add(marker.parent / name)
        pick = sorted(named or found)
        if len(pick) != 1:
            listed = ", ".join(str(p.relative_to(run)) for p in pick[:4])
            raise UserError(f"{run} holds {len(pick)} checkpoints ({listed}): give the file")
        chosen += pick
    if not chosen:
        raise UserError(f"no checkpoint (model*.pth.tar*) under {path}")
    return chosen


def dataset_named(path: Path) -> Optional[str]:
    """The dataset a reference output path names (the reference scripts name folders after the datasets)."""
    return next((part for part in reversed(path.parts) if part in DATASETS), None)


def seed_and_shots(path: Path) -> tuple[Optional[int], Optional[int]]:
    """The seed and shots a reference output path names (`.../shots_16/.../seed1/...`, `..._16shots/...`)."""
    seed = shots = None
    for part in path.parts:
        if m := re.fullmatch(r"seed(\d+)", part):
            seed = int(m[1])
        if m := re.search(r"(?:^|_)shots_(\d+)(?:_|$)|(?:^|_)(\d+)shots(?:_|$)", part):
            shots = int(m[1] or m[2])
    return seed, shots


class _Inert:
    """Stands for an object a checkpoint pickles besides tensors and containers (Dassl's schedulers and their
    optimiser): built without running any of its code, never read."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _plain_dict(*args):
    return {}


_CONTAINERS = {"builtins.dict": dict, "collections.defaultdict": _plain_dict}  # rebuilt as plain dicts


def read_reference_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Optional[int]]:
    """The state dict and epoch of a Dassl checkpoint, read with torch's weights-only loader (a file in torch's
    pre-1.6 format is read by it as it is: it cannot list what the file would import)."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if zipfile.is_zipfile(path) else []
        with torch.serialization.safe_globals([(_CONTAINERS.get(n, _Inert), n) for n in unknown]):
            held = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch says a file it cannot read in many ways (RuntimeError, UnpicklingError, ...)
        text = str(e)
        why = (re.findall(r"WeightsUnpickler error: *(.+)", text) or text.strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {path} as a PyTorch checkpoint without running code in it "
                        f"({type(e).__name__}: {why[:120]})") from None
    state = held.get("state_dict") if isinstance(held, dict) else None
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise UserError(f"{path} is not a checkpoint of the reference code (Dassl saves a dict whose state_dict "
                        f"maps names to tensors)")
    epoch = held.get("epoch")
    return {k.removeprefix("module."): v for k, v in state.items()}, epoch if isinstance(epoch, int) else None


def _reads(method: str, state: dict[str, torch.Tensor]) -> bool:
    try:
        method_class(method).from_reference(state)
        return True
    except UserError:
        return False


# -- what the checkpoint says about its CLIP and its prompts ------------------------------------------

def _saved(state: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    """A class-prompt buffer every reference saves: `token_prefix` (C, 1, d), `token_suffix` (C, L, d)."""
    held = next(v for k, v in state.items() if k.endswith(name))
    if held.dim() != 3 or not held.dtype.is_floating_point:
        raise UserError(f"{path}: its {name} is {tuple(held.shape)} {held.dtype}, not the (classes, tokens, width) "
                        f"embeddings its reference saves")
    return held


def _check_clip(state: dict[str, torch.Tensor], frozen: FrozenClip, path: Path) -> None:
    """Prompts learnt against another CLIP mean nothing to this one. Every reference prompt learner saves the class
    prompts' first token (start of text) as the CLIP embeds it; MaPLe and PromptSRC save the whole model, so its
    patch embedding too (in half precision under the references' fp16, which OpenAI's weights are)."""
    if not any(type(m).__name__ == "QuickGELU" for m in frozen.model.modules()):
        raise UserError(f"the reference code runs OpenAI's CLIP, whose blocks use QuickGELU; {frozen.model_id} uses "
                        f"GELU: give its -quickgelu model (e.g. --clip ViT-B-16-quickgelu)")
    sot = frozen.model.token_embedding.weight[int(frozen.tokenize([""])[0, 0])]
    pairs = [(_saved(state, "token_prefix", path)[0, 0], sot, "start-of-text embedding")]
    if "image_encoder.conv1.weight" in state:
        pairs.append((state["image_encoder.conv1.weight"], frozen.model.visual.conv1.weight, "patch embedding"))
    for theirs, ours, what in pairs:
        ours = ours.detach().float().cpu()
        if theirs.shape != ours.shape or not bool(_within(theirs, ours, theirs.dtype).all()):
            raise UserError(f"{path} was trained with another CLIP than {frozen.model_id} (its {what} differs): give "
                            f"the --clip and --pretrained it was trained with")


def _rows(saved: torch.Tensor, model: PromptMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's class prompts and the model's (after the context), both (C, L, d) up to the model's cut."""
    ours = model.text.suffix.detach().float().cpu()
    return saved[:, :ours.shape[1]].float(), ours


def _within(a: torch.Tensor, b: torch.Tensor, saved_as: torch.dtype) -> torch.Tensor:
    """Element by element, whether `a` (saved as `saved_as`: fp16, bf16, fp32) holds `b`'s numbers up to rounding."""
    rtol = max(1e-5, 2 * torch.finfo(saved_as).eps)
    return (a.float() - b.float()).abs() <= 1e-4 + rtol * b.float().abs()


def _close(a: torch.Tensor, b: torch.Tensor, saved_as: torch.dtype) -> torch.Tensor:
    """Whether rows of `a` and `b` (..., L, d) embed the same words, up to the saved rounding."""
    return _within(a, b, saved_as).flatten(-2).all(-1)


def _same_prompts(saved: torch.Tensor, model: PromptMethod) -> bool:
    theirs, ours = _rows(saved, model)
    return theirs.shape == ours.shape and bool(_close(theirs, ours, saved.dtype).all())


def _saved_text(row: torch.Tensor, frozen: FrozenClip) -> str:
    """What a saved class prompt says: each embedded token read back as its nearest token, up to end-of-text."""
    table = frozen.model.token_embedding.weight.detach().float().cpu()
    ids = torch.cdist(row.float(), table).argmin(-1).tolist()
    eot = int(frozen.tokenize([""])[0, 1])
    ids = ids[:ids.index(eot)] if eot in ids else ids
    decode = getattr(frozen.tokenizer, "decode", None)
    return re.sub(r"\s+([.,!?])", r"\1", decode(ids).strip()) if decode else " ".join(map(str, ids))


def _prompt_mismatch(saved: torch.Tensor, model: PromptMethod, frozen: FrozenClip, path: Path) -> str:
    """Why the checkpoint's class prompts are not the model's: their order, or what the first one says."""
    theirs, ours = _rows(saved, model)
    if theirs.shape != ours.shape:  # a longer class prompt than any of these classes has
        first = 0
    else:
        distance = torch.cdist(theirs.flatten(1), ours.flatten(1))  # (C, C), no (C, C, L, d) tensor: C may be 1,000
        nearest = distance.argmin(1)
        if sorted(nearest.tolist()) == list(range(len(ours))) and bool(_close(theirs, ours[nearest], saved.dtype).all()):
            return f"{path} was trained on these classes in another order: check --dataset and its split"
        first = int((~_close(theirs, ours, saved.dtype)).nonzero()[0])
    said = _saved_text(saved[first], frozen)
    expected = model.text.suffix_template.format(prompt_name(model.classnames[first]))
    return (f"{path} was trained with prompts that do not match: its class {first} reads '... {said}' after the "
            f"context, where {model.name} on these classes gives '... {expected}': check --dataset and --subsample")


# -- one checkpoint --------------------------------------------------------------------------------

def _imported_config(method: str, protocol: str, dataset: str, shots: int, implied: list[str],
                    overrides: list[str] = ()) -> tuple[TrainConfig, str, list[str]]:
    """The method's reference config for the setting, then what the checkpoint implies, then the user's `--set`;
    and what was implied. A context longer than its init words gets none: every reference draws it at random."""
    config, folder = run_config(method, protocol, dataset, shots, None, [*implied, *overrides])
    if hasattr(config.method, "ctx_init") and config.method.n_ctx > len(config.method.ctx_init.split()):
        implied = [*implied, "method.ctx_init=''"]
        config, folder = run_config(method, protocol, dataset, shots, None, [*implied, *overrides])
    return config, folder, implied


def _built(method: str, protocol: str, dataset: str, shots: int, implied: list[str], overrides: list[str],
           frozen: FrozenClip, classnames: list[str], saved_suffix: torch.Tensor, path: Path):
    """The method built as the checkpoint was trained: its class prompts must read as the saved ones. Init words
    beyond the context stay in the prompt in MaPLe's and PromptSRC's code when they were given, never in CoOp's
    (it sets the context's length to the words'), and a random start has none: the saved prompts tell which."""
    config, folder, implied = _imported_config(method, protocol, dataset, shots, implied, overrides)
    tokens = frozen.tokenize([""]).shape[1] - 1 - config.method.n_ctx  # what the reference saves: every token after
    if saved_suffix.shape[1] != tokens:                                  # the context, padding included
        raise UserError(f"{path}: its token_suffix holds {saved_suffix.shape[1]} tokens per class, where a context of "
                        f"{config.method.n_ctx} leaves {tokens}: not the class prompts its reference saves")
    model = build_method(method, frozen, classnames, dataset, config.method)
    if _same_prompts(saved_suffix, model):
        return model, config, folder, implied
    if getattr(config.method, "ctx_init", ""):
        bare = [*implied, "method.ctx_init=''"]
        alt_config, alt_folder, _ = _imported_config(method, protocol, dataset, shots, bare, overrides)
        alt = build_method(method, frozen, classnames, dataset, alt_config.method)
        if _same_prompts(saved_suffix, alt):
            return alt, alt_config, alt_folder, bare
    raise UserError(_prompt_mismatch(saved_suffix, model, frozen, path))


def reference_weights(state: dict[str, torch.Tensor], method: str,
                      path: Path) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """A checkpoint's prompts under the method's names, the overrides their shapes imply and their dtypes; refused
    when they are another method's (the message names it) or not finite."""
    try:
        weights, shaped = method_class(method).from_reference(state)
    except UserError as e:
        fits = [m for m in importable_methods() if m != method and _reads(m, state)]
        raise UserError(f"{e}" + (f"; it is laid out as {' or '.join(fits)} saves: --method {fits[0]}" if fits else "")) \
            from None
    broken = sorted(k for k, v in weights.items() if not torch.isfinite(v).all())
    if broken:
        raise UserError(f"{path} holds prompts that are not finite numbers ({', '.join(broken[:3])}): its run diverged")
    return weights, shaped, sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})


def reference_model(state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], shaped: list[str],
                    dtypes: list[str], method: str, frozen: FrozenClip, classnames: list[str], dataset: str,
                    protocol: str, shots: int, overrides: list[str], path: Path):
    """The method built as the checkpoint was trained, on `classnames` (the classes its saved class prompts hold, in
    order), its weights loaded; with its config, run folder setting and what the checkpoint implied."""
    implied = [*shaped, *(["optim.precision=fp16"] if "float16" in dtypes else [])]
    model, config, folder, implied = _built(method, protocol, dataset, shots, implied, overrides, frozen, classnames,
                                            _saved(state, "token_suffix", path), path)
    expected = set(model.learnable_state_dict())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise UserError(f"{path} does not hold {method}'s prompts as built for {frozen.model_id} (missing "
                        f"{missing[:3]}, unexpected {extra[:3]}): its depth may exceed this CLIP's layers")
    model.load_final_state(weights)
    return model, config, folder, implied


def import_checkpoint(checkpoint: Path, *, method: str, dataset: str, root: Path, subsample: str, transfer: bool,
                      seed: Optional[int], shots: Optional[int], clip: str, pretrained: Optional[str],
                      overrides: list[str], output: Path, device: torch.device, log=print) -> Path:
    """Write the run folder of one reference checkpoint file; return it. Refused on one line, before anything is
    written, when the checkpoint is not the method's, not the CLIP's, or not the setting's classes."""
    cls = method_class(method)
    if not cls.reference_code:
        raise UserError(f"method '{method}' has no reference code whose checkpoints mugcp reads: import one of "
                        f"{', '.join(importable_methods())}")
    path = Path(checkpoint)
    if m := re.search(r"ctp(middle|front)", f"{path.absolute()} {path.resolve()}"):
        raise UserError(f"{path} was trained with the class token {m[1] == 'front' and 'in front' or 'in the middle'} "
                        f"(its path says {m[0]}); mugcp places it at the end, CoOp's default")
    named_seed, named_shots = seed_and_shots(path)
    seed, shots = (named_seed if seed is None else seed), (named_shots if shots is None else shots)
    if seed is None or shots is None:
        raise UserError(f"{path} does not name its {'seed' if seed is None else 'shots'} (a reference output path "
                        f"holds seedN and shots_K): pass --seed and --shots")
    state, epoch = read_reference_checkpoint(path)
    weights, shaped, dtypes = reference_weights(state, method, path)  # refused before any dataset or CLIP loads
    protocol = "transfer" if transfer else "b2n" if subsample == "base" else "fewshot"
    splits = load_dataset(dataset, root)
    (train,) = subsample_classes(splits.train, subsample=subsample)
    classnames = classnames_of(train)
    prefix, suffix = _saved(state, "token_prefix", path), _saved(state, "token_suffix", path)
    if len(prefix) != len(classnames) or len(suffix) != len(classnames):
        raise UserError(f"{path} was trained on {len(prefix)} classes; {dataset}'s {subsample} classes are "
                        f"{len(classnames)}: check --dataset and --subsample")
    frozen = load_clip(clip, pretrained, device)
    _check_clip(state, frozen, path)
    model, config, folder, implied = reference_model(state, weights, shaped, dtypes, method, frozen, classnames,
                                                     dataset, protocol, shots, overrides, path)

    spec = RunSpec(dataset, str(Path(root).resolve()), method, shots, seed, subsample, clip, pretrained, "", None,
                   config.to_dict(), folder)
    source = {"file": str(path.absolute()), "sha256": file_sha256(path), "code": cls.reference_code, "epoch": epoch,
              "dtype": ", ".join(dtypes), "implied": implied}
    record = {**spec.to_dict(), "clip_model_id": frozen.model_id, "split": splits.digest(), "classnames": classnames,
              "templates": list(model.templates), "conditions": {},
              "learnable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "imported": source}
    run_dir = spec.run_dir(output)
    with hold(run_dir / ".lock", f"the run folder {run_dir}"):
        if (run_dir / "run.json").is_file():  # the same import, finished or killed before its weights, goes on
            changed = recorded_differences(identity(read_run(run_dir)), identity(record))
            if changed or "imported" not in read_run(run_dir):
                raise UserError(f"{run_dir} holds another run ({'; '.join(changed) or 'trained here'}): import into "
                                f"another --output")
            if finished_whole(run_dir, record):
                log(f"{run_dir} already holds this checkpoint")
                mark_latest(output, run_dir)
                return run_dir
        write_json_atomic(run_dir / "run.json", record)
        save_tensors(run_dir / FINAL_WEIGHTS, model.final_state_dict(), {"run": identity_hash(record)})
    mark_latest(output, run_dir)
    log(f"imported {method} ({cls.reference_code}, epoch {epoch}, {source['dtype']}) with "
        f"{' '.join([*implied, *overrides]) or 'its reference config'} -> {run_dir}")
    return run_dir


def import_runs(path: Path, *, method: str, dataset: Optional[str], evaluate: bool, output: Path,
                device: torch.device, workers: Optional[int] = None, log=print, **options) -> list[str]:
    """Import every reference checkpoint at `path` (a file, a run's output folder, or a folder of runs: each
    run's dataset, seed and shots read off its path unless given), then, with `evaluate`, test each on its
    setting's classes (base and novel, or all; base only for class-specific context, which has no other). One
    checkpoint is refused on one line; of several, the ones that fail are returned as lines and the others go on."""
    files = find_checkpoints(Path(path))
    failed = []
    for file in files:
        try:
            named = dataset or dataset_named(file)
            if named is None:
                raise UserError(f"{file} names no dataset this mugcp knows: pass --dataset")
            run = import_checkpoint(file, method=method, dataset=named, output=output, device=device, log=log,
                                    **options)
            splits = ("all",) if options["subsample"] == "all" else ("base", "novel")
            if read_run(run)["config"]["method"].get("csc"):
                splits = splits[:1]
                log(f"{run}: class-specific context is tested on its own classes only")
            for split in splits if evaluate else ():
                for line in run_eval(run=run, output=output, split=split, root=None, device=device, workers=workers):
                    log(line)
        except UserError as e:
            if len(files) == 1:
                raise
            failed.append(f"{file}: {e}")
    return failed
