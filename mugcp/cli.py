"""The `mugcp` command: thin — it parses options and calls one function per command.

Bad input surfaces as `UserError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mugcp.clip import DEFAULT_CLIP, DEFAULT_PRETRAINED
from mugcp.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prompt learning for a frozen CLIP, conditioned on what a multimodal LLM says about each image.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in demo data.")
models_app = typer.Typer(no_args_is_help=True, help="Built-in tiny random-weight models (no download).")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

DatasetOpt = typer.Option(..., "--dataset", "-d", help="Dataset name: dtd, imagenet, caltech101, oxford_pets, "
                          "stanford_cars, oxford_flowers, food101, fgvc_aircraft, sun397, eurosat, ucf101, "
                          "imagenetv2, imagenet_sketch, imagenet_a, imagenet_r.")
RootOpt = typer.Option(None, "--root", help="$DATA: the folder holding the datasets in CoOp's layout "
                       "(e.g. $DATA/dtd/images). Defaults to the DATA environment variable.")
ClipOpt = typer.Option(DEFAULT_CLIP, "--clip", help="open_clip model name, or a path to a model config JSON.")
PretrainedOpt = typer.Option(DEFAULT_PRETRAINED, "--pretrained",
                             help="open_clip pretrained tag, a local .pt/.safetensors checkpoint, or none (random weights).")
DeviceOpt = typer.Option("auto", "--device", help="cuda, cpu, or auto (cuda when available).")


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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device '{device}': use cuda, cpu or auto") from None


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


@data_app.command("synth")
def data_synth(out: Path = typer.Option(..., "--out", help="Folder to write into; the dataset lands in OUT/dtd."),
               per_class: int = typer.Option(10, "--per-class", help="Images per class (>= 4 for a 50/20/30 split)."),
               seed: int = typer.Option(0, "--seed", help="Seed of the image jitter (the class styles are fixed)."),
               size: int = typer.Option(64, "--size", help="Image side in pixels.")):
    """Write a synthetic DTD (47 classes, procedural textures) in CoOp's exact layout and split format."""
    from mugcp.synth import write_synthetic_dtd

    if per_class < 4:
        raise UserError(f"--per-class {per_class} is too small: a 50/20/30 split needs at least 4 images per class")
    folder = write_synthetic_dtd(out, per_class=per_class, seed=seed, size=size)
    typer.echo(f"wrote synthetic DTD: {folder} (use --dataset dtd --root {out})")


@models_app.command("tiny")
def models_tiny(out: Path = typer.Option(..., "--out", help="Folder for the tiny models."),
                clip_only: bool = typer.Option(False, "--clip-only", help="Write only the tiny CLIP."),
                pretrain_steps: int = typer.Option(0, "--pretrain-steps", help="Contrastive steps on synthetic "
                                                   "textures before saving (0 = random weights; the demo uses 80).")):
    """Write a tiny CLIP (open_clip config + safetensors) and a tiny MLLM (Qwen2-VL layout), random weights."""
    from mugcp.tiny import write_tiny_clip

    config, ckpt = write_tiny_clip(out / "clip", pretrain_steps=pretrain_steps)
    typer.echo(f"tiny CLIP: --clip {config} --pretrained {ckpt}")
    if not clip_only:
        from mugcp.tiny_mllm import write_tiny_mllm

        typer.echo(f"tiny MLLM: --mllm {write_tiny_mllm(out / 'mllm')}")


