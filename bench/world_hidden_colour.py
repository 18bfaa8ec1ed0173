"""Does MuGCP read SCP when SCP says what CLIP cannot see? The world with its colours hidden from CLIP.

    python bench/world_hidden_colour.py --demo /tmp/wdemo [--seeds 1,2,3] [--set optim.epochs=20 ...] [--colour]

Needs a finished `mugcp demo --out DIR`. CLIP sees a greyscale copy of the demo's data
(DIR/hidden-colour/data, `world/hidden_colour.py`; training, zero-shot and test alike), while each
grey image's SCP is the world's describer's answer on its colour original (from the demo's cache,
handed back for the grey image by a stand-in server; stage one embeds it with the world's CLIP).

Prints the linear probes of `world_scp_probe.py` on the grey images (is the information there?) and
zero-shot, CoOp (reads no SCP), MuGCP with real SCP (also tested with its test SCP shuffled) and with
shuffled SCP, the demo's schedule and defaults; the rule it was decided with is in bench/RESULTS.md
("What CLIP cannot see"). `--set` (repeatable) trains MuGCP real and shuffled with those overrides
instead, into a runs folder of their own (zero-shot and CoOp are the default run's). `--colour` is
the experiment's control: the same MuGCP runs on the demo's own colour images and SCP (DIR/data,
DIR/cache), where the image shows what SCP says. A diagnostic of the method, not a setting of the project.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

import torch  # noqa: E402
from world_oracle_scp import stand_in_stage_one  # noqa: E402
from world_scp_probe import print_rows, probe_rows  # noqa: E402

from mugcp.demo import WORLD_SCHEDULE, table_lines, worker_pool, world_job, world_run  # noqa: E402
from mugcp.trainer.evaluation import run_untrained  # noqa: E402
from mugcp.trainer.report import beyond_spread, build_table, label  # noqa: E402
from mugcp.world.hidden_colour import colour_answers, grey_copy  # noqa: E402
from mugcp.world.tiny_clip import world_clip  # noqa: E402


def grey_stage_one(demo: Path, data: Path, cache: Path, seeds: tuple[int, ...]) -> None:
    """Stage one on the grey images into `cache`, each answered with its colour original's answer."""
    summary = stand_in_stage_one(data, cache, seeds, colour_answers(demo / "cache", data), "describer-on-colour")
    print(f"stage one on the grey images: {summary.done} described, {summary.skipped} already cached, "
          f"{summary.failed} failed")


def zeroshot(data: Path, runs: Path, clip: str, pretrained: str) -> float:
    """Zero-shot CLIP on the grey base and novel test images, in a `worker_pool` process; its seconds."""
    started = time.perf_counter()
    for split in ("base", "novel"):
        run_untrained("zeroshot", "dtd", data, split=split, device=torch.device("cpu"), output=runs, workers=0,
                      log=lambda _: None, clip=clip, pretrained=pretrained)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--set", action="append", default=[], help="a config override of MuGCP's runs (repeatable)")
    ap.add_argument("--colour", action="store_true", help="the control: MuGCP on the demo's colour images and SCP")
    args = ap.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    out = args.demo / "hidden-colour"
    with worker_pool(2) as pool:  # before any thread or torch work here: forked after it, a worker can hang
        clip, ckpt = world_clip()
        if args.colour:
            data, cache = (args.demo / "data").resolve(), (args.demo / "cache").resolve()
            runs, futures = out / "_".join(["colour-runs", *args.set]), []
        else:
            data = grey_copy(args.demo / "data", out / "data").resolve()
            cache, runs = (out / "cache").resolve(), out / "_".join(["runs", *args.set])
            futures = [] if args.set else [pool.submit(zeroshot, data, runs, str(clip), str(ckpt))] + [
                pool.submit(world_job, world_run(data, clip, ckpt, cache, "coop", seed), runs) for seed in seeds]
            grey_stage_one(args.demo, data, cache, seeds)
        for variant in ([], ["conditions.scp=shuffled"]):
            futures += [pool.submit(world_job, world_run(data, clip, ckpt, cache, "mugcp", seed, [*args.set, *variant]),
                                    runs / "variants" / "_".join(variant) if variant else runs,
                                    () if variant else ("shuffled",)) for seed in seeds]
        for future in futures:
            future.result()
    probes(data, cache, seeds)
    rows, _ = build_table(runs)
    images = "the demo's colour images" if args.colour else "the grey images"
    rows = [r for r in rows if r["dataset"] == "dtd"]
    print(f"\nThe demo's schedule{', '.join(['', *args.set])} on {images}, seeds {args.seeds}: mean ± std "
          "over seeds (ddof 0)")
    print("\n".join(f"  {line}" for line in table_lines(rows)))
    real = next(r for r in rows if r["method"] == "mugcp" and "scp=" not in r["variant"])
    for r in rows:
        if r["method"] == "mugcp" and r is not real:
            print(f"  {label(r['method'], r['variant'])} against real SCP: " + ", ".join(
                f"{k.title()} {r[k] - real[k]:+.2f}{'*' if beyond_spread(r, real, k) else ''}" for k in ("base", "novel"))
                + "  (* beyond the seeds' spread)")

def probes(data: Path, cache: Path, seeds: tuple[int, ...]) -> None:
    """`world_scp_probe.py`'s linear probes on `data`'s images and the SCP in `cache`, and check (a)."""
    rows, n_test = probe_rows(data, {"describer": cache}, seeds)
    print(f"\nLinear probes, base classes, {WORLD_SCHEDULE['shots']} shots (seeds {','.join(map(str, seeds))}), "
          f"{n_test} base test images; mean ± std over seeds (ddof 0)")
    print_rows(rows, 34)
    image, both = rows["image"], rows["image + SCP (describer)"]
    apart = statistics.fmean(both) - statistics.fmean(image) > statistics.pstdev(both) + statistics.pstdev(image)
    print(f"  check (a), SCP adds to the image beyond the seeds' spread: {'holds' if apart else 'fails'}")


if __name__ == "__main__":
    main()
