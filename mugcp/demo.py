"""`mugcp demo`: the whole two-stage job on built-in data and tiny models, on a laptop CPU, nothing downloaded.

Like the CLI, this sits on the top floor: it only calls the stages' public functions.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from mugcp.protocol import harmonic_mean


def run_demo(out: Path, *, method: str = "mugcp", shots: int = 4, epochs: int = 10, backend: str | None = None,
             per_class: int = 10, pretrain_steps: int = 80, log=print) -> list[str]:
    """Synthetic DTD + tiny CLIP + tiny MLLM: extract, train on base, eval base and novel; return the table."""
    from mugcp.synth import write_synthetic_dtd
    from mugcp.tiny import write_tiny_clip
    from mugcp.tiny_mllm import write_tiny_mllm
    from pipeline.extract import run_extract
    from trainer.run import run_eval, run_train

    started = time.perf_counter()
    out = Path(out)
    data, cache, runs = out / "data", out / "cache", out / "runs"
    if not (data / "dtd" / "split_zhou_DescribableTextures.json").is_file():
        write_synthetic_dtd(data, per_class=per_class)
    clip_dir = out / "models" / "clip"
    config, ckpt = clip_dir / "mugcp-tiny-clip.json", clip_dir / "mugcp-tiny-clip.safetensors"
    if not ckpt.is_file():
        config, ckpt = write_tiny_clip(clip_dir, pretrain_steps=pretrain_steps)
    mllm = out / "models" / "mllm"
    if not (mllm / "config.json").is_file():
        write_tiny_mllm(mllm)
    log(f"[demo] data {data}, tiny models {out / 'models'} ({time.perf_counter() - started:.0f} s)")

    backend = backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    clip_args = {"clip": str(config), "pretrained": str(ckpt)}
    summary = run_extract("dtd", data, backend=backend, mllm=str(mllm), cache_dir=cache, max_tokens=24,
                          batch_size=32, device="cpu", log=log, **clip_args)
    log(f"[demo] stage one ({backend}): {summary.done} described, {summary.skipped} already cached, "
        f"{summary.failed} failed ({time.perf_counter() - started:.0f} s)")

    device = torch.device("cpu")
    run_dir = runs / "dtd" / method / f"b2n_shots{shots}" / "seed1"
    run_train("dtd", data, method=method, shots=shots, seed=1, overrides=[f"optim.epochs={epochs}"], output=runs,
              cache_dir=cache, device=device, resume=(run_dir / "checkpoints").exists(), log=log, **clip_args)
    from trainer.zeroshot import run_zeroshot

    zero = {s: run_zeroshot("dtd", data, split=s, device=device, output=runs, **clip_args)[0]["accuracy"]
            for s in ("base", "novel")}
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
