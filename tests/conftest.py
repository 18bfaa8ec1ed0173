"""Shared fixtures: tiny models and synthetic data are built once per session, nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config JSON, checkpoint) of the tiny random-weight CLIP."""
    from mugcp.tiny import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def frozen_tiny(tiny_clip):
    from mugcp.clip import load_clip

    return load_clip(str(tiny_clip[0]), str(tiny_clip[1]))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """$DATA holding a synthetic DTD (47 classes, 10 images each: 5/2/3 train/val/test)."""
    from mugcp.synth import write_synthetic_dtd

    root = tmp_path_factory.mktemp("data")
    write_synthetic_dtd(root, per_class=10)
    return root


def run_cli(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `mugcp ARGS` as a user would, in a fresh process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mugcp.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


from vllm_server import tiny_mllm_dir, vllm_env, vllm_server  # noqa: E402,F401  (real-vLLM fixtures)
