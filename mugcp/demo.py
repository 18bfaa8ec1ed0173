"""`mugcp demo`: the whole two-stage job on built-in data and tiny models, on a laptop CPU, nothing downloaded.

Like the CLI, this sits on the top floor: it only calls the stages' and the world's public functions.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from mugcp.core.protocol import harmonic_mean
from mugcp.pipeline.config import ExtractConfig
from mugcp.pipeline.extract import run_extract
from mugcp.trainer.config import load_config
from mugcp.trainer.evaluation import run_eval, run_untrained
from mugcp.trainer.runs import RunSpec
from mugcp.trainer.train import run_train
from mugcp.world.synth import write_synthetic_dtd
from mugcp.world.tiny_clip import TINY_CLIP_NAME, write_tiny_clip
from mugcp.world.tiny_mllm import write_tiny_mllm


def run_demo(out: Path, *, method: str = "mugcp", shots: int = 4, epochs: int = 10, backend: str | None = None,
             per_class: int = 10, pretrain_steps: int = 80, log=print) -> list[str]:
    """Synthetic DTD + tiny CLIP + tiny MLLM: extract, train on base, eval base and novel; return the table."""
    started = time.perf_counter()
    out = Path(out)
    data, cache, runs = out / "data", out / "cache", out / "runs"
    if not (data / "dtd" / "split_zhou_DescribableTextures.json").is_file():
        write_synthetic_dtd(data, per_class=per_class)
    clip_dir = out / "models" / "clip"
    config, ckpt = clip_dir / f"{TINY_CLIP_NAME}.json", clip_dir / f"{TINY_CLIP_NAME}.safetensors"
    if not ckpt.is_file():
        config, ckpt = write_tiny_clip(clip_dir, pretrain_steps=pretrain_steps)
    mllm = out / "models" / "mllm"
    if not (mllm / "config.json").is_file():
        write_tiny_mllm(mllm)
    log(f"[demo] data {data}, tiny models {out / 'models'} ({time.perf_counter() - started:.0f} s)")

    backend = backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    clip_args = {"clip": str(config), "pretrained": str(ckpt)}
    extract = ExtractConfig(cache_dir=cache, **clip_args, shots=(shots,), seeds=(1,),
                            backend={"kind": backend, "mllm": str(mllm), "max_tokens": 24, "device": "cpu"})
    summary = run_extract("dtd", data, extract, log=log)
    log(f"[demo] stage one ({backend}): {summary.done} described, {summary.skipped} already cached, "
        f"{summary.failed} failed ({time.perf_counter() - started:.0f} s)")

    device = torch.device("cpu")
    spec = RunSpec("dtd", str(data.resolve()), method, shots, 1, "base", str(config), str(ckpt),
                   str(cache.resolve()), None, load_config(method, None, [f"optim.epochs={epochs}"]).to_dict())
    run_dir = spec.run_dir(runs)
    run_train(spec, output=runs, device=device, resume=(run_dir / "checkpoints").exists(), log=log)
    zero = {s: run_untrained("zeroshot", "dtd", data, split=s, device=device, output=runs, log=log,
                             **clip_args)[0]["accuracy"] for s in ("base", "novel")}
    acc = {}
    for split in ("base", "novel"):
        log(run_eval(run=run_dir, output=runs, split=split, root=None, device=device)[0])
        acc[split] = json.loads((run_dir / f"results_{split}.json").read_text())["accuracy"]
    hm = harmonic_mean
    lines = [f"{'':12s} {'Base':>7s} {'Novel':>7s} {'HM':>7s}",
             f"{'zero-shot':12s} {zero['base']:7.2f} {zero['novel']:7.2f} {hm(zero['base'], zero['novel']):7.2f}",
             f"{method:12s} {acc['base']:7.2f} {acc['novel']:7.2f} {hm(acc['base'], acc['novel']):7.2f}"]
    log(f"[demo] done in {time.perf_counter() - started:.0f} s: runs in {runs}, cache in {cache}")
    return lines
