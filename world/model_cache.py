"""Models the world trains are built once per machine: cached under `$MUGCP_HOME/world/`, keyed by their recipe.

The key hashes the recipe (every number that shapes the model) and the source of the modules
that build it, so a change to either builds a new model instead of reusing a stale one. A model
is built in a hidden folder beside its final place and renamed into place whole: a killed build
leaves no half-written model, and two processes building at once both end with one complete copy.
A build runs with a fixed number of torch threads (`BUILD_THREADS`) and torch's deterministic
algorithms (both part of the key), so every machine builds the same bytes, idle or loaded. Without
the deterministic algorithms two builds of the world's CLIP differed (a parallel sum whose order
changes from run to run: max weight difference 0.17 after 1,800 steps, and tables that differed
by up to 5.8 points); with them, three 30-step builds running at once on two cores wrote identical
files (bench/RESULTS.md, "Reproducible world builds").

One build at a time per machine (`core.locks.hold`, waiting, on `$MUGCP_HOME/world/.build.lock`): two builds
at once, each on `BUILD_THREADS` threads, oversubscribe the cores, and on a 2-core machine the
world's CLIP then built about ten times slower (bench/RESULTS.md, "World v4"). A process that waited
finds the model built if the other process built the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from mugcp.core.coop_datasets import mugcp_home
from mugcp.core.locks import hold

BUILD_THREADS = 2


def recipe_key(recipe: dict, sources: list[Path]) -> str:
    h = hashlib.sha256(json.dumps({**recipe, "build_threads": BUILD_THREADS, "deterministic": True},
                                  sort_keys=True).encode())
    for source in sources:
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:12]


def cached_build(kind: str, recipe: dict, sources: list[Path], build: Callable[[Path], None],
                 log: Callable[[str], object] = lambda _: None) -> Path:
    """The folder of the model `kind` made by `build(folder)` from `recipe`; built only when not cached."""
    dest = mugcp_home() / "world" / f"{kind}-{recipe_key(recipe, sources)}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with hold(dest.parent / ".build.lock", "the world's model builds",
              wait=lambda holder: log(f"[world] waiting for another process's build to finish ({holder})")):
        if dest.is_dir():  # built by the process this one waited for
            return dest
        return _build(kind, recipe, dest, build, log)


def _build(kind: str, recipe: dict, dest: Path, build: Callable[[Path], None], log: Callable[[str], object]) -> Path:
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # left by a killed build: none runs beside this one
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    started = time.perf_counter()
    log(f"[world] building {kind} (once per machine; cached in {dest})")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(BUILD_THREADS)
        torch.use_deterministic_algorithms(True)
        build(tmp)
        (tmp / "recipe.json").write_text(json.dumps({"kind": kind, **recipe}, indent=2) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its copy
            if not dest.is_dir():
                raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[world] built {kind} in {time.perf_counter() - started:.0f} s")
    return dest
