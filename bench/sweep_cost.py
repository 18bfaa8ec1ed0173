"""What the papers' sweeps cost: runs per setting, and a worked GPU estimate for 1, 8 and 64 GPUs.

    python bench/sweep_cost.py [--measure]

1. The training runs each setting needs for the registered methods and seeds 1-3, counted as
   `mugcp sweep` plans them (b2n: per dataset; fewshot: per dataset and shot count; xd and dg share
   one ImageNet run per method and seed).
2. A worked estimate (not a measurement: no GPU here) of each run's time on one H100, from FLOPs of
   ViT-B/16 and the text tower cut at the EOT, at an assumed sustained rate, with JPEG decoding as a
   floor; then the makespan of Ray placing whole runs on 1, 8 and 64 GPUs (longest run first).
3. With `--measure`: a small sweep (2 methods x 2 seeds on synthetic DTD, tiny CLIP) serially and as
   Ray tasks on this machine, wall time of each.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import io
import math
import os
import tempfile
import time
from pathlib import Path

from extract_scale import SIZES

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["coop", "cocoop", "kgcoop", "maple", "promptsrc", "gpt", "mugcp"]
# Test images of the domain-generalisation targets (their own pages): V2, Sketch, A, R.
DG_TEST = {"imagenetv2": (1000, 10_000), "imagenet_sketch": (1000, 50_889), "imagenet_a": (200, 7_500),
           "imagenet_r": (200, 30_000)}

# ViT-B/16 at 224 px: 197 tokens, width 768, 12 layers -> 24 d^2 per token and layer (QKV, out, MLP) plus
# 4 T^2 d per layer for attention. Text tower: width 512, 12 layers, sequences cut at the longest EOT: the
# start token, the method's context, the longest class name with its "." (~14 tokens on ImageNet), the EOT.
IMAGE_GFLOP = (24 * 768**2 * 197 + 4 * 197**2 * 768) * 12 / 1e9  # ~35 forward
NAME_TOKENS = 14


def text_gflop(n_ctx: int) -> float:
    """One class prompt's forward pass through the text tower, cut at the longest EOT (~1.5 at 4 context tokens)."""
    tokens = 2 + n_ctx + NAME_TOKENS
    return (24 * 512**2 * tokens + 4 * tokens**2 * 512) * 12 / 1e9


SUSTAINED_TFLOPS = 300.0  # assumed: ~30% of the H100's 989 dense bf16 TFLOP/s for these small matmuls
DECODE_PER_S = 1500.0  # assumed JPEG decode + augment rate of 16 loader workers
STARTUP_S = 20.0  # assumed: load CLIP, build prompts, first batch


def step_gflop(method: str, batch: int, classes: int, n_ctx: int) -> float:
    """Forward + backward (x3) where gradients flow, forward only (x1) where they do not."""
    image_grad = method in ("maple", "promptsrc", "mugcp")  # prompts inside the image tower
    image = batch * IMAGE_GFLOP * (3 if image_grad else 1)
    if method == "promptsrc":
        image += batch * IMAGE_GFLOP  # the frozen image features of its regulariser
    text_sequences = batch * classes if method == "cocoop" else classes
    return image + text_sequences * text_gflop(n_ctx) * 3


def run_seconds(method: str, config, classes: int, train_images: int, test_images: int) -> float:
    """One training run and its evaluations on one H100 (estimate), with the run's config."""
    batch, epochs = config.optim.batch_size, config.optim.epochs
    n_ctx = getattr(config.method, "n_ctx", 4)
    steps = epochs * math.ceil(train_images / batch)
    flops = steps * step_gflop(method, batch, classes, n_ctx) + test_images * IMAGE_GFLOP + classes * text_gflop(n_ctx)
    compute = flops / (SUSTAINED_TFLOPS * 1e3)
    decode = (epochs * train_images + test_images) / DECODE_PER_S
    return STARTUP_S + max(compute, decode)


