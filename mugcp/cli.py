"""The `mugcp` command: thin — it parses options and calls one function per command.

Option defaults and help come from the typed configs where one exists (one source of defaults).
Every option is checked before anything is written: by typer's own types and ranges here, then by
the typed configs. Bad input surfaces as one line on stderr and exit code 2, never a traceback.
The stages are imported inside the commands that use them, so `mugcp --help` answers at once
(torch and open_clip take seconds to import); nothing imports this floor, so no cycle hides here.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from mugcp.core.defaults import DEFAULT_CLIP, DEFAULT_PRETRAINED, SCP_SOURCES
from mugcp.core.errors import UserError
from mugcp.core.settings import validate
from mugcp.pipeline.config import SPLITS, BackendConfig, ExtractConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prompt learning for a frozen CLIP, conditioned on what a multimodal LLM says about each image.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in demo data.")
models_app = typer.Typer(no_args_is_help=True, help="Built-in tiny models (no download).")
config_app = typer.Typer(no_args_is_help=True, help="Methods and their effective configs.")
cache_app = typer.Typer(no_args_is_help=True, help="The stage-one cache.")
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

def _field(model, name: str, *decls: str, **kw):
    """A typer option whose default and help are the typed config field's own."""
    field = model.model_fields[name]
    return typer.Option(field.default, *decls, help=field.description[:1].upper() + field.description[1:] + ".", **kw)


DatasetOpt = typer.Option(..., "--dataset", "-d", help="Dataset name: dtd, imagenet, caltech101, oxford_pets, "
                          "stanford_cars, oxford_flowers, food101, fgvc_aircraft, sun397, eurosat, ucf101, "
                          "imagenetv2, imagenet_sketch, imagenet_a, imagenet_r.")
RootOpt = typer.Option(None, "--root", help="$DATA: the folder holding the datasets in CoOp's layout "
                       "(e.g. $DATA/dtd/images). Defaults to the DATA environment variable.")
ClipOpt = typer.Option(DEFAULT_CLIP, "--clip", help="open_clip model name, or a path to a model config JSON.")
PretrainedOpt = typer.Option(DEFAULT_PRETRAINED, "--pretrained",
                             help="open_clip pretrained tag, a local .pt/.safetensors checkpoint, or none (random weights).")
DeviceOpt = typer.Option("auto", "--device", help="cuda, cuda:N, cpu, or auto (cuda when available).")
WorkersOpt = typer.Option(None, "--workers", min=0, help="Image loader processes (default: cores - 1, at most 16).")
SetOpt = typer.Option([], "--set", help="Override one config key, e.g. --set optim.epochs=5 (see `mugcp config show`).")
ConfigOpt = typer.Option(None, "--config", help="YAML overriding the method's defaults (sections optim:, method:).")
ApiKeyOpt = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", show_default=False,
                         help="API key the --server-url servers ask for (sent as a bearer token, never written "
                              "anywhere). Defaults to the OPENAI_API_KEY environment variable.")


def _root(root: Optional[Path]) -> Path:
    if root is not None:
        return root
    if os.environ.get("DATA"):
        return Path(os.environ["DATA"])
    raise UserError("no dataset root: pass --root $DATA or set the DATA environment variable")


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device '{device}': use cuda, cuda:N, cpu or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available: use --device cpu")
    if parsed.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: mugcp runs on cuda or cpu")
    return parsed


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _csv(text: str, option: str = "") -> list[str]:
    """Comma-separated names; with `option`, an empty item ("a,,b") or none at all is refused."""
    items = [x.strip() for x in text.split(",")]
    if option and (not "".join(items) or "" in items):
        raise UserError(f"{option} '{text}' must be comma-separated names or numbers, none empty")
    return [x for x in items if x]


def _ints(text: str, option: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(s) for s in _csv(text, option)]
    except ValueError:
        raise UserError(f"{option} '{text}' must be comma-separated whole numbers, e.g. 1,2,3") from None
    if min(values) < minimum:
        raise UserError(f"{option} '{text}': each must be at least {minimum}")
    return values


