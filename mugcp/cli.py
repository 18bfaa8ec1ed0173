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
                             help="open_clip pretrained tag, or a local .pt/.safetensors checkpoint.")
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
                clip_only: bool = typer.Option(False, "--clip-only", help="Write only the tiny CLIP.")):
    """Write a tiny CLIP (open_clip config + safetensors) and a tiny MLLM (Qwen2-VL layout), random weights."""
    from mugcp.tiny import write_tiny_clip

    config, ckpt = write_tiny_clip(out / "clip")
    typer.echo(f"tiny CLIP: --clip {config} --pretrained {ckpt}")
    if not clip_only:
        from mugcp.tiny_mllm import write_tiny_mllm

        typer.echo(f"tiny MLLM: --mllm {write_tiny_mllm(out / 'mllm')}")


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
