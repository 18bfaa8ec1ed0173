"""Models the world trains are built once per machine: cached under `$MUGCP_HOME/world/`, keyed by their recipe.

The key hashes the recipe (every number that shapes the model) and the code of the modules that
build it (`code_of`: their syntax tree without comments and docstrings), so a change to either
builds a new model instead of reusing a stale one, and an edit to their prose rebuilds nothing. A model
is built in a hidden folder beside its final place and renamed into place whole: a killed build
leaves no half-written model, and two processes building at once both end with one complete copy.

A build runs in a child process whose arithmetic is pinned, so that x86-64 machines with AVX2
build the same bytes, idle or loaded:
- a fixed number of torch threads (`BUILD_THREADS`) and torch's deterministic algorithms. Without
  them two builds of the world's CLIP on one machine differed (a parallel sum whose order changes
  from run to run: max weight difference 0.17 after 1,800 steps, and tables that differed by up
  to 5.8 points; bench/RESULTS.md, "Reproducible world builds");
- the CPU code paths (`PINNED_NUMERICS`): torch's kernels, oneDNN's and MKL's at AVX2, whatever
  the CPU offers beyond it. These are read when the libraries load, hence the child. Without them
  a machine with AVX-512 built other weights than one without, and the demo's table moved by up
  to 3.0 points (bench/RESULTS.md, "World builds across CPUs").
The child writes `built_with.json`: the code path it took, the library versions and a sha256 of
each file it wrote, so a user can tell whether a world is the one the README's tables come from.

One build at a time per machine (`core.locks.hold`, waiting, on `$MUGCP_HOME/world/.build.lock`): two builds
at once, each on `BUILD_THREADS` threads, oversubscribe the cores, and on a 2-core machine the
world's CLIP then built about ten times slower (bench/RESULTS.md, "World v4"). A process that waited
finds the model built if the other process built the same one.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from mugcp.core.coop_datasets import mugcp_home
from mugcp.core.errors import UserError
from mugcp.core.files import share_files
from mugcp.core.locks import hold

BUILD_THREADS = 2
# Read by torch (its own kernels), oneDNN and MKL when they load; AVX2 is the widest path every
# x86-64 CPU of the last decade takes. The world's CLIP built so is, byte for byte, the one built on
# a machine without AVX-512 (bench/RESULTS.md, "World builds across CPUs").
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def code_of(source: Path) -> bytes:
    """A module's syntax tree without its docstrings, as text (comments and layout are not in it): what
    a build runs. Its form can change between Python versions, where a model is then built again."""
    tree = ast.parse(Path(source).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def recipe_key(recipe: dict, sources: list[Path]) -> str:
    h = hashlib.sha256(json.dumps({**recipe, "build_threads": BUILD_THREADS, "deterministic": True},
                                  sort_keys=True).encode())
    for source in sources:
        h.update(code_of(source))
    return h.hexdigest()[:12]


def cached_build(kind: str, recipe: dict, sources: list[Path], builder: str,
                 log: Callable[[str], object] = lambda _: None) -> Path:
    """The folder of the model `kind` that `builder` ("module:function", called in a child process as
    `function(folder, recipe, log)`) makes from `recipe`; built only when not cached."""
    dest = mugcp_home() / "world" / f"{kind}-{recipe_key({**recipe, 'numerics': PINNED_NUMERICS}, sources)}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with hold(dest.parent / ".build.lock", "the world's model builds",
              wait=lambda holder: log(f"[world] waiting for another process's build to finish ({holder})")):
        if dest.is_dir():  # built by the process this one waited for
            return dest
        return _build(kind, recipe, dest, builder, log)


def _build(kind: str, recipe: dict, dest: Path, builder: str, log: Callable[[str], object]) -> Path:
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # left by a killed build: none runs beside this one
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    started = time.perf_counter()
    log(f"[world] building {kind} (once per machine; cached in {dest})")
    try:
        command = [sys.executable, "-m", "mugcp.world.model_cache", builder, str(tmp), json.dumps(recipe)]
        with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
                command, env={**os.environ, **PINNED_NUMERICS}, stdout=subprocess.PIPE, stderr=errors,
                text=True) as child:
            for line in child.stdout:  # the builder's progress, as it comes
                log(line.rstrip("\n"))
            if child.wait():
                errors.seek(0)
                last = [line for line in errors.read().splitlines() if line.strip()][-1:] or ["no message"]
                failure = f"building the world's {kind} failed (exit {child.returncode}): {last[0]}"
                if "[Errno" in last[0]:  # the place it writes to (a full disk, a read-only MUGCP_HOME), not the code
                    raise UserError(failure)
                raise RuntimeError(failure)
        (tmp / "recipe.json").write_text(json.dumps({"kind": kind, **recipe}, indent=2) + "\n")
        share_files(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its copy
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[world] built {kind} in {time.perf_counter() - started:.0f} s")
    return dest


def fingerprint(folder: Path) -> str:
    """A short digest of the weights a build wrote (from its `built_with.json`): equal on two machines
    exactly when they built the same weights."""
    files = json.loads((folder / "built_with.json").read_text())["sha256"]
    weights = {name: digest for name, digest in files.items() if name.endswith(".safetensors")}
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:12]


def run_builder(builder: str, folder: Path, recipe: dict) -> None:
    """The child's work (its environment holds `PINNED_NUMERICS` from its start, before torch loads): the
    pinned threads and algorithms, the build, then what it was built with."""
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    module, name = builder.split(":")
    getattr(importlib.import_module(module), name)(folder, recipe, log=lambda line: print(line, flush=True))
    files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    versions = {pkg: metadata.version(pkg) for pkg in ("torch", "open_clip_torch", "transformers", "numpy", "pillow")}
    (folder / "built_with.json").write_text(json.dumps({
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": BUILD_THREADS,
        "environment": PINNED_NUMERICS, "versions": versions, "sha256": files}, indent=2) + "\n")


if __name__ == "__main__":
    run_builder(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))
