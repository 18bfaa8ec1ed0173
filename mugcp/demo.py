"""`mugcp demo`: the base-to-novel table of every method on the built-in world, on a laptop CPU, nothing downloaded.

The world (world/): a synthetic DTD of 40 images per class whose classes are attributes a sentence
can state, a tiny CLIP pre-trained on varied captions of such textures, and a tiny Qwen2-VL
trained to describe a texture's attributes from its pixels (both built once per machine and
cached). The demo runs the whole job on it: stage one describes what base-to-novel reads (the
base classes' shots and every test image) with that MLLM (vLLM when installed, else
transformers), then every registered method but those in `OPT_IN` (`--methods all` adds them)
trains on the base classes for seeds 1, 2, 3 and is tested on base and novel classes, with
zero-shot CLIP first and MuGCP with shuffled SCP as the control that could refute what SCP adds,
trained so and, for the default runs, only at test time (`--ablations`: every ablation of MuGCP
too). It prints the Base / Novel / HM table (mean ± std over seeds) and the ablation table, and
writes report.md / .csv / .png next to the runs (describer.json: how often the describer's answers
state each true attribute).

Schedule (`WORLD_SCHEDULE`): 16 shots, batch 8, 5 epochs (1 warm-up epoch at 1e-5 + 4 at the
method's own learning rate): 240 SGD steps per run for every method, 192 after warm-up.
Runs go to `jobs` processes (one torch thread each): the tiny models leave one core idle otherwise.
Top floor, like the CLI: it only calls the stages' and the world's public functions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import torch

from mugcp.core.coop_datasets import load_dataset
from mugcp.core.errors import UserError
from mugcp.core.files import write_json_atomic
from mugcp.core.protocol import SEEDS
from mugcp.core.scp_cache import answered_phrases
from mugcp.pipeline.config import ExtractConfig
from mugcp.pipeline.extract import run_extract
from mugcp.pipeline.prompts import question
from mugcp.sweep import Job, run_job
from mugcp.trainer.config import load_config
from mugcp.trainer.evaluation import eval_items, run_untrained
from mugcp.trainer.methods import available_methods, method_class
from mugcp.trainer.report import BEYOND_SPREAD, ablation_rows, build_table, delta, label, write_report
from mugcp.trainer.runs import RunSpec
from mugcp.world import synth
from mugcp.world.model_cache import fingerprint, recipe_key
from mugcp.world.synth import score_answers, write_synthetic_dtd
from mugcp.world.tiny_clip import world_clip
from mugcp.world.tiny_mllm import world_describer

PER_CLASS = 40  # 20 train / 8 val / 12 test per class: 288 base and 276 novel test images
WORLD_SCHEDULE = {"shots": 16, "batch_size": 8, "epochs": 5}
# Left out unless named (`--methods all`): CoCoOp's per-image text pass makes a run cost ~30 s here,
# three of them a third of the demo's time, and the table users know without it fits in 3 minutes.
OPT_IN = ("cocoop",)
# Seconds a run takes here, one thread (bench/RESULTS.md, "The demo"): runs start longest first, so
# that the last to finish are short and no core waits idle at the end.
RUN_SECONDS = {"cocoop": 30, "mugcp": 20, "promptsrc": 15, "maple": 12, "gpt": 11, "kgcoop": 10, "coop": 9}
CONTROLS = {"mugcp": [["conditions.scp=shuffled"]]}
# Test-time controls of the default runs (`mugcp eval --scp`): no training, two evaluations per seed.
TEST_CONTROLS = {"mugcp": ("shuffled",)}
ABLATIONS = {"mugcp": [["conditions.scp=zeros"], ["method.amg=false"], ["method.mpf=false"],
                       ["method.fusion=input"], ["method.gate_init=0.1"]]}


def world_run(root, clip, pretrained, cache_dir, method: str, seed: int, overrides: list[str] = ()) -> RunSpec:
    """A base-to-novel run on the world's DTD with the demo's schedule, then `overrides` (the demo and bench/)."""
    schedule = [f"optim.{k}={v}" for k, v in WORLD_SCHEDULE.items() if k != "shots"]
    config = load_config(method, None, schedule + list(overrides)).to_dict()
    return RunSpec("dtd", str(root), method, WORLD_SCHEDULE["shots"], seed, "base", str(clip), str(pretrained),
                   str(cache_dir), None, config)


def _quiet(_line: str) -> None:
    pass


def _one_quiet_thread() -> None:
    torch.set_num_threads(1)
    os.environ["MUGCP_PROGRESS"] = "0"  # one bar per process would garble the terminal


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """Processes for the world's runs, one torch thread each and no progress bars, all started now.

    Make it before the caller starts any thread or torch work: forked then, the workers inherit its
    imports (torch, open_clip and transformers take ~10 s to import on this CPU, paid again by every
    spawned process) and no thread pool or held lock (forked later, a worker can hang). Elsewhere
    than Linux (macOS frameworks are not fork-safe) they are spawned."""
    start = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context(start), initializer=_one_quiet_thread)
    for started in [pool.submit(os.getpid) for _ in range(jobs)]:  # the first submit starts every worker
        started.result()
    return pool


def world_job(spec: RunSpec, output: Path, test_scp: tuple[str, ...] = ()) -> float:
    """One run in a `worker_pool` process: train, then evaluate on base and novel, also with each test-time SCP
    control in `test_scp`; its seconds."""
    started = time.perf_counter()
    run_job(Job(spec, [(None, "base"), (None, "novel")], test_scp), output, torch.device("cpu"), 0, log=_quiet)
    return time.perf_counter() - started


def _zeroshot(data: Path, runs: Path, clip_args: dict) -> float:
    """Zero-shot CLIP on the base and novel test images, in a `worker_pool` process."""
    started = time.perf_counter()
    for split in ("base", "novel"):
        run_untrained("zeroshot", "dtd", data, split=split, device=torch.device("cpu"), output=runs, workers=0,
                      log=_quiet, **clip_args)
    return time.perf_counter() - started


def table_lines(rows: list[dict]) -> list[str]:
    """The Base / Novel / HM table of `build_table` rows as the demo prints it: a header, then a line per row."""
    lines = [f"{'':38s} {'Base':>13s} {'Novel':>13s} {'HM':>6s}"]
    for r in rows:  # one seed (zero-shot CLIP) has no spread to print
        base, novel = ((f"{r[k]:6.2f} ± {r[k + '_std']:4.2f}" if r["seeds"] != 1 else f"{r[k]:6.2f}{'':7s}")
                       for k in ("base", "novel"))
        lines.append(f"{label(r['method'], r['variant']):38s} {base} {novel} {r['hm']:6.2f}")
    return lines


def _describer_accuracy(cache: Path, data: Path, test_paths: dict[str, str]) -> dict[str, dict[str, float]]:
    """How often the describer's answers state each true attribute, on the base and novel test images."""
    phrases = answered_phrases(cache, "dtd")  # the demo's cache holds one MLLM's answers
    answers = {p: json.dumps(phrases.get(p, [])) for p in test_paths}
    truth = json.loads((data / "dtd" / "attributes.json").read_text())
    return {half: score_answers({p: a for p, a in answers.items() if test_paths[p] == half}, truth)
            for half in ("base", "novel")}