def planned_runs(seeds=(1, 2, 3)) -> dict[str, list[float]]:
    """Per setting, the estimated seconds of every training run (with its evaluations), each with the
    schedule `mugcp sweep` gives it (the method's reference config for the setting, dataset and shots)."""
    from mugcp.trainer.config import load_config
    from mugcp.trainer.methods import available_methods

    def schedule(method: str, protocol: str, dataset: str, shots: int):
        return load_config(method, protocol=protocol, dataset=dataset, shots=shots)

    methods = [m for m in METHODS if m in available_methods()]
    out = {"b2n": [], "fewshot": [], "xd+dg": []}
    for m in methods:
        for _ in seeds:
            for name, (classes, _train, _val, test) in SIZES.items():
                base = math.ceil(classes / 2)
                out["b2n"].append(run_seconds(m, schedule(m, "b2n", name, 16), base, base * 16, test))
                for k in (1, 2, 4, 8, 16):
                    out["fewshot"].append(run_seconds(m, schedule(m, "fewshot", name, k), classes, classes * k, test))
            targets = sum(t for n, (_c, _tr, _v, t) in SIZES.items()) + sum(t for _c, t in DG_TEST.values())
            out["xd+dg"].append(run_seconds(m, schedule(m, "transfer", "imagenet", 16), 1000, 16_000, targets))
    return out


def makespan(durations: list[float], gpus: int) -> float:
    """Longest-first placement of whole runs on `gpus` GPUs, one run per GPU at a time (Ray's tasks)."""
    load = [0.0] * gpus
    heapq.heapify(load)
    for d in sorted(durations, reverse=True):
        heapq.heappush(load, heapq.heappop(load) + d)
    return max(load)


def hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def measure() -> None:
    """Serial vs Ray sweep of the same small plan on this machine."""
    import ray

    from mugcp.cli import main
    from mugcp.world.synth import write_synthetic_dtd
    from mugcp.world.tiny_clip import write_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_dtd(tmp / "data", per_class=4, size=48)
        config, weights = write_tiny_clip(tmp / "clip")
        base = ["sweep", "--datasets", "dtd", "--methods", "coop,kgcoop", "--seeds", "1,2", "--shots", "2", "--root",
                str(tmp / "data"), "--clip", str(config), "--pretrained", str(weights), "--set", "optim.epochs=4",
                "--set", "optim.batch_size=8", "--workers", "0"]
        for label, extra in (("serial", []), ("ray local", ["--ray", "local"])):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(base + ["--output", str(tmp / label.replace(" ", "-"))] + extra)
                except SystemExit:
                    pass
            print(f"| {label} | {time.perf_counter() - start:.1f} s |")
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args()
    print(f"Worked estimate (no GPU measured): ViT-B/16 image pass {IMAGE_GFLOP:.1f} GFLOP, class prompt "
          f"{text_gflop(4):.2f} GFLOP at 4 context tokens (cut at {2 + 4 + NAME_TOKENS} tokens), {SUSTAINED_TFLOPS:.0f} TFLOP/s sustained, decode "
          f"{DECODE_PER_S:.0f} images/s, {STARTUP_S:.0f} s start per run; 7 methods, seeds 1-3.\n")
    print("| setting | runs | GPU time (sum) | longest run | 1 GPU | 8 GPUs | 64 GPUs |")
    print("|---|---|---|---|---|---|---|")
    for setting, runs in planned_runs().items():
        print(f"| {setting} | {len(runs)} | {hours(sum(runs))} | {hours(max(runs))} | "
              + " | ".join(hours(makespan(runs, g)) for g in (1, 8, 64)) + " |")
    if args.measure:
        print("\nMeasured on this machine (2 coop + 2 kgcoop runs, tiny CLIP, synthetic DTD):\n")
        print("| sweep | wall |\n|---|---|")
        measure()


if __name__ == "__main__":
    main()