@app.command("extract")
def extract_cmd(dataset: str = DatasetOpt, root: Optional[Path] = RootOpt,
                backend: str = typer.Option("server", "--backend", help="server: an OpenAI-compatible vLLM server "
                                            "(many requests in flight); vllm: vLLM's in-process engine; hf: transformers."),
                server_url: str = typer.Option("http://127.0.0.1:8000", "--server-url",
                                               help="Base URL of the OpenAI-compatible server (backend server)."),
                mllm: Optional[str] = typer.Option(None, "--mllm", help="Hugging Face id or local folder of the MLLM "
                                                   "(default: see README; with --backend server, the served model)."),
                clip: str = ClipOpt, pretrained: str = PretrainedOpt,
                cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the Parquet SCP cache."),
                splits: str = typer.Option("train,val,test", "--splits", help="Comma-separated splits to describe."),
                k: int = typer.Option(8, "--k", help="Most phrases per image (SCP tokens)."),
                max_tokens: int = typer.Option(128, "--max-tokens", help="Most tokens the MLLM may answer with."),
                concurrency: int = typer.Option(64, "--concurrency", help="Requests in flight (backend server)."),
                batch_size: int = typer.Option(32, "--batch-size", help="Images per batch (backends vllm and hf) "
                                               "and per SCP-encoding pass."),
                num_shards: int = typer.Option(1, "--num-shards", help="Split the images into N disjoint shards..."),
                shard_index: int = typer.Option(0, "--shard-index", help="...and describe shard I (0-based)."),
                timeout: float = typer.Option(120.0, "--timeout", help="Seconds per request before a retry."),
                retries: int = typer.Option(3, "--retries", help="Retries per image, with backoff."),
                structured: bool = typer.Option(True, "--structured/--no-structured",
                                                help="Ask the server for JSON-schema structured output."),
                flush_every: int = typer.Option(256, "--flush-every", help="Rows per Parquet part file: at most "
                                                "this many finished images are lost if the run is killed."),
                device: str = DeviceOpt):
    """Stage one: describe every image with an MLLM (label-free) and cache the answers and SCP tensors."""
    from pipeline.extract import run_extract

    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index {shard_index} must be in 0..{num_shards - 1} for --num-shards {num_shards}")
    summary = run_extract(dataset, _root(root), backend=backend, mllm=mllm, server_url=server_url,
                          clip=clip, pretrained=pretrained, cache_dir=cache_dir,
                          splits=tuple(x.strip() for x in splits.split(",") if x.strip()), k=k, max_tokens=max_tokens,
                          concurrency=concurrency, batch_size=batch_size, num_shards=num_shards,
                          shard_index=shard_index, timeout=timeout, retries=retries, structured=structured,
                          device=device, flush_every=flush_every, log=_say)
    if summary.failed:
        raise typer.Exit(1)


@app.command("train")
def train_cmd(dataset: str = DatasetOpt, root: Optional[Path] = RootOpt,
              method: str = typer.Option("mugcp", "--method", help="mugcp, gpt, coop, cocoop, maple or kgcoop."),
              shots: int = typer.Option(16, "--shots", help="Training images per class (the few-shot draw)."),
              seed: int = typer.Option(1, "--seed", help="Seed of the few-shot draw and of training (1, 2, 3 in papers)."),
              subsample: str = typer.Option("base", "--subsample", help="base: base-to-novel (train on base classes); "
                                            "all: every class (few-shot, cross-dataset, domain shift)."),
              config: Optional[Path] = typer.Option(None, "--config", help="YAML overriding the method's defaults."),
              sets: list[str] = typer.Option([], "--set", help="Override one config key, e.g. --set optim.epochs=5."),
              output: Path = typer.Option(Path("runs"), "--output", help="Where run folders go."),
              cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the stage-one SCP cache."),
              mllm: Optional[str] = typer.Option(None, "--mllm", help="Which MLLM's cache to use when several exist."),
              clip: str = ClipOpt, pretrained: str = PretrainedOpt, device: str = DeviceOpt,
              resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last epoch."),
              workers: Optional[int] = typer.Option(None, "--workers", help="Image loader processes.")):
    """Stage two: train a method's prompts with CLIP frozen (default: MuGCP on the base classes)."""
    from trainer.run import run_train

    run_train(dataset, _root(root), method=method, shots=shots, seed=seed, subsample=subsample, config_file=config,
              overrides=sets, output=output, cache_dir=cache_dir, mllm=mllm, clip=clip, pretrained=pretrained,
              device=_device(device), resume=resume, workers=workers, log=_say)