def run_demo(out: Path, *, methods: Optional[list[str]] = None, seeds: tuple[int, ...] = SEEDS,
             backend: Optional[str] = None, ablations: bool = False, jobs: int = 2, log=print) -> list[str]:
    """Build or reuse the world, extract, train and evaluate every method; return the lines to print.

    The run processes (`worker_pool`) start first, before this process computes anything."""
    with worker_pool(jobs) as pool:
        try:
            return _demo(pool, Path(out), methods, seeds, backend, ablations, log)
        except BaseException:  # a failed stage one or run: the runs still queued never start
            # and the running ones end (at once on Ctrl-C). Waiting for them matters: an executor shut down
            # without waiting races CPython 3.11's exit hook, which then printed a traceback after the error.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _world_data(data: Path, models: dict[str, str]) -> None:
    """Write the world's dataset under `data`, or reuse it if this version of the world wrote it.

    Data written by another version (other images, other attributes), or beside SCP and runs of other
    models (`models`: their weights' fingerprints), would mix two worlds: refused, so an old `--out`
    never does."""
    stamp = data / "dtd" / "world.json"
    key = recipe_key({"per_class": PER_CLASS, "models": models}, [Path(synth.__file__)])
    if (data / "dtd").exists():
        try:
            made = json.loads(stamp.read_text()).get("key")
        except (OSError, ValueError, AttributeError):  # no stamp, or not one this code wrote
            made = None
        if made != key:
            raise UserError(f"{data.parent} holds a demo of another version of the built-in world, or an "
                            "unfinished one: pass a new --out")
        return
    write_synthetic_dtd(data, per_class=PER_CLASS)
    write_json_atomic(stamp, {"key": key})