def _seeds(text: str) -> list[int]:
    return _ints(text, "--seeds")


def _test_scp(text: str) -> tuple[str, ...]:
    """--test-scp's controls ("" for none)."""
    controls = tuple(_csv(text, "--test-scp")) if text else ()
    bad = [c for c in controls if c not in SCP_SOURCES]
    if bad:
        raise UserError(f"--test-scp '{bad[0]}': choose among {', '.join(SCP_SOURCES)}")
    return controls


SYNTHETIC_MARK = ".mugcp-synthetic"  # in every dataset folder `mugcp data synth` wrote: it may replace those only


@data_app.command("synth")
def data_synth(out: Path = typer.Option(..., "--out", help="Folder to write into ($DATA): the dataset lands in its "
                                         "CoOp folder under it."),
               dataset: Literal["dtd", "imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"] =
               typer.Option("dtd", "--dataset", help="Which dataset's layout: dtd (47 texture classes), imagenet "
                            "(the textures under wnids), or one of ImageNet's four shifted test sets."),
               per_class: int = typer.Option(10, "--per-class", min=4, max=10_000, help="Images per class (>= 4 for "
                                             "a 50/20/30 split; ImageNet: train images, a third as many test images)."),
               classes: Optional[int] = typer.Option(None, "--classes", min=2, max=47, help="Classes of the synthetic "
                                                     "ImageNet and its variants (default 24, at most 47: one per texture "
                                                     "style); DTD has its 47."),
               seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image jitter (the class styles are fixed)."),
               size: int = typer.Option(64, "--size", min=8, max=1024, help="Image side in pixels.")):
    """Write a synthetic dataset in its real layout: DTD (procedural textures), ImageNet and its variants.

    It is written into a hidden folder beside its place and moved there whole once finished, so an
    interrupted write leaves no partial dataset; it replaces only a dataset this command wrote."""
    import shlex
    import shutil
    import socket
    import uuid

    from mugcp.core.coop_datasets import DATASETS
    from mugcp.core.files import refuse_link, replace_folder
    from mugcp.world.imagenet_layouts import write_synthetic_imagenet, write_synthetic_variant
    from mugcp.world.synth import write_synthetic_dtd

    if dataset == "dtd" and classes is not None:
        raise UserError("--classes sets the synthetic ImageNet's classes; DTD has its 47 (give --dataset imagenet)")
    classes = 24 if classes is None else classes
    target = out / DATASETS[dataset].folder
    refuse_link(target)  # before any image is drawn, not after
    if target.exists() and not (target / SYNTHETIC_MARK).is_file():
        raise UserError(f"{target} exists and was not written by `mugcp data synth`: give another --out, or move "
                        f"it away first")
    host = socket.gethostname()
    for stale in out.glob(f".synth-{host}-*-*"):  # left by a write that was killed: its process is gone
        pid = stale.name.rsplit("-", 2)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".synth-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot write into {out}: {e.strerror}") from None
        if dataset == "dtd":
            folder = write_synthetic_dtd(staging, per_class=per_class, seed=seed, size=size)
        elif dataset == "imagenet":
            folder = write_synthetic_imagenet(staging, classes, per_class, max(1, per_class // 3), size, seed)
        else:
            folder = write_synthetic_variant(staging, dataset, classes, max(1, per_class // 3), size, seed)
        (folder / SYNTHETIC_MARK).write_text(f"mugcp data synth --dataset {dataset}\n")
        replace_folder(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    typer.echo(f"wrote synthetic {dataset}: {target} (use --dataset {dataset} --root {shlex.quote(str(out))})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@models_app.command("tiny")
def models_tiny(out: Path = typer.Option(..., "--out", help="Folder for the tiny models."),
                clip_only: bool = typer.Option(False, "--clip-only", help="Write only the tiny CLIP."),
                random: bool = typer.Option(False, "--random", help="Random weights (seconds) instead of the world's "
                                            "trained models (built once per machine, then copied).")):
    """Write a tiny CLIP (open_clip config + safetensors) and a tiny MLLM (Qwen2-VL layout): the world's, or random."""
    import shutil
    import uuid

    from mugcp.core.files import replace_folder, share_files
    from mugcp.pipeline.prompts import question
    from mugcp.world.tiny_clip import world_clip, write_tiny_clip
    from mugcp.world.tiny_mllm import world_describer, write_tiny_mllm

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the tiny models into {out}: {e.strerror}") from None

    def whole(name: str, write) -> Path:
        """`write(folder)` into a hidden folder beside out/name, then put it there whole: no file of a model written
        there before stays beside the new one."""
        staging = out / f".{name}.{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            write(staging)
            share_files(staging)
            replace_folder(staging, out / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out / name

    clip_files = world_clip(log=_say) if not random else None
    folder = whole("clip", write_tiny_clip if random else lambda f: [shutil.copy2(p, f) for p in clip_files])
    config, ckpt = sorted(folder.glob("*.json"))[0], sorted(folder.glob("*.safetensors"))[0]
    typer.echo(f"tiny CLIP: --clip {config} --pretrained {ckpt}")
    if not clip_only:
        source = world_describer(question(8), log=_say) if not random else None
        mllm = whole("mllm", write_tiny_mllm if random else lambda f: shutil.copytree(source, f, dirs_exist_ok=True))
        typer.echo(f"tiny MLLM: --mllm {mllm}")


@config_app.command("list")
def config_list():
    """The methods mugcp knows, with what each learns (its docstring's first line)."""
    from mugcp.trainer.methods import available_methods, method_class

    names = available_methods()
    for name in names:
        cls = method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines() or [""]
        typer.echo(f"{name:{max(map(len, names))}s} {doc[0]}")


@config_app.command("show")
def config_show(method: str = typer.Argument(..., help="Method name (see `mugcp config list`)."),
                config: Optional[Path] = ConfigOpt, sets: list[str] = SetOpt,
                protocol: Literal["b2n", "fewshot", "transfer"] = typer.Option(
                    "b2n", "--protocol", help="Whose reference config: base-to-novel, few-shot, or the transfer "
                    "source run."),
                dataset: str = typer.Option("", "--dataset", help="The dataset, where the reference config depends "
                                            "on it (CoOp's and PromptSRC's few-shot; transfer: imagenet, the "
                                            "papers' source, unless given)."),
                shots: int = typer.Option(16, "--shots", min=1, help="Shots, where the reference config depends on "
                                          "them (CoOp's few-shot epochs).")):
    """Print a method's effective config as YAML (its reference config for --protocol, then --config, then
    --set), each key explained."""
    from mugcp.core.coop_datasets import DATASETS
    from mugcp.trainer.config import load_config

    if protocol == "transfer" and not dataset:
        dataset = "imagenet"  # the source run of the papers' cross-dataset and domain generalisation
    if protocol == "fewshot" and not dataset:
        raise UserError("--protocol fewshot needs --dataset: the references' few-shot configs differ by dataset")
    if dataset and dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}': choose among {', '.join(DATASETS)}")
    typer.echo(load_config(method, config, sets, protocol=protocol, dataset=dataset, shots=shots).to_yaml(), nl=False)


@app.command("extract")
def extract_cmd(dataset: str = DatasetOpt, root: Optional[Path] = RootOpt,
                backend: str = _field(BackendConfig, "kind", "--backend"),
                server_url: list[str] = typer.Option(list(BackendConfig.model_fields["server_urls"].default),
                                                     "--server-url", help="Base URL of an OpenAI-compatible server; "
                                                     "repeat it for several servers (one per GPU or node)."),
                mllm: Optional[str] = _field(BackendConfig, "mllm", "--mllm"),
                revision: Optional[str] = _field(BackendConfig, "revision", "--revision"),
                api_key: Optional[str] = ApiKeyOpt,
                prompt: str = _field(ExtractConfig, "prompt", "--prompt"),
                clip: str = ClipOpt, pretrained: str = PretrainedOpt,
                cache_dir: Path = _field(ExtractConfig, "cache_dir", "--cache-dir"),
                shots: str = typer.Option("16", "--shots", help="Comma-separated shot counts whose few-shot draws "
                                          "are described (e.g. 1,2,4,8,16 for the few-shot setting)."),
                seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated seeds whose draws are described."),
                all_images: bool = _field(ExtractConfig, "all_images", "--all-images"),
                train_classes: str = _field(ExtractConfig, "train_classes", "--train-classes"),
                splits: str = typer.Option(",".join(SPLITS), "--splits", help="Comma-separated splits to describe "
                                                                          "(train, val, test)."),
                k: int = _field(ExtractConfig, "k", "--k"),
                max_tokens: int = _field(BackendConfig, "max_tokens", "--max-tokens"),
                concurrency: int = _field(BackendConfig, "concurrency", "--concurrency"),
                batch_size: int = _field(BackendConfig, "batch_size", "--batch-size"),
                num_shards: int = _field(ExtractConfig, "num_shards", "--num-shards"),
                shard_index: int = _field(ExtractConfig, "shard_index", "--shard-index"),
                timeout: float = _field(BackendConfig, "timeout", "--timeout"),
                retries: int = _field(BackendConfig, "retries", "--retries"),
                structured: bool = _field(BackendConfig, "structured", "--structured/--no-structured"),
                flush_every: int = _field(ExtractConfig, "flush_every", "--flush-every"),
                device: str = _field(BackendConfig, "device", "--device"),
                ray_address: Optional[str] = _field(BackendConfig, "ray_address", "--ray-address"),
                num_engines: int = _field(BackendConfig, "num_engines", "--num-engines"),
                engine: Optional[str] = _field(BackendConfig, "engine", "--engine"),
                gpus_per_engine: Optional[float] = _field(BackendConfig, "gpus_per_engine", "--gpus-per-engine")):
    """Stage one: describe the images the protocol reads (label-free, once per content) and cache their SCP."""
    if device != "auto":
        device = str(_device(device))
    config = validate(ExtractConfig, {
        "clip": clip, "pretrained": pretrained, "cache_dir": cache_dir, "splits": _csv(splits, "--splits"), "prompt": prompt,
        "k": k, "shots": _ints(shots, "--shots", minimum=1), "seeds": _seeds(seeds), "all_images": all_images,
        "train_classes": train_classes,
        "num_shards": num_shards, "shard_index": shard_index, "flush_every": flush_every,
        "backend": {"kind": backend, "mllm": mllm, "revision": revision, "server_urls": server_url, "api_key": api_key,
                    "max_tokens": max_tokens, "concurrency": concurrency, "batch_size": batch_size, "timeout": timeout,
                    "retries": retries, "structured": structured, "device": device, "ray_address": ray_address, "num_engines": num_engines,
                    "engine": engine, "gpus_per_engine": gpus_per_engine}}, "extract")
    from mugcp.pipeline.extract import run_extract

    summary = run_extract(dataset, _root(root), config, log=_say)
    if summary.failed:
        raise typer.Exit(1)


@cache_app.command("list")
def cache_list(cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the SCP cache."),
               dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="One dataset only.")):
    """What the cache holds: per dataset, each MLLM's answers (prompt, k, how many described and failed) and the
    SCP each CLIP embedded from them (what `--mllm`, `--set conditions.prompt=` and `conditions.k=` choose among)."""
    from mugcp.core.scp_cache import cache_contents

    for line in cache_contents(cache_dir, dataset):
        typer.echo(line)


@cache_app.command("migrate")
def cache_migrate(cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the SCP cache.")):
    """Convert a schema-1 cache (one folder per MLLM, prompt and CLIP) into today's three tables, in place."""
    from mugcp.core.scp_cache import migrate_v1

    for line in migrate_v1(cache_dir):
        typer.echo(line)


@app.command("train")
def train_cmd(dataset: str = DatasetOpt, root: Optional[Path] = RootOpt,
              method: str = typer.Option("mugcp", "--method", help="Method to train (see `mugcp config list`)."),
              shots: int = typer.Option(16, "--shots", min=1, help="Training images per class (the few-shot draw)."),
              seed: int = typer.Option(1, "--seed", min=0, help="Seed of the few-shot draw and of training (1, 2, 3 in papers)."),
              subsample: Literal["base", "all"] = typer.Option("base", "--subsample", help="base: base-to-novel (train on base classes); all: every class "
                                                 "(few-shot, cross-dataset, domain shift)."),
              transfer: bool = typer.Option(False, "--transfer", help="With --subsample all: the source run of "
                                            "cross-dataset and domain generalisation (the method's reference config "
                                            "for them) instead of a few-shot run."),
              config: Optional[Path] = ConfigOpt, sets: list[str] = SetOpt,
              output: Path = typer.Option(Path("runs"), "--output", help="Where run folders go."),
              cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the stage-one SCP cache."),
              mllm: Optional[str] = typer.Option(None, "--mllm", help="Which MLLM's cache to use when several exist."),
              clip: str = ClipOpt, pretrained: str = PretrainedOpt, device: str = DeviceOpt,
              resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last epoch."),
              workers: Optional[int] = WorkersOpt):
    """Stage two: train a method's prompts with CLIP frozen (default: MuGCP on the base classes), with the
    method's reference config for the setting (base-to-novel, few-shot, or --transfer), then --config, --set."""
    from mugcp.trainer.config import run_config
    from mugcp.trainer.methods import method_class
    from mugcp.trainer.runs import RunSpec
    from mugcp.trainer.train import run_train

    if not method_class(method).trains:
        raise UserError(f"method '{method}' has nothing to train: evaluate it with `mugcp eval --method {method}`")
    if transfer and subsample != "all":
        raise UserError("--transfer trains the source run of cross-dataset transfer: it needs --subsample all")
    protocol = "transfer" if transfer else "b2n" if subsample == "base" else "fewshot"
    train_config, folder = run_config(method, protocol, dataset, shots, config, sets)
    spec = RunSpec(dataset, str(_root(root).resolve()), method, shots, seed, subsample, clip, pretrained,
                   str(cache_dir.resolve()), mllm, train_config.to_dict(), folder)
    run_train(spec, output=output, device=_device(device), resume=resume, workers=workers, log=_say)


@app.command("import")
def import_cmd(path: Path = typer.Argument(..., help="A reference run's model.pth.tar-N (Dassl's checkpoint), its "
                                           "output folder (the last checkpoint saved), or a folder of such runs."),
               method: str = typer.Option(..., "--method", help="The method whose reference code wrote them: coop, "
                                          "cocoop, kgcoop, maple or promptsrc."),
               dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Their dataset (default: the one "
                                                     "each path names, as the reference scripts name folders)."),
               root: Optional[Path] = RootOpt,
               subsample: Literal["base", "all"] = typer.Option("base", "--subsample", help="base: base-to-novel "
                                                               "runs (trained on base classes); all: every class."),
               transfer: bool = typer.Option(False, "--transfer", help="With --subsample all: source runs of "
                                             "cross-dataset and domain generalisation."),
               seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Their seed (default: the seedN each "
                                                  "path names)."),
               shots: Optional[int] = typer.Option(None, "--shots", min=1, help="Their shots (default: the shots_K "
                                                   "or Kshots each path names)."),
               evaluate: bool = typer.Option(False, "--eval", help="Then test each on its setting's classes (base and "
                                             "novel, or all); `mugcp report OUTPUT` tabulates them."),
               sets: list[str] = typer.Option([], "--set", help="Override one config key the checkpoint does not "
                                              "fix, e.g. --set optim.precision=fp32 (its shapes fix the rest)."),
               output: Path = typer.Option(Path("runs"), "--output", help="Where run folders go."),
               clip: str = ClipOpt, pretrained: str = PretrainedOpt, device: str = DeviceOpt,
               workers: Optional[int] = WorkersOpt):
    """Checkpoints of a method's reference code (CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC) as run folders, for
    `mugcp eval` and `mugcp report`: each one's config is the method's reference config, shaped by the checkpoint."""
    from mugcp.trainer.imports import import_runs

    if transfer and subsample != "all":
        raise UserError("--transfer imports source runs of cross-dataset transfer: it needs --subsample all")
    failed = import_runs(path, method=method, dataset=dataset, evaluate=evaluate, output=output, device=_device(device),
                         workers=workers, log=_say, root=_root(root), subsample=subsample, transfer=transfer, seed=seed,
                         shots=shots, clip=clip, pretrained=pretrained, overrides=sets)
    for line in failed:
        typer.echo(f"failed: {line}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset to evaluate on: required "
                                                   "for a method without training; for a trained run, another "
                                                   "dataset's classes (cross-dataset, domain shift; default: its own)."),
             root: Optional[Path] = RootOpt,
             method: Optional[str] = typer.Option(None, "--method", help="A method without training (zeroshot), or "
                                                  "leave out to evaluate a trained run."),
             split: Literal["base", "novel", "all"] = typer.Option("all", "--split",
                                                                   help="Test classes: base, novel or all."),
             run: Optional[Path] = typer.Option(None, "--run", help="Run folder of `mugcp train` (default: the latest)."),
             clip: Optional[str] = typer.Option(None, "--clip", help=f"With --method: {ClipOpt.help.rstrip('.')} (default "
                                                f"{DEFAULT_CLIP}). A trained run uses the CLIP it was trained with."),
             pretrained: Optional[str] = typer.Option(None, "--pretrained", help=f"With --method: {PretrainedOpt.help.rstrip('.')} "
                                                      f"(default {DEFAULT_PRETRAINED})."),
             device: str = DeviceOpt,
             output: Path = typer.Option(Path("runs"), "--output", help="Where runs and results live."),
             batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per forward pass."),
             workers: Optional[int] = WorkersOpt,
             as_json: bool = typer.Option(False, "--json", help="Print the results record as JSON."),
             scp: Optional[Literal[SCP_SOURCES]] = typer.Option(
                 None, "--scp", help="A trained run that reads SCP: give the test images this SCP (shuffled: another "
                 "image's; zeros) instead of what it trained with, a test-time control of whether the model reads "
                 "SCP. Written to results_<split>_scp-<control>.json, beside the run's own results.")):
    """Evaluate on the test split: zero-shot CLIP, or a trained run (Base / Novel / HM once both exist)."""
    if method is not None:
        from mugcp.trainer.evaluation import run_untrained
        from mugcp.trainer.results import read_results

        if dataset is None:
            raise UserError(f"--dataset is required with --method {method}")
        if run is not None:
            raise UserError(f"--run evaluates a trained run, --method {method} an untrained method: give one of them")
        if scp is not None:
            raise UserError(f"--scp controls the SCP a trained run reads; --method {method} reads none")
        record, path = run_untrained(method, dataset, _root(root), split=split, clip=clip or DEFAULT_CLIP,
                                     pretrained=DEFAULT_PRETRAINED if pretrained is None else pretrained,
                                     device=_device(device), output=output, batch_size=batch_size, workers=workers,
                                     log=_say)
        typer.echo(json.dumps(read_results(path), indent=2) if as_json else
                   f"{record['dataset']} {record['method']} {record['split']}: accuracy {record['accuracy']:.2f}% "
                   f"on {record['num_images']} images -> {path}")
        return
    if clip is not None or pretrained is not None:
        raise UserError("a trained run is evaluated with the CLIP it was trained with: --clip and --pretrained "
                        "go with --method")
    from mugcp.trainer.evaluation import run_eval

    for line in run_eval(run=run, output=output, split=split, root=root, device=_device(device), dataset=dataset,
                         batch_size=batch_size, workers=workers, as_json=as_json, test_scp=scp):
        typer.echo(line)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("demo"), "--out", help="Folder for the demo's data, cache and runs."),
             methods: str = typer.Option("", "--methods", help="Comma-separated methods to train, or all "
                                         "(default: every registered one but CoCoOp, the slowest here)."),
             seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated seeds."),
             ablations: bool = typer.Option(False, "--ablations", help="Also train every MuGCP ablation (SCP zeros, "
                                            "AMG off, MPF off, input fusion, non-zero gates)."),
             jobs: int = typer.Option(2, "--jobs", min=1, help="Runs trained at once (processes, one thread each)."),
             backend: Optional[str] = typer.Option(None, "--backend", help="Stage-one backend (default: vllm when "
                                                   "installed, else hf).")):
    """Every method on the built-in world: extract, train on base (3 seeds), test base and novel, print the table."""
    from mugcp.demo import run_demo
    from mugcp.trainer.methods import method_class

    names = _csv(methods) or None
    for name in names if names and names != ["all"] else []:
        method_class(name)  # unknown names fail here, before any work
    for line in run_demo(out, methods=names, seeds=tuple(_seeds(seeds)), ablations=ablations, jobs=jobs,
                         backend=backend, log=_say):
        typer.echo(line)


@app.command("report")
def report_cmd(runs_dir: Path = typer.Argument(Path("runs"), help="Folder of runs (searched recursively)."),
               out: Optional[Path] = typer.Option(None, "--out", help="Where to write report.md/.csv/.png "
                                                  "(default: RUNS_DIR).")):
    """Paper-style Base / Novel / HM table (mean ± std over seeds, HM of seed averages) and a figure."""
    from mugcp.trainer.report import write_report

    md, paths = write_report(runs_dir, out)
    typer.echo(md)
    typer.echo("wrote " + ", ".join(map(str, paths)))


@app.command("sweep")
def sweep_cmd(setting: str = typer.Option("b2n", "--setting", help="Comma-separated settings: b2n (base-to-novel), "
                                         "fewshot (1/2/4/8/16 shots, all classes), xd (cross-dataset transfer from "
                                         "ImageNet), dg (domain generalisation from ImageNet)."),
              datasets: Optional[str] = typer.Option(None, "--datasets", help="Comma-separated datasets, or 'all': "
                                                     "for b2n and fewshot, those trained on (default: dtd; all: the "
                                                     "eleven); for xd and dg, the targets (default and all: all "
                                                     "of them)."),
              methods: str = typer.Option("zeroshot,coop,mugcp", "--methods", help="Comma-separated methods."),
              seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated seeds."),
              root: Optional[Path] = RootOpt,
              shots: int = typer.Option(16, "--shots", min=1, help="Training images per class (b2n, xd, dg)."),
              fewshot_shots: str = typer.Option("1,2,4,8,16", "--fewshot-shots", help="Shot counts of fewshot."),
              source: str = typer.Option("imagenet", "--source", help="The dataset xd and dg train on."),
              sets: list[str] = typer.Option([], "--set", help="Config override applied to every method."),
              test_scp: str = typer.Option("", "--test-scp", help="Comma-separated test-time SCP controls (shuffled, "
                                           "zeros, real): every run of a method that reads SCP is also evaluated "
                                           "with it, as `mugcp eval --scp` does; a report row each (none for "
                                           "the SCP a run trained with: that is its own test)."),
              output: Path = typer.Option(Path("runs"), "--output", help="Where run folders and the report go."),
              cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the stage-one SCP cache."),
              backend: Optional[str] = typer.Option(None, "--backend", help="Run stage one with this backend first "
                                                    "(server, vllm, hf, ray); leave out if the cache is filled."),
              server_url: list[str] = typer.Option(["http://127.0.0.1:8000"], "--server-url",
                                                   help="For --backend server (repeat for several servers)."),
              mllm: Optional[str] = typer.Option(None, "--mllm", help="MLLM for stage one / which cache to read."),
              api_key: Optional[str] = ApiKeyOpt,
              revision: Optional[str] = typer.Option(None, "--revision", help="For --backend vllm, hf or ray: the "
                                                     "Hub revision of --mllm to describe with."),
              clip: str = ClipOpt, pretrained: str = PretrainedOpt, device: str = DeviceOpt,
              workers: Optional[int] = WorkersOpt,
              ray: Optional[str] = typer.Option(None, "--ray", help="Run every training run as a Ray task: 'local' "
                                                "starts a cluster on this machine, 'auto' joins a running one, or "
                                                "ray://host:port."),
              gpus_per_run: Optional[float] = typer.Option(None, "--gpus-per-run", min=0, help="GPUs per Ray task "
                                                           "(default: 1 when the cluster has GPUs, else 0).")):
    """The papers' settings over datasets x methods x seeds, skipping finished work, then the report."""
    from mugcp.core.coop_datasets import BASE_TO_NOVEL, DOMAIN_TARGETS
    from mugcp.core.ray_cluster import reachable, valid_gpus
    from mugcp.sweep import run_sweep

    valid_gpus(gpus_per_run, "--gpus-per-run")  # before any work: Ray would refuse them once the runs start
    reachable(ray, "--ray")
    names = (None if datasets is None else [*BASE_TO_NOVEL, *DOMAIN_TARGETS] if datasets == "all"
             else _csv(datasets, "--datasets"))
    extract = None
    if backend is not None:
        extract = validate(ExtractConfig, {"clip": clip, "pretrained": pretrained, "cache_dir": cache_dir,
                                           "backend": {"kind": backend, "server_urls": server_url, "mllm": mllm,
                                                       "revision": revision, "api_key": api_key,
                                                       "ray_address": None if ray in (None, "local") else ray}},
                           "sweep")
    elif revision is not None:
        raise UserError("--revision chooses the weights stage one describes with: it needs --backend vllm, hf or ray")
    md, paths, failures = run_sweep(_csv(setting, "--setting"), names, _csv(methods, "--methods"), _seeds(seeds), _root(root), shots=shots,
                          fewshot_shots=_ints(fewshot_shots, "--fewshot-shots", minimum=1), source=source, output=output,
                          cache_dir=cache_dir, clip=clip, pretrained=pretrained, mllm=mllm, device=_device(device),
                          extract=extract, overrides=sets, test_scp=_test_scp(test_scp), workers=workers, ray_address=ray,
                          gpus_per_run=gpus_per_run, log=_say)
    typer.echo(md)
    typer.echo("wrote " + ", ".join(map(str, paths)))
    if failures:  # like extract's failed images: the rest is done, and the exit code says it was not all
        typer.echo(f"error: {failures} part(s) of the sweep failed (listed above and in {paths[0]})", err=True)
        raise typer.Exit(1)


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C
# What the place a command writes to can refuse at any write (each write that leaves state behind turns these into
# its own one line; this is the last net, so that no such refusal is a traceback)
PLACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY, errno.ENAMETOOLONG}


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:  # bytes the file system name holds that are not UTF-8 (surrogate escapes)
        return False


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run a command; bad input becomes one line on stderr and exit code 2."""
    try:
        undecodable = next((a for a in (sys.argv[1:] if argv is None else argv) if not _utf8(a)), None)
        if undecodable is not None:
            raise UserError(f"the argument {ascii(undecodable)} is not valid UTF-8: mugcp records paths in UTF-8 "
                            f"(JSON, Parquet, safetensors); rename it")
        code = app(args=argv, prog_name="mugcp", standalone_mode=False)  # a command's typer.Exit(N) returns N
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in PLACE_ERRORS:  # anything else is a fault of mugcp's: its traceback is the report
            raise
        typer.echo(f"error: {e.strerror}: {e.filename or 'a file'} (what finished is kept)", err=True)
        sys.exit(2)
    except typer.TyperException as e:  # typer's own parsing: a bad option, or no arguments at all
        ctx, message = getattr(e, "ctx", None), e.format_message()
        if not message.strip():  # no arguments: typer has printed the help already
            sys.exit(0)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {' '.join(message.split())}{where}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    if code == INTERRUPTED:  # typer turns Ctrl-C into this code
        typer.echo("interrupted: finished work is kept (`mugcp train --resume` continues a run; extract and "
                   "sweep skip what is done)", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
