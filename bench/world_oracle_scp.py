"""Can MuGCP use SCP at all on the world? Its answer with SCP that states every image's true attributes.

    python bench/world_oracle_scp.py --demo /tmp/wdemo [--seeds 1,2,3] [--out DIR --set optim.epochs=20]
        [--out DIR --resize]

Needs a finished `mugcp demo --out DIR`. The world's describer names the pattern family for about a
third of the test images, so "real SCP is no better than shuffled SCP" could mean the method cannot
use SCP, or that these answers carry too little. This separates the two: a stand-in MLLM answers
every image with its true attributes (`synth.describe`, the phrases the describer is trained to
say; label-free: no class name), stage one embeds them into a separate cache, and MuGCP trains with
them real and shuffled across images, on the demo's data, CLIP and schedule. Printed beside the
demo's own MuGCP rows (the describer's SCP). `--set` adds config overrides to both (e.g. a longer
schedule). The real-SCP runs are also evaluated with the test images' SCP shuffled (`mugcp eval
--scp shuffled`): a model that reads SCP loses accuracy there. `--resize` replaces the protocol's
random resized crop by a plain resize, as `world_augmentation.py` does, so the training views show
no more than the test images do. A diagnostic of the world, not a setting of the project.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

from world_augmentation import use_plain_resize  # noqa: E402

from mugcp.demo import WORLD_SCHEDULE, worker_pool, world_job, world_run  # noqa: E402
from mugcp.pipeline.config import ExtractConfig  # noqa: E402
from mugcp.pipeline.extract import run_extract  # noqa: E402
from mugcp.trainer.report import build_table, label  # noqa: E402
from mugcp.world.stand_in_server import FakeServer  # noqa: E402
from mugcp.world.synth import Attributes, describe  # noqa: E402
from mugcp.world.tiny_clip import world_clip  # noqa: E402


def oracle_answers(data: Path) -> dict[str, str]:
    """sha256 of each image file -> its true attributes as the describer's JSON list of phrases."""
    truth = json.loads((data / "dtd" / "attributes.json").read_text())
    return {hashlib.sha256((data / "dtd" / path).read_bytes()).hexdigest(): json.dumps(describe(Attributes(**a)))
            for path, a in truth.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="folder for the oracle cache and runs (default: DEMO/oracle)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--set", action="append", default=[], help="a config override for both runs (repeatable)")
    ap.add_argument("--resize", action="store_true", help="a plain resize in place of the random resized crop")
    args = ap.parse_args()
    data, out = args.demo / "data", args.out or args.demo / "oracle"
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.resize:  # before the workers fork, so that they inherit it
        use_plain_resize()
    with worker_pool(2) as pool:  # before any thread or torch work here: forked after it, a worker can hang
        oracle_runs(pool, data, out, seeds, args.set)
    print(f"MuGCP on the demo's data, seeds {args.seeds}{', '.join(['', *args.set])}"
          f"{', plain resize' if args.resize else ''} (the oracle's runs): mean ± std over seeds")
    for name, folder in (("SCP of the true attributes", out / "runs"), ("SCP of the world's describer",
                                                                         args.demo / "runs")):
        rows, _ = build_table(folder)
        for r in rows:
            if r["dataset"] == "dtd" and r["method"] == "mugcp" and (folder == out / "runs" or r["variant"] in (
                    "", "conditions.scp=shuffled", "test conditions.scp=shuffled")):  # the oracle's: any --set
                print(f"  {name:30s} {label(r['method'], r['variant']):34s} Base {r['base']:6.2f} ± "
                      f"{r['base_std']:4.2f}  Novel {r['novel']:6.2f} ± {r['novel_std']:4.2f}")


def oracle_cache(data: Path, cache: Path, seeds: tuple[int, ...]) -> Path:
    """Stage one with the true attributes into `cache` (the images base-to-novel reads for `seeds`)."""
    summary = stand_in_stage_one(data, cache, seeds, oracle_answers(data), "oracle-describer")
    print(f"stage one with true attributes: {summary.done} described, {summary.skipped} already cached")
    return cache


def stand_in_stage_one(data: Path, cache: Path, seeds: tuple[int, ...], answers: dict[str, str], model: str):
    """Stage one into `cache` on the images base-to-novel reads for `seeds`, with the world's CLIP, each image
    answered by a stand-in MLLM server named `model` from `answers` (sha256 of the image file -> answer text);
    its summary."""
    clip, ckpt = world_clip()
    with FakeServer(model=model, answer=lambda image: answers[hashlib.sha256(image).hexdigest()]) as s:
        config = ExtractConfig(clip=str(clip), pretrained=str(ckpt), cache_dir=cache,
                               shots=(WORLD_SCHEDULE["shots"],), seeds=seeds, train_classes="base",
                               backend={"server_urls": [s.url]})
        return run_extract("dtd", data, config, log=lambda _: None)


def oracle_runs(pool, data: Path, out: Path, seeds: tuple[int, ...], overrides: list[str] = ()) -> None:
    """Stage one with the true attributes into `out/cache`, then MuGCP real and shuffled into `out/runs`."""
    clip, ckpt = world_clip()
    oracle_cache(data, out / "cache", seeds)
    runs = out / "runs"
    specs = [(world_run(data.resolve(), clip, ckpt, (out / "cache").resolve(), "mugcp", seed, [*overrides, *variant]),
              runs / "variants" / "_".join(variant) if variant else runs)
             for variant in ([], ["conditions.scp=shuffled"]) for seed in seeds]
    for future in [pool.submit(world_job, spec, output, () if output != runs else ("shuffled",))  # a test control
                   for spec, output in specs]:
        future.result()


if __name__ == "__main__":
    main()