@app.command("eval")
def eval_cmd(dataset: str = typer.Option(None, "--dataset", "-d", help="Dataset (zero-shot; a trained run knows its own)."),
             root: Optional[Path] = RootOpt,
             method: str = typer.Option(None, "--method", help="zeroshot, or leave out to evaluate a trained run."),
             split: str = typer.Option("all", "--split", help="Test classes: base, novel or all."),
             run: Optional[Path] = typer.Option(None, "--run", help="Run folder of `mugcp train` (default: the latest)."),
             clip: str = ClipOpt, pretrained: str = PretrainedOpt, device: str = DeviceOpt,
             output: Path = typer.Option(Path("runs"), "--output", help="Where runs and results live."),
             batch_size: int = typer.Option(128, "--batch-size", help="Images per forward pass."),
             workers: Optional[int] = typer.Option(None, "--workers", help="Image loader processes."),
             as_json: bool = typer.Option(False, "--json", help="Print the results record as JSON.")):
    """Evaluate on the test split: zero-shot CLIP, or a trained run (Base / Novel / HM once both exist)."""
    if method == "zeroshot":
        from trainer.zeroshot import run_zeroshot

        if dataset is None:
            raise UserError("--dataset is required with --method zeroshot")
        record, path = run_zeroshot(dataset, _root(root), split=split, clip=clip, pretrained=pretrained,
                                    device=_device(device), output=output, batch_size=batch_size, workers=workers)
        _print_record(record, path, as_json)
        return
    from trainer.run import run_eval

    for line in run_eval(run=run, output=output, split=split, root=root, device=_device(device),
                         batch_size=batch_size, workers=workers, as_json=as_json):
        typer.echo(line)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("demo"), "--out", help="Folder for the demo's data, models, cache and runs."),
             method: str = typer.Option("mugcp", "--method", help="Method to train."),
             shots: int = typer.Option(4, "--shots", help="Training images per class."),
             epochs: int = typer.Option(10, "--epochs", help="Training epochs."),
             backend: Optional[str] = typer.Option(None, "--backend", help="Stage-one backend (default: vllm when "
                                                   "installed, else hf).")):
    """Run the whole job on built-in data and tiny models: extract, train on base, eval base and novel."""
    from mugcp.demo import run_demo

    for line in run_demo(out, method=method, shots=shots, epochs=epochs, backend=backend, log=_say):
        typer.echo(line)


@app.command("report")
def report_cmd(runs_dir: Path = typer.Argument(Path("runs"), help="Folder of runs (searched recursively)."),
               out: Optional[Path] = typer.Option(None, "--out", help="Where to write report.md/.csv/.png "
                                                  "(default: RUNS_DIR).")):
    """Paper-style Base / Novel / HM table (mean ± std over seeds, HM of seed averages) and a figure."""
    from trainer.report import write_report

    md, paths = write_report(runs_dir, out)
    typer.echo(md)
    typer.echo("wrote " + ", ".join(map(str, paths)))


@app.command("sweep")
def sweep_cmd(datasets: str = typer.Option("dtd", "--datasets", help="Comma-separated datasets, or 'all' for the "
                                           "eleven base-to-novel ones."),
              methods: str = typer.Option("zeroshot,coop,mugcp", "--methods", help="Comma-separated methods."),
              seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated seeds."),
              root: Optional[Path] = RootOpt,
              shots: int = typer.Option(16, "--shots", help="Training images per class."),
              sets: list[str] = typer.Option([], "--set", help="Config override applied to every method."),
              output: Path = typer.Option(Path("runs"), "--output", help="Where run folders and the report go."),
              cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Root of the stage-one SCP cache."),
              backend: Optional[str] = typer.Option(None, "--backend", help="Run stage one with this backend first "
                                                    "(server, vllm, hf); leave out if the cache is already filled."),
              server_url: str = typer.Option("http://127.0.0.1:8000", "--server-url", help="For --backend server."),
              mllm: Optional[str] = typer.Option(None, "--mllm", help="MLLM for stage one / which cache to read."),
              clip: str = ClipOpt, pretrained: str = PretrainedOpt, device: str = DeviceOpt,
              workers: Optional[int] = typer.Option(None, "--workers", help="Image loader processes.")):
    """Run datasets x methods x seeds (base-to-novel), skipping finished work, then write the report."""
    from mugcp.datasets import BASE_TO_NOVEL
    from mugcp.sweep import run_sweep

    names = BASE_TO_NOVEL if datasets == "all" else [d.strip() for d in datasets.split(",") if d.strip()]
    extract = None if backend is None else {"backend": backend, "server_url": server_url, "mllm": mllm}
    md, paths = run_sweep(names, [m.strip() for m in methods.split(",")], [int(s) for s in seeds.split(",")],
                          _root(root), shots=shots, output=output, cache_dir=cache_dir, clip=clip,
                          pretrained=pretrained, device=_device(device), extract_options=extract, overrides=sets,
                          workers=workers, log=_say)
    typer.echo(md)
    typer.echo("wrote " + ", ".join(map(str, paths)))


def _print_record(record: dict, path: Path, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record, indent=2))
    else:
        typer.echo(f"{record['dataset']} {record['method']} {record['split']}: accuracy {record['accuracy']:.2f}% "
                   f"on {record['num_images']} images -> {path}")


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