def _demo(pool: ProcessPoolExecutor, out: Path, methods, seeds, backend, ablations, log) -> list[str]:
    started = time.perf_counter()
    data, cache, runs = out / "data", out / "cache", out / "runs"
    clip, ckpt = world_clip(log=log)
    mllm = world_describer(question(8), log=log)
    models = {"clip": fingerprint(clip.parent), "describer": fingerprint(mllm)}
    _world_data(data, models)
    log(f"[demo] world ready: data {data}, CLIP {clip.parent} (weights {models['clip']}), MLLM {mllm} "
        f"(weights {models['describer']}) ({time.perf_counter() - started:.0f} s)")

    trained = [m for m in available_methods() if method_class(m).trains]
    methods = trained if methods == ["all"] else methods or [m for m in trained if m not in OPT_IN]
    variants = [(m, []) for m in methods]
    for table in (CONTROLS, ABLATIONS) if ablations else (CONTROLS,):
        variants += [(m, v) for m, vs in table.items() if m in methods for v in vs]
    specs = []
    for method, overrides in variants:
        output = runs / "variants" / "_".join(overrides) if overrides else runs
        specs += [(world_run(data.resolve(), clip, ckpt, cache.resolve(), method, seed, overrides), output,
                   f"{method}{' [' + ', '.join(overrides) + ']' if overrides else ''} seed {seed}") for seed in seeds]
    specs.sort(key=lambda s: -RUN_SECONDS.get(s[0].method, 0))  # stable: each method's runs keep their order

    # zero-shot and the runs that read nothing from stage one train while it describes; the rest after it
    clip_args = {"clip": str(clip), "pretrained": str(ckpt)}
    futures = [(pool.submit(_zeroshot, data, runs, clip_args), "zero-shot, base and novel")]
    futures += [(pool.submit(world_job, spec, output), name) for spec, output, name in specs
                if not method_class(spec.method).reads_scp()]
    backend = backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    extract = ExtractConfig(cache_dir=cache, **clip_args, shots=(WORLD_SCHEDULE["shots"],), seeds=tuple(seeds),
                            train_classes="base",
                            backend={"kind": backend, "mllm": str(mllm), "max_tokens": 48, "device": "cpu"})
    summary = run_extract("dtd", data, extract, log=log)
    log(f"[demo] stage one ({backend}): {summary.done} described, {summary.skipped} already cached, "
        f"{summary.failed} failed ({time.perf_counter() - started:.0f} s)")
    futures += [(pool.submit(world_job, spec, output, () if output != runs else TEST_CONTROLS.get(spec.method, ())),
                 name) for spec, output, name in specs if method_class(spec.method).reads_scp()]
    for future, name in futures:
        log(f"[demo] {name}: done in {future.result():.0f} s")
    write_report(runs)

    rows, _ = build_table(runs)
    rows = [r for r in rows if r["dataset"] == "dtd"]
    order = ["zeroshot"] + methods
    rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["variant"]))
    splits = load_dataset("dtd", data)
    test = {item.path: split for split in ("base", "novel") for item in eval_items(splits, split)[0]}
    lines = [f"Synthetic DTD (built-in world), {WORLD_SCHEDULE['shots']} shots, seeds {', '.join(map(str, seeds))}: "
             f"mean ± std over seeds, HM of the means", *table_lines(rows)]
    diffs = ablation_rows(rows)
    if diffs:
        lines += ["", "Ablations and controls (against the default, differences of seed means):"]
        lines += [f"{label(r['method'], r['variant']):38s} Base {delta(r, 'base', 6):7s} Novel {delta(r, 'novel', 6):7s} "
                  f"HM {r['d_hm']:+6.2f}" for r in diffs] + [BEYOND_SPREAD]
    acc = _describer_accuracy(cache, data, test)
    write_json_atomic(runs / "describer.json", acc)
    lines += ["", "Describer (stage one) states the true attribute, base / novel test images: " +
              ", ".join(f"{k} {100 * acc['base'][k]:.0f}/{100 * acc['novel'][k]:.0f}%"
                        for k in ("family", "fg", "bg", "scale", "orientation", "all"))]
    lines.append(f"[demo] {len(specs)} runs in {time.perf_counter() - started:.0f} s; report and figure: "
                 f"{runs / 'report.md'}, {runs / 'report.png'}")
    return lines
