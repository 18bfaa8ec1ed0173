"""`mugcp demo`: the whole two-stage job on built-in data and tiny models, on a laptop CPU, nothing downloaded.

Like the CLI, this sits on the top floor: it only calls the stages' public functions.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch


def run_demo(out: Path, *, method: str = "mugcp", shots: int = 4, epochs: int = 10, backend: str | None = None,
             per_class: int = 10, log=print) -> list[str]:
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
    config, ckpt = write_tiny_clip(out / "models" / "clip")
    mllm = out / "models" / "mllm"
    if not (mllm / "config.json").is_file():
        write_tiny_mllm(mllm)
    log(f"[demo] data {data}, tiny models {out / 'models'} ({time.perf_counter() - started:.0f} s)")

    backend = backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    clip_args = {"clip": str(config), "pretrained": str(ckpt)}
    summary = run_extract("dtd", data, backend=backend, mllm=str(mllm), cache_dir=cache, max_tokens=24,
                          batch_size=32, device="cpu", **clip_args)
    log(f"[demo] stage one ({backend}): {summary.done} described, {summary.skipped} already cached, "
        f"{summary.failed} failed ({time.perf_counter() - started:.0f} s)")

    device = torch.device("cpu")
    run_dir = runs / "dtd" / method / f"b2n_shots{shots}" / "seed1"
    run_train("dtd", data, method=method, shots=shots, seed=1, overrides=[f"optim.epochs={epochs}"], output=runs,
              cache_dir=cache, device=device, resume=(run_dir / "checkpoints").exists(), log=log, **clip_args)
    lines = []
    for split in ("base", "novel"):
        lines = run_eval(run=run_dir, output=runs, split=split, root=None, device=device)
        log(lines[0])
    log(f"[demo] done in {time.perf_counter() - started:.0f} s: runs in {runs}, cache in {cache}")
    return lines
